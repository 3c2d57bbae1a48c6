"""Run directories -> study tables (pandas): metrics.csv (a row per run), steps.csv, evals.csv, samples.csv.

Aggregation refuses, with a clear error naming the file and the run, a run directory whose record is
missing, damaged or incomplete (:func:`llmpar.record.read_run`): nothing partial is ever taken as a result.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llmpar.errors import UserError
from llmpar.io import atomic_path
from llmpar.layout import RunSpec
from llmpar.metrics.noise_scale import pollux
from llmpar.record import IncompleteRun, RunRecord, read_run

# The seed's comparison, per run against the baseline (see DEFINITIONS in the report).
RATIO_DEFINITIONS = {
    "time_reduction_x": "baseline wall_time_s / run wall_time_s (> 1: the run finished the same training sooner); "
                        "wall time includes start-up and compilation (runs.csv's time budget), so in short runs it "
                        "differs from throughput_increase_x",
    "throughput_increase_x": "run tokens_per_s / baseline tokens_per_s (steady state)",
    "memory_reduction_x": "baseline peak_mem_gib / run peak_mem_gib (peak per rank, max over ranks)",
    "scaling_efficiency": "run tokens_per_s_per_gpu / tokens_per_s_per_gpu of the study's completed single-process "
                          "run with the same micro_batch_size (empty when there is none): 1.0 is perfect scaling",
    "final_loss_rel_gap": "|run final_loss - baseline final_loss| / baseline final_loss (same training: ~0)",
    "step_loss_gap_max": "the largest |run loss - baseline loss| / baseline loss over the run's steady steps (each "
                         "step's training loss in steps.jsonl), for runs of the baseline's global batch and step "
                         "count (empty for others: they train other batches); the same arithmetic: 0, the same "
                         "training with other rounding (another engine in bf16): about 1e-3 to 1e-2 a step, several "
                         "times that at a loss spike",
    "step_loss_gap_step": "the step of step_loss_gap_max",
}


def metrics_row(rec: RunRecord, reference_batch: int) -> dict:
    """One run's row of metrics.csv; Pollux's efficiency and goodput against the study's reference batch."""
    s = rec.to_json()
    spec = s.get("spec") or {}
    global_batch = RunSpec.from_dict(spec).global_batch if spec else rec.global_batch
    per_rank = s.get("per_rank") or []
    states = [r.get("state_bytes") or {} for r in per_rank]
    gib = 2**30

    def state_max(key):
        vals = [st.get(key) for st in states if st.get(key) is not None]
        return max(vals) / gib if vals else None

    engine = str(RunSpec.from_dict(spec).engine) if spec else None
    breakdown = s.get("time_breakdown") or {}
    return {
        "run": s["run"],
        "strategy": s["strategy"],
        "engine": engine,
        "status": s["status"],
        "message": s.get("message", ""),
        "world_size": s["world_size"],
        "nodes": s.get("nodes", spec.get("nodes")),
        "gpus_per_node": s.get("gpus_per_node", spec.get("gpus_per_node")),
        "tp": spec.get("tp"),
        "stages": spec.get("stages"),
        "dp": spec.get("dp"),
        "micro_batches": spec.get("micro_batches"),
        "micro_batch_size": spec.get("micro_batch_size"),
        "global_batch": global_batch,
        "schedule": spec.get("schedule") if spec.get("stages", 1) > 1 or s["strategy"] == "pipeline_parallel" else None,
        "zero_stage": spec.get("zero_stage"),
        "precision": spec.get("precision"),
        "activation_checkpointing": spec.get("activation_checkpointing"),
        "compile": spec.get("compile"),
        "device": s.get("device"),
        "steps_completed": s.get("steps_completed"),
        "steady_steps": s.get("steady_steps"),
        "wall_time_s": s.get("wall_time_s"),
        "tokens_per_s": s.get("tokens_per_s"),
        "tokens_per_s_overall": s.get("tokens_per_s_overall"),
        "samples_per_s": s.get("samples_per_s"),
        "samples_per_s_overall": s.get("samples_per_s_overall"),
        "tokens_per_s_per_gpu": s.get("tokens_per_s_per_gpu"),
        "goodput_steps_per_s": s.get("goodput_steps_per_s"),
        "gradient_noise_scale": s.get("gradient_noise_scale"),
        "gradient_noise_scale_mean": s.get("gradient_noise_scale_mean"),
        "gradient_noise_scale_se": s.get("gradient_noise_scale_se"),
        **pollux(rec.gradient_noise_scale, global_batch, reference_batch, rec.tokens_per_s, rec.noise_scale_reason),
        "noise_scale_reason": s.get("noise_scale_reason"),
        "peak_mem_gib": s.get("peak_mem_gib"),
        "memory_kind": s.get("memory_kind"),
        "peak_reserved_gib": s.get("peak_reserved_gib"),
        "device_mem_used_gib": s.get("device_mem_used_gib"),
        "params_gib_per_rank": state_max("params"),
        "grads_gib_per_rank": state_max("grads"),
        "optimizer_gib_per_rank": state_max("optimizer"),
        # summaries written before the peak measurement (e.g. results/h200-1b) measured after the last
        # step, when gradients are already freed
        "state_bytes_at": (s.get("state_bytes_at") or "after_last_step") if states else None,
        "local_params_rank0": per_rank[0].get("local_params") if per_rank else None,
        "final_loss": s.get("final_loss"),
        "final_val_loss": s.get("final_val_loss"),
        "final_val_ppl": s.get("final_val_ppl"),
        "target_loss": s.get("target_loss"),
        "target_reached": s.get("target_reached"),
        "tokens_to_target": s.get("tokens_to_target"),
        "step_to_target": s.get("step_to_target"),
        "stopped_at_target": s.get("stopped_at_target"),
        "seconds_to_target": s.get("seconds_to_target"),
        "mfu": s.get("mfu"),
        "util_mean_pct": s.get("util_mean_pct"),
        "util_median_pct": s.get("util_median_pct"),
        "utilization_kind": s.get("utilization_kind"),
        "forward_share": breakdown.get("forward"),
        "backward_share": breakdown.get("backward"),
        "optimizer_share": breakdown.get("optimizer"),
        "bubble_theoretical": s.get("bubble_theoretical"),
        "bubble_measured": s.get("bubble_measured"),
        "attempts": s.get("attempts"),
        "redone_steps": s.get("redone_steps"),
        "started_at": s.get("started_at"),
        "finished_at": s.get("finished_at"),
        **{f"val_loss_at_{k}_tokens": v for k, v in (s.get("val_loss_at_tokens") or {}).items()},
    }


