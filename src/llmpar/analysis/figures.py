"""Figures (matplotlib), each written as PNG and SVG. Runs are grouped by strategy family and every strategy has
one colour in every report (``figure_list.STRATEGIES``); legends sit outside the data; failed runs (oom,
diverged, invalid) are marked."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from llmpar.analysis.aggregate import read_table  # noqa: E402
from llmpar.analysis.figure_list import EXTRAPOLATION_STRATEGY, FIGURES, colour, strategy_label  # noqa: E402
from llmpar.analysis.findings import ordered  # noqa: E402
from llmpar.io import atomic_path  # noqa: E402

DEEPSPEED_HATCH = "///"
# the parts of a run's wall time (runs.csv) in the time-budget figure, with their colours
BUDGET = {"startup_s": ("start-up (before step 1)", "#bbbbbb"),
          "warmup_steps_s": ("excluded warm-up steps (compilation)", "#e0a040"),
          "steady_steps_s": ("steady steps (throughput)", "#3070b0"),
          "between_steps_s": ("evaluation, checkpoints between steps", "#80c080"),
          "after_last_step_s": ("after the last step", "#dddddd")}
STATES = {"params_gib_per_rank": ("parameters", "#4c72b0"), "grads_gib_per_rank": ("gradients", "#dd8452"),
          "optimizer_gib_per_rank": ("optimizer state", "#55a868")}


def _save(fig, out_dir: Path, name: str):
    """Write ``fig`` as PNG and SVG and close it; returns it (its axes still hold the plotted data)."""
    for ext in ("png", "svg"):
        with atomic_path(out_dir / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


def thousands(ax, axis: str = "x") -> None:
    """Tick labels like 120k instead of 120000 (and at most 5 ticks), so that they never run together."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(5))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


def _label(r) -> str:
    return r["run"] if r["status"] == "ok" else f"{r['run']} [{r['status']}]"


def _run_axis(ax, df: pd.DataFrame) -> None:
    """Runs on the y axis, top to bottom, each tick label in its strategy's colour."""
    ax.set_yticks(range(len(df)), [_label(r) for _, r in df.iterrows()])
    for tick, strategy in zip(ax.get_yticklabels(), df["strategy"]):
        tick.set_color(colour(strategy))
    ax.set_ylim(len(df) - 0.5, -0.5)
    ax.set_ylabel("")


def _strategy_legend(ax, strategies, engines=None) -> None:
    """One legend right of ``ax``, outside the data: the strategies present, and the DeepSpeed hatch where a
    DeepSpeed engine appears."""
    handles = [Patch(facecolor=colour(s), label=strategy_label(s)) for s in dict.fromkeys(strategies)]
    if engines is not None and "deepspeed" in set(engines):
        handles.append(Patch(facecolor="white", edgecolor="#444", hatch=DEEPSPEED_HATCH, label="DeepSpeed engine"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)


def _hbars(ax, df: pd.DataFrame, col: str) -> None:
    values = df[col].where(df["status"] == "ok").fillna(0.0)
    for i, (_, r) in enumerate(df.iterrows()):
        ax.barh(i, values.iloc[i], color=colour(r["strategy"]), edgecolor="white",
                hatch=DEEPSPEED_HATCH if r.get("engine") == "deepspeed" else None)


def throughput(metrics: pd.DataFrame, out_dir: Path):
    """Left: steady tokens/s of all ranks; right: per GPU, with the value at each bar."""
    df = ordered(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(df) + 1.4), sharey=True)
    for ax, col, xlabel in ((axes[0], "tokens_per_s", "tokens/s, all ranks (steady state)"),
                            (axes[1], "tokens_per_s_per_gpu", "tokens/s per GPU (steady state)")):
        _hbars(ax, df, col)
        _run_axis(ax, df)
        thousands(ax)
        ax.set_xlabel(xlabel)
    for i, v in enumerate(df["tokens_per_s_per_gpu"].where(df["status"] == "ok")):
        if pd.notna(v):
            axes[1].annotate(f"{v / 1000:.1f}k", (v, i), xytext=(3, 0), textcoords="offset points", va="center",
                             fontsize=7)
    axes[1].set_xlim(0, 1.15 * max(df["tokens_per_s_per_gpu"].max(), 1))
    fig.suptitle(FIGURES["throughput"])
    _strategy_legend(axes[1], df["strategy"], df.get("engine"))
    return _save(fig, out_dir, "throughput")


