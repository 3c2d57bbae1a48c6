"""Every metric definition on synthetic step records with known answers."""

import math

import pytest

from llmpar.metrics import definitions as D


def steps(n, tokens_per_step=100, step_time=0.5, start=2.0, attempt=0, first=1):
    rows, t = [], start
    for s in range(first, first + n):
        t += step_time
        rows.append({"step": s, "loss": 5.0 - 0.1 * s, "tokens": s * tokens_per_step, "samples": s * 2,
                     "step_time_s": step_time, "elapsed_s": t, "attempt": attempt})
    return rows


def test_throughput_steady_and_overall():
    rows = steps(10)
    rows[0]["step_time_s"] = rows[1]["step_time_s"] = 3.0  # slow warm-up steps are excluded from steady state
    tp = D.throughput(rows, warmup=2, seq_len=50, world_size=4)
    assert tp["tokens_per_s"] == pytest.approx(100 / 0.5)
    assert tp["samples_per_s"] == pytest.approx(200 / 50)
    assert tp["tokens_per_s_per_gpu"] == pytest.approx(50)
    assert tp["steady_steps"] == 8
    # overall: all 1000 tokens over the wall time from process start (0) to the end of the last step (7.0 s)
    assert tp["tokens_per_s_overall"] == pytest.approx(1000 / 7.0)


def test_target_reached_between_two_evaluations_takes_the_later_one():
    evals = [{"step": 10, "tokens": 1000, "elapsed_s": 5.0, "val_loss": 4.0},
             {"step": 20, "tokens": 2000, "elapsed_s": 9.0, "val_loss": 3.0},
             {"step": 30, "tokens": 3000, "elapsed_s": 13.0, "val_loss": 2.5}]
    r = D.time_to_target(evals, target=3.5)  # crossed between step 10 and 20: first validation at/below wins
    assert r["target_reached"] is True and r["tokens_to_target"] == 2000 and r["seconds_to_target"] == 9.0
    exact = D.time_to_target(evals, target=3.0)
    assert exact["tokens_to_target"] == 2000


def test_target_never_reached_is_a_value():
    evals = [{"step": 10, "tokens": 1000, "elapsed_s": 5.0, "val_loss": 4.0}]
    r = D.time_to_target(evals, target=1.0)
    assert r["target_reached"] is False and r["tokens_to_target"] is None and r["seconds_to_target"] is None
    assert D.time_to_target(evals, target=None)["target_reached"] is None


def test_val_loss_at_token_budget_interpolates():
    evals = [{"tokens": 1000, "val_loss": 4.0}, {"tokens": 2000, "val_loss": 3.0}]
    assert D.val_loss_at_tokens(evals, 1500) == pytest.approx(3.5)
    assert D.val_loss_at_tokens(evals, 2000) == pytest.approx(3.0)
    assert D.val_loss_at_tokens(evals, 2500) is None


def test_restart_that_repeats_steps():
    """Attempt 0 ran steps 1-7 and died; the checkpoint was at step 5; attempt 1 re-did 6-7 and ran to 10."""
    first = steps(7, start=0.0)
    second = steps(5, first=6, start=first[-1]["elapsed_s"] + 3.0, attempt=1)
    kept, redone = D.dedupe_steps(first + second)
    assert [r["step"] for r in kept] == list(range(1, 11)) and redone == 2
    assert all(r["attempt"] == 1 for r in kept if r["step"] > 5)
    wall = kept[-1]["elapsed_s"]
    # goodput counts applied steps only (10) over the whole wall time, including the lost work and restart
    assert D.goodput(len(kept), wall) == pytest.approx(10 / wall)
    assert D.goodput(len(kept), wall) < len(first + second) / wall


