"""The statistical-efficiency experiment: steps and tokens to a validation-loss target across global batch sizes,
and the empirical model of large-batch training fitted to them (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", section 2.2 and appendix D).

For each run (one global batch B, in sequences) the steps S and sequences E = S·B it takes to first reach the
target are read from its validation curve, interpolated linearly between the two evaluations that bracket the
target (:func:`crossing`). The model says (S/S_min − 1)(E/E_min − 1) = 1, i.e. S(B) = S_min + E_min / B: linear
in 1/B, so a least-squares line through (1/B, S) gives S_min (intercept) and E_min (slope), weighted by 1/S² so
that every batch counts by its relative error (:func:`fit`). The critical batch B_crit = E_min / S_min is the
batch at which training takes twice the minimum steps and twice the minimum data. McCandlish et al. predict
B_crit ≈ B_simple, the simple gradient noise scale measured during training (:mod:`llmpar.metrics.noise_scale`);
:func:`noise_scale_before` averages it over the measured steps of the second half of each run's way to the
target, and the sweep's value is the inverse-variance mean over the runs.

Pollux's efficiency E(M) = (B_noise + M0) / (B_noise + M) (:func:`llmpar.metrics.noise_scale.pollux_efficiency`)
predicts the ratio of sequences to target E(M0) / E(M) from the noise scale; the table sets it beside the ratio
measured (with E(M0) from the fit where M0 is not a batch of the sweep).
"""

from __future__ import annotations

import math

from llmpar.metrics.noise_scale import pollux_efficiency, ratio_with_error, two_batch_estimates


def crossing(evals: list[dict], target: float) -> float | None:
    """The (fractional) step at which the validation loss first reaches ``target``: linear between the last
    evaluation above it and the first at or below it; None if no evaluation reaches it."""
    rows = sorted(evals, key=lambda e: e["step"])
    prev = None
    for e in rows:
        if e["val_loss"] <= target:
            if prev is None or prev["val_loss"] == e["val_loss"]:
                return float(e["step"])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return prev["step"] + frac * (e["step"] - prev["step"])
        prev = e
    return None


def fit(points: list[tuple[float, float]]) -> dict:
    """S = S_min + E_min / B through points (B, S) (batch in sequences, steps), least squares weighted by 1/S²:
    returns s_min, e_min (sequences), b_crit = e_min / s_min, and the fit's largest relative residual."""
    if len(points) < 3:
        raise ValueError(f"the fit needs at least 3 batch sizes, got {len(points)}")
    w = [1.0 / s**2 for _, s in points]
    x = [1.0 / b for b, _ in points]
    y = [s for _, s in points]
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y))
    e_min = sxy / sxx
    s_min = my - e_min * mx
    residual = max(abs(s_min + e_min / b - s) / s for b, s in points)
    return {"s_min": s_min, "e_min": e_min, "b_crit": e_min / s_min if s_min > 0 else math.nan,
            "max_rel_residual": residual}


def noise_scale_before(steps: list[dict], local_sq: list[dict], global_batch: int, small_batch: int,
                       until_step: float) -> tuple[float, float] | None:
    """B_simple (ratio of the mean per-step estimates, and its standard error) over the measured steps in the
    second half of the way to ``until_step``; ``local_sq``: each rank's {step: the small batch's squared norm}."""
    samples = []
    for r in steps:
        step = r["step"]
        if not until_step / 2 <= step <= until_step or r.get("grad_norm") is None:
            continue
        if any(str(step) not in ranks and step not in ranks for ranks in local_sq):
            continue
        small_sq = sum(ranks.get(str(step), ranks.get(step)) for ranks in local_sq) / len(local_sq)
        samples.append(two_batch_estimates(small_sq, r["grad_norm"] ** 2, small_batch, global_batch))
    return ratio_with_error(samples)


def inverse_variance_mean(values: list[tuple[float, float]]) -> tuple[float, float] | None:
    values = [(v, se) for v, se in values if se and se > 0 and math.isfinite(v)]
    if not values:
        return None
    w = [1 / se**2 for _, se in values]
    mean = sum(wi * v for wi, (v, _) in zip(w, values)) / sum(w)
    return mean, math.sqrt(1 / sum(w))