def time_budget(runs: pd.DataFrame, metrics: pd.DataFrame, out_dir: Path):
    """One stacked bar per run: start-up, excluded warm-up steps, steady steps, evaluation between steps and
    what followed the last step (runs.csv), summing to its wall time."""
    df = ordered(metrics[["run", "strategy", "status"]].merge(runs.drop(columns=["strategy", "status"]), on="run"))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(df) + 1.4))
    left = pd.Series(0.0, index=df.index)
    for col, (label, c) in BUDGET.items():
        width = df[col].fillna(0.0).clip(lower=0)
        ax.barh(range(len(df)), width, left=left, color=c, label=label, edgecolor="white", linewidth=0.5)
        left += width
    _run_axis(ax, df)
    ax.set_xlabel("seconds of the run's wall time")
    ax.set_title(FIGURES["time_budget"])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False, fontsize=8)
    return _save(fig, out_dir, "time_budget")


def memory(metrics: pd.DataFrame, out_dir: Path):
    df = ordered(metrics)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(df) + 1.4))
    _hbars(ax, df, "peak_mem_gib")
    _run_axis(ax, df)
    kind = df["memory_kind"].dropna().iloc[0] if df["memory_kind"].notna().any() else ""
    ax.set_xlabel("peak GiB per rank, max over ranks" + (" (CPU RSS)" if kind == "cpu_peak_rss" else ""))
    ax.set_title(FIGURES["memory"])
    _strategy_legend(ax, df["strategy"], df.get("engine"))
    return _save(fig, out_dir, "memory")


def memory_breakdown(metrics: pd.DataFrame, out_dir: Path):
    """Model-state bytes per rank stacked, the rest of the peak (activations, buffers, workspaces) beside them."""
    df = ordered(metrics[metrics["status"] == "ok"])
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(df) + 1.6))
    left = pd.Series(0.0, index=df.index)
    for col, (label, c) in STATES.items():
        width = df[col].fillna(0.0)
        ax.barh(range(len(df)), width, left=left, color=c, label=label)
        left += width
    rest = (df["peak_mem_gib"] - left).clip(lower=0)
    ax.barh(range(len(df)), rest, left=left, color="#dddddd", label="rest of the peak (activations, buffers)")
    _run_axis(ax, df)
    ax.set_xlabel("GiB held by one rank (max over ranks)")
    ax.set_title(FIGURES["memory_breakdown"])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False, fontsize=8)
    return _save(fig, out_dir, "memory_breakdown")


def _run_styles(metrics: pd.DataFrame) -> dict:
    """run -> (colour, line style): the strategy's colour; runs of one strategy told apart by style."""
    styles, seen = {}, {}
    for _, r in ordered(metrics).iterrows():
        k = seen.get(r["strategy"], 0)
        seen[r["strategy"]] = k + 1
        styles[r["run"]] = (colour(r["strategy"]), ["-", "--", ":", "-."][k % 4])
    return styles


def loss_curves(steps: pd.DataFrame, metrics: pd.DataFrame, x: str, xlabel: str, out_dir: Path, name: str):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = _run_styles(metrics)
    for run, (c, ls) in styles.items():
        rows = steps[steps["run"] == run]
        if not rows.empty:
            ax.plot(rows[x], rows["loss"], color=c, linestyle=ls, linewidth=1.2, label=run)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training cross-entropy (nats/token)")
    if x == "tokens":
        thousands(ax)
    ax.set_title(FIGURES[name])
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
    return _save(fig, out_dir, name)


