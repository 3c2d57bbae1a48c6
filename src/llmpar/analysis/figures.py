"""Figures (seaborn), each written as PNG and SVG. Failed runs (oom, diverged, invalid) are marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from llmpar.analysis.aggregate import read_table  # noqa: E402
from llmpar.analysis.figure_list import FIGURES  # noqa: E402
from llmpar.io import atomic_path  # noqa: E402


def _save(fig, out_dir: Path, name: str):
    """Write ``fig`` as PNG and SVG and close it; returns it (its axes still hold the plotted data)."""
    for ext in ("png", "svg"):
        with atomic_path(out_dir / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


def _bar(metrics: pd.DataFrame, col: str, xlabel: str, out_dir: Path, name: str):
    df = metrics.copy()
    df["label"] = df.apply(lambda r: r["run"] if r["status"] == "ok" else f"{r['run']} [{r['status']}]", axis=1)
    df[col] = df[col].fillna(0.0)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(df) + 1.2))
    sns.barplot(data=df, y="label", x=col, hue="strategy", dodge=False, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("")
    ax.set_title(FIGURES[name])
    return _save(fig, out_dir, name)


def noise_scale(metrics: pd.DataFrame, out_dir: Path):
    """Left: the steady-state gradient noise scale (mean ± its standard error) of every run that measures
    it; right: Pollux goodput beside the raw throughput. A run that measures nothing is left out (its
    reason is in metrics.csv's noise_scale_reason)."""
    df = metrics[(metrics["status"] == "ok") & metrics["gradient_noise_scale_mean"].notna()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * max(len(df), 2) + 1.5), sharey=True)
    if df.empty:
        axes[0].text(0.5, 0.5, "no run recorded a noise scale\n(why: noise_scale_reason in metrics.csv;\n"
                     "runs recorded before the metric existed have none)",
                     ha="center", va="center", transform=axes[0].transAxes)
    else:
        axes[0].barh(df["run"], df["gradient_noise_scale_mean"], xerr=df["gradient_noise_scale_se"].fillna(0),
                     color=sns.color_palette("deep")[0], capsize=3)
        pos = range(len(df))
        axes[1].barh([p + 0.2 for p in pos], df["tokens_per_s"], height=0.4, label="throughput",
                     color=sns.color_palette("deep")[7])
        axes[1].barh([p - 0.2 for p in pos], df["pollux_goodput"], height=0.4, label="Pollux goodput",
                     color=sns.color_palette("deep")[2])
        axes[1].legend(loc="lower right", fontsize=7)
        axes[0].invert_yaxis()
    axes[0].set_xlabel("B_simple (sequences; mean ± s.e. over the steady steps)")
    axes[1].set_xlabel("tokens/s (goodput = throughput × statistical efficiency)")
    fig.suptitle(FIGURES["noise_scale"])
    return _save(fig, out_dir, "noise_scale")


def memory_breakdown(metrics: pd.DataFrame, out_dir: Path) -> None:
    cols = {"params_gib_per_rank": "parameters", "grads_gib_per_rank": "gradients",
            "optimizer_gib_per_rank": "optimizer state"}
    df = metrics[metrics["status"] == "ok"][["run", *cols]].rename(columns=cols).set_index("run").fillna(0) * 1024
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(df) + 1.2))
    df.plot.barh(stacked=True, ax=ax, color=sns.color_palette("deep", 3))
    ax.set_xlabel("MiB held by one rank (max over ranks, measured from the tensors)")
    ax.set_ylabel("")
    ax.invert_yaxis()
    ax.set_title(FIGURES["memory_breakdown"])
    return _save(fig, out_dir, "memory_breakdown")


def loss_curves(steps: pd.DataFrame, x: str, xlabel: str, out_dir: Path, name: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not steps.empty:
        sns.lineplot(data=steps, x=x, y="loss", hue="run", ax=ax, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training cross-entropy (nats/token)")
    ax.set_title(FIGURES[name])
    return _save(fig, out_dir, name)


def resources_over_time(samples: pd.DataFrame, metrics: pd.DataFrame, out_dir: Path) -> None:
    kind = metrics["memory_kind"].dropna().iloc[0] if metrics["memory_kind"].notna().any() else "memory"
    util_kind = metrics["utilization_kind"].dropna().iloc[0] if metrics["utilization_kind"].notna().any() else "util"
    fig, axes = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    if not samples.empty:
        s = samples.copy()
        s["series"] = s["run"] + " r" + s["rank"].astype(str)
        sns.lineplot(data=s, x="t_s", y="mem_gib", hue="run", units="rank", estimator=None, ax=axes[0],
                     linewidth=0.8)
        sns.lineplot(data=s, x="t_s", y="util_pct", hue="run", units="rank", estimator=None, ax=axes[1],
                     linewidth=0.8, legend=False)
    axes[0].set_ylabel(f"GiB ({'CPU RSS' if kind == 'cpu_peak_rss' else 'GPU allocated'})")
    axes[1].set_ylabel("utilization % (" + ("process CPU" if util_kind == "cpu_process_percent" else "NVML GPU") + ")")
    axes[1].set_xlabel("seconds since process start (one line per rank)")
    axes[0].set_title(FIGURES["resources_over_time"])
    return _save(fig, out_dir, "resources_over_time")


def scaling(metrics: pd.DataFrame, out_dir: Path) -> None:
    df = metrics[metrics["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.lineplot(data=df, x="world_size", y="tokens_per_s", hue="strategy", marker="o", ax=ax)
    ax.set_xlabel("processes (GPUs, or CPU processes)")
    ax.set_ylabel("tokens/s (steady state, all ranks)")
    ax.set_xticks(sorted(df["world_size"].unique()))
    ax.set_title(FIGURES["scaling"])
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
    axes[0].legend(loc="upper left", fontsize=7)
    card = df["card"].iloc[0] if not df.empty else ""
    fig.suptitle(f"{FIGURES['plan_vs_measured']} (llmpar.plan on {card})")
    _save(fig, Path(out_dir), "plan_vs_measured")


def make_figures(metrics_csv, steps_csv, samples_csv, out_dir, names: list[str]) -> dict:
    """Write the figures ``names``; returns {name: matplotlib Figure} (closed, for reading back)."""
    sns.set_theme(style="whitegrid", context="paper")
    out_dir = Path(out_dir)
    metrics, steps, samples = read_table(metrics_csv), read_table(steps_csv), read_table(samples_csv)
    makers = {
        "throughput": lambda: _bar(metrics, "tokens_per_s", "tokens/s (steady state, all ranks)", out_dir,
                                   "throughput"),
        "memory": lambda: _bar(metrics, "peak_mem_gib", "peak GiB per rank (max over ranks)", out_dir, "memory"),
        "memory_breakdown": lambda: memory_breakdown(metrics, out_dir),
        "loss_vs_time": lambda: loss_curves(steps, "elapsed_s", "seconds since process start", out_dir,
                                            "loss_vs_time"),
        "loss_vs_tokens": lambda: loss_curves(steps, "tokens", "trained tokens", out_dir, "loss_vs_tokens"),
        "resources_over_time": lambda: resources_over_time(samples, metrics, out_dir),
        "noise_scale": lambda: noise_scale(metrics, out_dir),
        "scaling": lambda: scaling(metrics, out_dir),
    }
    return {name: makers[name]() for name in names}