def analyse(runs: list[dict], target: float, seq_len: int, reference_batch: int) -> dict:
    """The sweep at ``target``. ``runs``: per run {run, global_batch, small_batch, evals, steps, local_sq}.
    Returns {"rows": per-run table rows, "fit": the fitted model with B_simple beside it}."""
    rows, points, noise = [], [], []
    for r in sorted(runs, key=lambda r: r["global_batch"]):
        b = r["global_batch"]
        s = crossing(r["evals"], target)
        row = {"run": r["run"], "global_batch": b, "reached": s is not None, "steps_to_target": s,
               "sequences_to_target": s * b if s is not None else None,
               "tokens_to_target_interp": s * b * seq_len if s is not None else None,
               "b_simple": None, "b_simple_se": None}
        if s is not None:
            points.append((b, s))
            ns = noise_scale_before(r["steps"], r["local_sq"], b, r["small_batch"], s) if r["small_batch"] else None
            if ns is not None:
                row["b_simple"], row["b_simple_se"] = ns
                noise.append(ns)
        rows.append(row)
    out = {"target_loss": target, "batches": len(rows), "reached": len(points), "reference_batch": reference_batch}
    if len(points) >= 3:
        out.update(fit(points))
    simple = inverse_variance_mean(noise)
    out["b_simple"], out["b_simple_se"] = simple if simple else (None, None)
    if out.get("b_crit") and out["b_simple"]:
        out["b_crit_over_b_simple"] = out["b_crit"] / out["b_simple"]
    # Pollux's prediction against the measured ratio of sequences to target, both relative to M0
    e_ref = next((row["sequences_to_target"] for row in rows if row["global_batch"] == reference_batch
                  and row["reached"]), None)
    if e_ref is None and "s_min" in out:
        e_ref = out["s_min"] * reference_batch + out["e_min"]  # E(B) = S(B)·B = S_min·B + E_min
    for row in rows:
        row["pollux_predicted"] = (pollux_efficiency(out["b_simple"], row["global_batch"], reference_batch)
                                   if out["b_simple"] else None)
        row["efficiency_measured"] = e_ref / row["sequences_to_target"] if e_ref and row["reached"] else None
        if "s_min" in out:
            row["fit_steps"] = out["s_min"] + out["e_min"] / row["global_batch"]
    return {"rows": rows, "fit": out}


def study_runs(cfg: dict, runs_dir) -> list[dict]:
    """The inputs :func:`analyse` takes, from a study's run directories (every ``ok`` run)."""
    from pathlib import Path

    from llmpar.layout import RunSpec
    from llmpar.record import read_run

    out = []
    for name in cfg["runs"]:
        run = read_run(Path(runs_dir) / name)
        rec = run["record"]
        if rec.status != "ok":
            continue
        out.append({"run": name, "global_batch": RunSpec.from_dict(rec.spec).global_batch,
                    "small_batch": rec.noise_scale_small_batch, "evals": run["evals"], "steps": run["steps"],
                    "local_sq": [r.get("local_grad_sq") or {} for r in rec.per_rank or []]})
    return out


def is_sweep(cfg: dict) -> bool:
    """A study the experiment applies to: a validation-loss target and runs at three or more global batches."""
    from llmpar.layout import RunSpec

    batches = {RunSpec.from_dict(spec).global_batch for spec in cfg["runs"].values()}
    return cfg["train"]["target_loss"] is not None and len(batches) >= 3


def targets(cfg: dict, runs: list[dict]) -> list[float]:
    """The stated target, and higher losses every 0.25 nats up to the highest loss every run's first evaluation
    is above (B_crit as the loss falls, McCandlish et al.'s Fig. 7)."""
    target = cfg["train"]["target_loss"]
    first = min((min(r["evals"], key=lambda e: e["step"])["val_loss"] for r in runs if r["evals"]), default=target)
    out, loss = [target], target + 0.25
    while loss < first:
        out.append(round(loss, 4))
        loss += 0.25
    return out