def resources_over_time(samples: pd.DataFrame, metrics: pd.DataFrame, out_dir: Path):
    """Small multiples, one panel per run on shared axes: each second's peak memory of each rank (strategy
    colour) and the mean utilization over ranks (grey, from the panel's bottom at 0 % to its top at 100 %)."""
    df = ordered(metrics)
    kind = df["memory_kind"].dropna().iloc[0] if df["memory_kind"].notna().any() else ""
    util_kind = df["utilization_kind"].dropna().iloc[0] if df["utilization_kind"].notna().any() else ""
    ncols = min(4, max(len(df), 1))
    nrows = math.ceil(len(df) / ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 1.9 * nrows + 0.8), sharex=True, sharey=True,
                             squeeze=False)
    top = max(samples["mem_gib"].max() if not samples.empty else 1.0, 1e-3) * 1.1
    if not samples.empty:  # each second's peak per rank, each second's mean utilization over ranks
        second = samples.assign(t=samples["t_s"] // 1)
        peaks = second.groupby(["run", "rank", "t"])["mem_gib"].max()
        util_mean = second.groupby(["run", "t"])["util_pct"].mean()
    for ax, (_, r) in zip(axes.flat, df.iterrows()):
        if not samples.empty and r["run"] in peaks.index.get_level_values("run"):
            for _, env in peaks.loc[r["run"]].groupby(level="rank"):
                ax.plot(env.index.get_level_values("t"), env.values, color=colour(r["strategy"]), linewidth=0.9)
            u = util_mean.loc[r["run"]].dropna()
            # utilization from the panel's bottom (0 %) to its top (100 %): no second axis to read
            ax.plot(u.index, u.values / 100, color="#888888", linewidth=0.7, transform=ax.get_xaxis_transform())
        ax.set_ylim(0, top)
        ax.set_title(_label(r), fontsize=8, color=colour(r["strategy"]))
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(4))
    for ax in list(axes.flat)[len(df):]:
        ax.set_visible(False)
    mem = "CPU RSS" if kind == "cpu_peak_rss" else "GPU allocated"
    util = "process CPU %" if util_kind == "cpu_process_percent" else "NVML GPU utilization %"
    fig.supxlabel("seconds since process start", fontsize=9)
    fig.supylabel(f"GiB ({mem}), each second's peak, one line per rank", fontsize=9)
    fig.suptitle(FIGURES["resources_over_time"])
    fig.legend(handles=[Line2D([], [], color="#444", label=f"memory per rank, each second's peak ({mem})"),
                        Line2D([], [], color="#888888",
                               label=f"{util}, mean over ranks (panel bottom 0 %, top 100 %)")],
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False, fontsize=8)
    return _save(fig, out_dir, "resources_over_time")


def noise_scale(metrics: pd.DataFrame, out_dir: Path):
    """Left: the steady-state gradient noise scale (mean ± its standard error, as the report's tables show
    it) of every run that measured it; right: Pollux goodput beside the raw throughput. Runs without it are
    left out (the report lists each with its reason)."""
    df = ordered(metrics[(metrics["status"] == "ok") & metrics["gradient_noise_scale_mean"].notna()])
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * max(len(df), 2) + 1.6), sharey=True)
    if df.empty:
        axes[0].text(0.5, 0.5, "no run recorded a noise scale\n(the report lists each run's reason)",
                     ha="center", va="center", transform=axes[0].transAxes)
    else:
        pos = list(range(len(df)))
        for i, (_, r) in enumerate(df.iterrows()):
            axes[0].barh(i, r["gradient_noise_scale_mean"], xerr=0 if pd.isna(r["gradient_noise_scale_se"])
                         else r["gradient_noise_scale_se"], color=colour(r["strategy"]), capsize=3)
        axes[1].barh([p - 0.2 for p in pos], df["tokens_per_s"], height=0.4, color="#bbbbbb",
                     label="throughput")
        axes[1].barh([p + 0.2 for p in pos], df["pollux_goodput"].fillna(0), height=0.4,
                     color=[colour(s) for s in df["strategy"]], label="Pollux goodput")
        _run_axis(axes[0], df)
        _run_axis(axes[1], df)
        thousands(axes[1])
        axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False, fontsize=8)
    axes[0].xaxis.set_major_locator(MaxNLocator(5))
    axes[0].set_xlabel("B_simple, sequences (mean ± s.e. over the steady steps)")
    axes[1].set_xlabel("tokens/s (goodput = throughput × statistical efficiency)")
    fig.suptitle(FIGURES["noise_scale"])
    return _save(fig, out_dir, "noise_scale")


