"""The plan's time to a target (llmpar.plan.efficiency): the sweep's S(B) at a layout's batch in tokens, the
smallest batch a layout can train and why, and the time to the target beyond the critical batch."""

import pytest

from llmpar.config import prepare
from llmpar.layout import RunSpec
from llmpar.plan.efficiency import at_smallest_batch, smallest_batch, steps_to_target, time_to_target
from llmpar.plan.extrapolate import predict_row

EFF = {"s_min": 100.0, "e_min_tokens": 1_000_000.0}  # B_crit 10,000 tokens


def test_steps_follow_the_fit():
    assert steps_to_target(EFF, 10_000) == pytest.approx(200.0)  # twice S_min at the critical batch
    assert steps_to_target(EFF, 1e9) == pytest.approx(100.0, rel=1e-2)  # far beyond it: S_min
    assert time_to_target(EFF, 10_000, 0.5) == {"predicted_steps_to_target": 200.0, "predicted_time_to_target_s": 100.0}


def _spec(entry):
    cfg = prepare({"train": {"global_batch": 16}, "runs": {"r": entry}, "baseline": "r"})
    return RunSpec.from_dict(cfg["runs"]["r"]), cfg


def test_smallest_batch_of_a_layout():
    ddp, _ = _spec({"strategy": "data_parallel", "gpus_per_node": 4})
    assert smallest_batch(ddp)[0] == 4
    pp, cfg = _spec({"strategy": "hybrid_parallel", "stages": 2, "gpus_per_node": 4, "pp_engine": "torch"})
    batch, why = smallest_batch(pp)
    assert batch == 2 * 4 and "micro-batches" in why  # 2 replicas x max(4, 2 x 2) micro-batches
    small = at_smallest_batch("r", pp, cfg["model"], cfg["train"])
    assert (small.global_batch, small.micro_batch_size, small.stages, small.dp) == (8, 1, 2, 2)


def test_beyond_the_critical_batch_more_gpus_barely_shorten_the_time():
    """Weak scaling: from 8 to 1024 GPUs the batch grows 128-fold and far past B_crit, so the steps to the
    target fall only towards S_min, while the time per step stays: the time to the target barely moves."""
    small = predict_row("1.1B", "fsdp", 8, "h100", efficiency=EFF)
    large = predict_row("1.1B", "fsdp", 1024, "h100", efficiency=EFF)
    assert small["predicted_steps_to_target"] > large["predicted_steps_to_target"] >= EFF["s_min"]
    assert large["predicted_steps_to_target"] < 1.01 * EFF["s_min"]
    assert large["predicted_time_to_target_s"] == pytest.approx(
        large["predicted_steps_to_target"] * large["predicted_step_s"])