def test_mfu_counts_each_token_once_per_replica():
    fpt = 6e9
    # 8 GPUs, 80k tokens/s in total: 10k tokens/s per GPU x 6 GFLOP / 1e15 = 0.06
    assert D.mfu(80_000, 8, fpt, 1e15) == pytest.approx(0.06)
    assert D.mfu(80_000, 8, fpt, None) is None  # CPU without a configured peak: undefined
    assert D.peak_flops_for("NVIDIA H200", None) == 989e12
    assert D.peak_flops_for("NVIDIA H100 PCIe", None) == 756e12
    assert D.peak_flops_for("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert D.peak_flops_for("cpu", 1e12) == 1e12


def test_flops_per_token_formula():
    from llmpar.shape import flops_per_token, param_counts

    m = {"size": "1B", "seq_len": 2048}
    n = param_counts(m, 32000)["non_embedding"]
    assert flops_per_token(m, 32000) == 6 * n + 6 * 22 * 2048 * 2048
    assert n == param_counts(m, 32000)["total"] - 32000 * 2048


def test_utilization_over_the_steady_window():
    samples = [{"t_s": t / 10, "rank": r, "util_pct": 10.0 if t < 20 else 90.0 + r}
               for t in range(40) for r in (0, 1)]
    u = D.utilization(samples, 2.0, 3.9)
    assert u["util_mean_pct"] == pytest.approx(90.5)
    assert u["util_per_rank"][1]["median"] == pytest.approx(91.0)
    assert D.utilization([{"t_s": 1, "rank": 0, "util_pct": None}], 0, 2)["util_mean_pct"] is None


def test_bubble_fraction():
    assert D.bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert D.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert D.breakdown_shares({"forward": 1.0, "backward": 3.0}) == {"forward": 0.25, "backward": 0.75}
    assert math.isnan(D.goodput(3, 0.0))


def test_ratios_against_the_baseline_and_scaling_efficiency():
    """The ratio columns are the defining quotients; the baseline's are exactly 1; scaling efficiency
    compares per-GPU throughput with the single-process run of the same micro-batch size, or is empty."""
    import pandas as pd

    from llmpar.analysis.aggregate import add_ratios

    df = pd.DataFrame([
        dict(run="single", strategy="single", status="ok", world_size=1, micro_batch_size=16, wall_time_s=100.0,
             tokens_per_s=1000.0, tokens_per_s_per_gpu=1000.0, peak_mem_gib=60.0, final_loss=2.0),
        dict(run="single-mb8", strategy="single", status="ok", world_size=1, micro_batch_size=8, wall_time_s=110.0,
             tokens_per_s=900.0, tokens_per_s_per_gpu=900.0, peak_mem_gib=40.0, final_loss=2.002),
        dict(run="ddp", strategy="data_parallel", status="ok", world_size=2, micro_batch_size=8, wall_time_s=80.0,
             tokens_per_s=1710.0, tokens_per_s_per_gpu=855.0, peak_mem_gib=48.0, final_loss=1.99),
        dict(run="pp", strategy="pipeline_parallel", status="ok", world_size=2, micro_batch_size=4,
             wall_time_s=70.0, tokens_per_s=1500.0, tokens_per_s_per_gpu=750.0, peak_mem_gib=20.0, final_loss=2.0),
        dict(run="oom", strategy="data_parallel", status="oom", world_size=2, micro_batch_size=16, wall_time_s=5.0,
             tokens_per_s=None, tokens_per_s_per_gpu=None, peak_mem_gib=None, final_loss=None),
    ])
    r = add_ratios(df, "single").set_index("run")
    assert (r.loc["single", ["time_reduction_x", "throughput_increase_x", "memory_reduction_x",
                             "scaling_efficiency"]] == 1.0).all()
    assert r.loc["ddp", "time_reduction_x"] == 100.0 / 80.0
    assert r.loc["ddp", "throughput_increase_x"] == 1710.0 / 1000.0
    assert r.loc["ddp", "memory_reduction_x"] == 60.0 / 48.0
    assert r.loc["ddp", "scaling_efficiency"] == 855.0 / 900.0  # against single-mb8, not single
    assert r.loc["ddp", "final_loss_rel_gap"] == abs(1.99 - 2.0) / 2.0
    assert pd.isna(r.loc["pp", "scaling_efficiency"])  # no single run at micro-batch 4
    assert r.loc["oom", ["scaling_efficiency", "throughput_increase_x"]].isna().all()


def test_bubble_measured_is_the_mean_idle_share_of_the_schedule():
    ranks = [{"forward": 1.0, "backward": 2.0, "pipeline_idle": 1.0, "optimizer": 5.0, "grad_sync": 1.0},
             {"forward": 1.0, "backward": 3.0, "pipeline_idle": 0.0, "optimizer": 5.0, "grad_sync": 1.0}]
    assert D.bubble_measured(ranks) == (0.25 + 0.0) / 2  # optimizer and gradient sync are outside the schedule
    assert D.bubble_measured([{"forward": 1.0, "backward": 2.0, "optimizer": 1.0}, None]) is None