def ideal_reference(scaling: pd.DataFrame) -> tuple[float | None, int | None]:
    """Tokens/s per GPU of the ideal line: the single-GPU reference at the micro-batch size most multi-GPU
    runs use (with that size)."""
    joined = scaling[scaling["joined"] & scaling["reference_per_gpu"].notna()]
    multi = joined[joined["gpus"] > 1]
    if multi.empty:
        return None, None
    mbs = multi["micro_batch_size"].mode().iloc[0]
    return float(joined[joined["micro_batch_size"] == mbs]["reference_per_gpu"].iloc[0]), int(mbs)


def scaling(scaling_df: pd.DataFrame, out_dir: Path):
    """Left: steady tokens/s against GPUs, every run a point, a line through each variant's fastest run per
    GPU count, and the ideal line (GPUs x the single-GPU reference); right: scaling efficiency against the
    single-GPU run of the same micro-batch size (1 = ideal)."""
    df = scaling_df[scaling_df["joined"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    gpus = sorted(df["gpus"].unique())
    ref, mbs = ideal_reference(scaling_df)
    if ref:
        axes[0].plot(gpus, [g * ref for g in gpus], color="k", linestyle=":", linewidth=1,
                     label=f"ideal: GPUs × single (micro-batch {mbs})")
    markers = "osD^v<>phX*"
    for k, (var, rows) in enumerate(df.groupby("variant", sort=False)):
        c, m = colour(rows["strategy"].iloc[0]), markers[k % len(markers)]
        best = rows.loc[rows.groupby("gpus")["tokens_per_s"].idxmax()].sort_values("gpus")
        axes[0].plot(best["gpus"], best["tokens_per_s"], color=c, marker=m, linewidth=1.2, label=var)
        axes[0].scatter(rows["gpus"], rows["tokens_per_s"], color=c, marker=m, s=18, zorder=3)
        eff = rows[rows["scaling_efficiency"].notna()]
        if not eff.empty:
            best_eff = eff.loc[eff.groupby("gpus")["scaling_efficiency"].idxmax()].sort_values("gpus")
            axes[1].plot(best_eff["gpus"], best_eff["scaling_efficiency"], color=c, marker=m, linewidth=1.2)
            axes[1].scatter(eff["gpus"], eff["scaling_efficiency"], color=c, marker=m, s=18, zorder=3)
    axes[1].axhline(1.0, color="k", linestyle=":", linewidth=1)
    for ax in axes:
        ax.set_xticks(gpus)
        ax.set_xlabel("GPUs")
    thousands(axes[0], "y")
    axes[0].set_ylabel("tokens/s, all ranks (steady state)")
    axes[1].set_ylabel("tokens/s per GPU ÷ single GPU, same micro-batch")
    axes[1].set_ylim(0, 1.1)
    studies = ", ".join(dict.fromkeys(df["study"]))
    fig.suptitle(f"{FIGURES['scaling']} (studies {studies})")
    axes[0].legend(loc="upper left", bbox_to_anchor=(2.25, 1.0), frameon=False, fontsize=7)
    return _save(fig, out_dir, "scaling")


def plan_vs_measured(plan_csv, out_dir) -> None:
    """plan.csv as two panels (peak GiB, step seconds): one point per recorded run, the identity line, the
    ±10 % and ±15 % bands; a run outside its quantity's bound (memory 10 %, step 15 %) is labelled, and runs
    the plan does not model (bounded false) are hollow."""
    from llmpar.plan.calibration import MEMORY_BOUND, TIME_BOUND

    sns.set_theme(style="whitegrid", context="paper")
    df = read_table(plan_csv)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    panels = (("peak", "peak_gib", "peak GiB per rank (max over ranks)", MEMORY_BOUND),
              ("step", "step_s", "seconds per optimizer step", TIME_BOUND))
    for ax, (err, col, label, bound) in zip(axes, panels):
        if df.empty:
            ax.text(0.5, 0.5, "no recorded runs", ha="center", transform=ax.transAxes)
            continue
        meas, pred = df[f"measured_{col}"], df[f"predicted_{col}"]
        hi = 1.1 * max(meas.max(), pred.max())
        x = [0.0, hi]
        for band, alpha in ((0.15, 0.12), (0.10, 0.22)):
            ax.fill_between(x, [0, hi * (1 - band)], [0, hi * (1 + band)], color="tab:blue", alpha=alpha, lw=0,
                            label=f"±{band:.0%}")
        ax.plot(x, x, color="k", lw=0.8, label="predicted = measured")
        bounded = df["bounded"].astype(str).str.lower() == "true"
        ax.scatter(meas[bounded], pred[bounded], color="tab:orange", edgecolor="k", s=28, zorder=3,
                   label="modelled run")
        ax.scatter(meas[~bounded], pred[~bounded], facecolor="none", edgecolor="tab:gray", s=28, zorder=3,
                   label="engine not modelled")
        misses = df[df[f"{err}_error"].abs() > bound].sort_values(f"measured_{col}")
        for k, (_, r) in enumerate(misses.iterrows()):  # alternate above / below so neighbours stay legible
            ax.annotate(f"{r['run']} {r[f'{err}_error']:+.0%}", (r[f"measured_{col}"], r[f"predicted_{col}"]),
                        xytext=(5, 5 if k % 2 else -11), textcoords="offset points", fontsize=7)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"{'Peak memory' if err == 'peak' else 'Step time'} (bound ±{bound:.0%})")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=5, frameon=False,
                   fontsize=8)
    card = df["card"].iloc[0] if not df.empty else ""
    fig.suptitle(f"{FIGURES['plan_vs_measured']} (llmpar.plan on {card})")
    _save(fig, Path(out_dir), "plan_vs_measured")