def write_tables(cfg: dict, runs_dir, table_csv, fit_csv, figure_dir) -> str:
    """The workflow's batch-sweep step: the per-run table at the stated target, the fit at every target, and
    the figure (PNG and SVG). Returns a printed summary."""
    from pathlib import Path

    from llmpar.plan.calibration import write_csv

    runs = study_runs(cfg, runs_dir)
    seq, m0 = cfg["model"]["seq_len"], cfg["train"]["pollux_reference_batch"]
    results = [analyse(runs, t, seq, m0) for t in targets(cfg, runs)]
    main = results[0]
    write_csv(main["rows"], Path(table_csv))
    write_csv([r["fit"] for r in results], Path(fit_csv))
    plot(main, [r["fit"] for r in results], Path(figure_dir))
    f = main["fit"]
    return (f"target {f['target_loss']}: {f['reached']} of {f['batches']} batches reached it; "
            f"B_crit {f.get('b_crit', math.nan):.1f}, B_simple {f['b_simple'] or math.nan:.1f} sequences")


def plot(main: dict, fits: list[dict], out_dir) -> None:
    """Left: steps against sequences to the target (the Pareto front) with the fitted hyperbola; right: B_crit
    and B_simple against the target loss."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmpar.io import atomic_path

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in main["rows"] if r["reached"]]
    ax.scatter([r["sequences_to_target"] for r in rows], [r["steps_to_target"] for r in rows], color="C0", zorder=3,
               label="runs (interpolated crossing)")
    for r in rows:
        ax.annotate(f"B={r['global_batch']}", (r["sequences_to_target"], r["steps_to_target"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    f = main["fit"]
    if "s_min" in f:
        lo, hi = min(r["global_batch"] for r in rows) / 2, max(r["global_batch"] for r in rows) * 2
        bs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
        ax.plot([f["s_min"] * b + f["e_min"] for b in bs], [f["s_min"] + f["e_min"] / b for b in bs], color="C1",
                label=f"fit: S_min {f['s_min']:.0f}, E_min {f['e_min']:.0f}, B_crit {f['b_crit']:.1f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sequences to target (E)")
    ax.set_ylabel("optimizer steps to target (S)")
    ax.set_title(f"validation loss {f['target_loss']}")
    ax.legend(fontsize=8, loc="upper right")
    with_fit = [g for g in fits if g.get("b_crit") and math.isfinite(g["b_crit"])]
    bx.plot([g["target_loss"] for g in with_fit], [g["b_crit"] for g in with_fit], "o-", label="B_crit (fit)")
    noisy = [g for g in fits if g.get("b_simple")]
    bx.errorbar([g["target_loss"] for g in noisy], [g["b_simple"] for g in noisy],
                yerr=[g["b_simple_se"] or 0 for g in noisy], fmt="s--", label="B_simple (measured)")
    bx.set_yscale("log")
    bx.yaxis.set_major_formatter(plain)
    bx.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    bx.invert_xaxis()
    bx.set_xlabel("target validation loss (training proceeds to the right)")
    bx.set_ylabel("batch (sequences)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        with atomic_path(out_dir / f"batch_sweep.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=130)
    plt.close(fig)


def efficiency_of(config_path) -> dict:
    """The statistical-efficiency model a study takes from a recorded sweep (``sweep_from``): the fit at the
    sweep's target, with E_min in tokens (llmpar.plan.efficiency)."""
    from llmpar.config import load_yaml, prepare
    from llmpar.paths import REPO_ROOT

    cfg = prepare(load_yaml(config_path))
    out = analyse(study_runs(cfg, REPO_ROOT / "results" / cfg["study"] / "runs"), cfg["train"]["target_loss"],
                  cfg["model"]["seq_len"], cfg["train"]["pollux_reference_batch"])["fit"]
    if "s_min" not in out:
        raise ValueError(f"{config_path}: fewer than 3 batches reached the target, no fit")
    seq = cfg["model"]["seq_len"]
    return {"study": cfg["study"], "target_loss": out["target_loss"], "s_min": out["s_min"],
            "e_min_tokens": out["e_min"] * seq, "b_crit_tokens": out["b_crit"] * seq}