def add_ratios(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    if baseline not in set(df["run"]):
        raise UserError(f"baseline run '{baseline}' is not among the aggregated runs")
    base = df.set_index("run").loc[baseline]
    ok = df["status"] == "ok"
    if base["status"] != "ok":
        for col in RATIO_DEFINITIONS:
            df[col] = None
        return df
    df["time_reduction_x"] = (base["wall_time_s"] / df["wall_time_s"]).where(ok)
    df["throughput_increase_x"] = (df["tokens_per_s"] / base["tokens_per_s"]).where(ok)
    df["memory_reduction_x"] = (base["peak_mem_gib"] / df["peak_mem_gib"]).where(ok)
    df["final_loss_rel_gap"] = ((df["final_loss"] - base["final_loss"]).abs() / base["final_loss"]).where(ok)
    singles = df[ok & (df["world_size"] == 1) & (df["strategy"] == "single")]
    per_mbs = singles.groupby("micro_batch_size")["tokens_per_s_per_gpu"].first()
    reference = df["micro_batch_size"].map(per_mbs)
    df["scaling_efficiency"] = (df["tokens_per_s_per_gpu"] / reference).where(ok & reference.notna())
    return df


def of_baselines_batches(df: pd.DataFrame, baseline: str) -> pd.Series:
    """Per row of a metrics table (``run``, ``global_batch``, ``steps_completed``), whether the run trains the
    baseline's batches: its global batch for its number of steps (a batch sweep's other points do not)."""
    base = df.loc[df["run"] == baseline].iloc[0]
    return (df["global_batch"] == base["global_batch"]) & (df["steps_completed"] == base["steps_completed"])


def add_step_loss_gaps(df: pd.DataFrame, steps: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """``step_loss_gap_max`` and ``step_loss_gap_step`` (RATIO_DEFINITIONS) of each completed run that trains the
    baseline's batches, from the study's step rows (``steps``: run, step, loss)."""
    df["step_loss_gap_max"], df["step_loss_gap_step"] = None, None
    if df.loc[df["run"] == baseline, "status"].iloc[0] != "ok" or steps.empty:
        return df
    losses = steps.set_index(["run", "step"])["loss"]
    base_loss = losses.loc[baseline]
    compared = of_baselines_batches(df, baseline)
    for i, r in df.iterrows():
        if r["status"] != "ok" or not compared[i] or not r["steady_steps"]:
            continue
        own = losses.loc[r["run"]]
        steady = own.index[own.index > r["steps_completed"] - r["steady_steps"]]
        gap = ((own.loc[steady] - base_loss.reindex(steady)).abs() / base_loss.reindex(steady)).dropna()
        if len(gap):
            df.at[i, "step_loss_gap_max"] = float(gap.max())
            df.at[i, "step_loss_gap_step"] = int(gap.idxmax()) if gap.max() > 0 else None
    return df


def aggregate(runs_dir: str | Path, runs: list[str], baseline: str, out_dir: str | Path,
              reference_batch: int) -> pd.DataFrame:
    """The study's tables from its run directories; ``reference_batch``: Pollux's M0
    (``train.pollux_reference_batch``)."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    loaded = {r: read_run(runs_dir / r) for r in runs}
    df = add_ratios(pd.DataFrame([metrics_row(v["record"], reference_batch) for v in loaded.values()]), baseline)
    steps = pd.DataFrame([{"run": r, **row} for r, v in loaded.items() for row in v["steps"]])
    evals = pd.DataFrame([{"run": r, **row} for r, v in loaded.items() for row in v["evals"]])
    samples = pd.DataFrame([{"run": r, **row} for r, v in loaded.items() for row in v["samples"]])
    if not steps.empty and steps.duplicated(["run", "step"]).any():
        dup = steps[steps.duplicated(["run", "step"], keep=False)][["run", "step"]].head()
        raise IncompleteRun(f"duplicate (run, step) rows in the step records:\n{dup}")
    df = add_step_loss_gaps(df, steps, baseline)
    for name, frame, cols in (
        ("metrics.csv", df, None),
        ("steps.csv", steps, ["run", "step", "loss", "tokens", "samples", "elapsed_s", "step_time_s", "lr", "attempt"]),
        ("evals.csv", evals, ["run", "step", "tokens", "elapsed_s", "val_loss", "val_ppl"]),
        ("samples.csv", samples, ["run", "rank", "t_s", "mem_gib", "util_pct"]),
    ):
        if frame.empty and cols:
            frame = pd.DataFrame(columns=cols)
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    return df


def read_table(path) -> pd.DataFrame:
    """Read a study table back: only empty cells are missing (a run may be called 'nan' or 'null')."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"run": str, "message": str})


def study_wall_time(df: pd.DataFrame) -> dict:
    """Study wall time: span from the first run's start to the last run's end, and the sum of run times."""
    span = None
    if df["started_at"].notna().any() and df["finished_at"].notna().any():
        span = float(df["finished_at"].max() - df["started_at"].min())
    return {"study_span_s": span, "sum_of_run_wall_times_s": float(df["wall_time_s"].fillna(0).sum())}