def extrapolation(extrapolation_csv, out_dir):
    """extrapolation.csv as one panel per model shape: predicted tokens/s per GPU against GPUs (log scale) for
    each layout the plan extrapolates; a layout that does not fit the card is left out at that size."""
    sns.set_theme(style="whitegrid", context="paper")
    df = read_table(extrapolation_csv)
    shapes = list(dict.fromkeys(df["shape"])) or ["–"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2), squeeze=False)
    markers = "osD^v<>phX"
    for ax, shape in zip(axes[0], shapes):
        rows = df[df["shape"] == shape]
        for k, (strategy, s) in enumerate(rows.groupby("strategy", sort=False)):
            fit = s[s["predicted_fits"].astype(str).str.lower() == "true"]
            ax.plot(fit["gpus"], fit["predicted_tokens_per_s_per_gpu"], marker=markers[k % len(markers)],
                    color=colour(EXTRAPOLATION_STRATEGY.get(strategy, strategy)), linewidth=1.2, label=strategy,
                    linestyle="-" if k % 2 == 0 else "--")
        ax.set_xscale("log", base=2)
        gpus = sorted(rows["gpus"].unique())
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.minorticks_off()
        thousands(ax, "y")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("predicted tokens/s per GPU")
        ax.set_title(f"{shape} model")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5, frameon=False, fontsize=8)
    fig.suptitle(FIGURES["extrapolation"])
    return _save(fig, Path(out_dir), "extrapolation")


def make_figures(metrics_csv, steps_csv, samples_csv, runs_csv, scaling_csv, out_dir, names: list[str]) -> dict:
    """Write the figures ``names``; returns {name: matplotlib Figure} (closed, for reading back)."""
    sns.set_theme(style="whitegrid", context="paper")
    out_dir = Path(out_dir)
    metrics, steps, samples = read_table(metrics_csv), read_table(steps_csv), read_table(samples_csv)
    makers = {
        "throughput": lambda: throughput(metrics, out_dir),
        "time_budget": lambda: time_budget(read_table(runs_csv), metrics, out_dir),
        "memory": lambda: memory(metrics, out_dir),
        "memory_breakdown": lambda: memory_breakdown(metrics, out_dir),
        "loss_vs_time": lambda: loss_curves(steps, metrics, "elapsed_s", "seconds since process start", out_dir,
                                            "loss_vs_time"),
        "loss_vs_tokens": lambda: loss_curves(steps, metrics, "tokens", "trained tokens", out_dir, "loss_vs_tokens"),
        "resources_over_time": lambda: resources_over_time(samples, metrics, out_dir),
        "noise_scale": lambda: noise_scale(metrics, out_dir),
        "scaling": lambda: scaling(read_table(scaling_csv), out_dir),
    }
    return {name: makers[name]() for name in names}
