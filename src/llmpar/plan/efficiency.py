"""Steps to a target from the measured batch-size sweep: the time to a target a layout is predicted to take.

A study names a recorded batch-size sweep (``sweep_from``: its preset, e.g. ``configs/batch-sweep.yaml``;
:mod:`llmpar.analysis.batch_sweep` fits it). The fit S(B) = S_min + E_min / B (McCandlish et al. 2018) gives the
optimizer steps to the sweep's target at a global batch of B tokens, and a layout's time to that target is
S(B) × its step time: a layout that needs a larger batch takes fewer steps, each longer, and beyond the critical
batch hardly fewer. The sweep's model and corpus are not the study's: the steps transfer as a function of tokens
per batch, which assumes that the critical batch in tokens depends on the loss reached, not on the model
(Kaplan et al. 2020, section 5.1); the numbers rank layouts, they do not predict a particular model's training.
"""

from __future__ import annotations

import math

from llmpar.layout import RunSpec, default_micro_batches, resolve


def steps_to_target(efficiency: dict, batch_tokens: float) -> float:
    """S(B) at a global batch of ``batch_tokens`` tokens; ``efficiency``: s_min and e_min_tokens of the fit."""
    return efficiency["s_min"] + efficiency["e_min_tokens"] / batch_tokens


def smallest_batch(run: RunSpec) -> tuple[int, str]:
    """The smallest global batch (sequences) the layout can train, and why: one sequence per data-parallel
    replica, times the micro-batches a pipeline needs to keep its bubble small."""
    if run.pipelined:
        m = default_micro_batches(run.stages, True)
        return run.dp * m, (f"{run.dp} replica{'s' if run.dp > 1 else ''} x {m} micro-batches of 1 sequence "
                            f"(a pipeline of {run.stages} stage{'s' if run.stages > 1 else ''} keeps its bubble at "
                            f"most (p-1)/(m+p-1) with m >= max(4, 2p))")
    return run.dp, f"one sequence per data-parallel replica ({run.dp})"


def at_smallest_batch(name: str, run: RunSpec, model: dict, train: dict) -> RunSpec:
    """The layout resolved at its smallest global batch, one sequence per micro-batch."""
    gb, _ = smallest_batch(run)
    entry = {"strategy": run.strategy, "nodes": run.nodes, "gpus_per_node": run.gpus_per_node, "tp": run.tp,
             "stages": run.stages, "global_batch": gb, "micro_batch_size": 1, "precision": run.precision,
             "compile": run.compile, "activation_checkpointing": run.activation_checkpointing}
    if run.pipelined:
        entry["schedule"] = run.schedule
    if run.preset.zero:
        entry["zero_stage"] = run.zero_stage
    entry.update({key: getattr(run, key) for key in run.preset.engine_keys})
    return resolve(name, entry, model, {**train, "eval_batch": None})


def time_to_target(efficiency: dict, batch_tokens: float, step_s: float) -> dict:
    steps = steps_to_target(efficiency, batch_tokens)
    return {"predicted_steps_to_target": steps,
            "predicted_time_to_target_s": steps * step_s if math.isfinite(step_s) else math.nan}
