"""The extrapolation table (llmpar.plan.extrapolate): properties the model must have at any scale, not
its numbers (nothing there is measured)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmpar import plan
from llmpar.cli import plan_study
from llmpar.plan import extrapolate as pe
from llmpar.plan.calibration import write_csv
from llmpar.plan.step import step_time
from llmpar.shape import shape_of

CARD = "h100"


@pytest.fixture(scope="module")
def table():
    return pe.extrapolate(CARD)


def series(shape, strategy, key, micro_batch_size="auto"):
    return [pe.predict_row(shape, strategy, w, CARD, micro_batch_size)[key] for w in pe.WORLDS]


def test_every_strategy_shape_and_size_has_a_row(table):
    assert len(table) == len(pe.SHAPES) * len(pe.STRATEGIES) * len(pe.WORLDS)
    gpn = plan.card(CARD)["cluster"]["gpus_per_node"]
    for r in table:
        if r["layout"] == "–":  # only a single pipeline longer than the model
            assert r["strategy"] == "pipeline" and "layers" in r["note"], r
            continue
        run, _, _ = pe.resolve_layout(r["shape"], r["strategy"], r["gpus"], CARD, r["micro_batch_size"])
        assert run.tp * run.stages * run.dp == r["gpus"] == run.nodes * run.gpus_per_node
        assert run.tp <= gpn  # tensor parallel stays inside a node
        assert math.isfinite(r["predicted_peak_gib"]) and r["predicted_peak_gib"] > 0
        assert r["global_batch"] * r["seq_len"] == r["gpus"] * pe.TOKENS_PER_GPU
        if r["predicted_fits"]:
            assert r["predicted_peak_gib"] <= (1 - plan.FIT_MARGIN) * plan.card(CARD)["memory_gib"]
            for key in ("predicted_step_s", "predicted_tokens_per_s_per_gpu"):
                assert math.isfinite(r[key]) and r[key] > 0, (key, r)
            assert 0 < r["predicted_mfu"] < 1 and 0 <= r["predicted_comm_share"] < 1, r
        else:
            assert r["micro_batch_size"] == 1 and math.isnan(r["predicted_step_s"]), r


def test_inter_node_groups_follow_the_rank_order(table):
    one_node = [r for r in table if r["gpus"] == 8 and r["layout"] != "–"]
    assert all(r["inter_node"] == "none" for r in one_node)
    for r in table:
        if r["gpus"] > 8 and r["layout"] != "–":
            assert "dp" in r["inter_node"] and "tp" not in r["inter_node"], r


@pytest.mark.parametrize("shape", list(pe.SHAPES))
@pytest.mark.parametrize("strategy", ["fsdp", "zero1", "zero2", "zero3"])
def test_sharding_lowers_memory_per_rank(shape, strategy):
    """At one micro-batch size, a rank's peak falls as the sharding degree grows; replication keeps it."""
    peaks = series(shape, strategy, "predicted_peak_gib", micro_batch_size=1)
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks
    ddp = series(shape, "data_parallel", "predicted_peak_gib", micro_batch_size=1)
    assert max(ddp) == pytest.approx(min(ddp)) and ddp[0] > peaks[0]


def test_data_parallel_step_grows_with_the_inter_node_all_reduce():
    """Weak scaling: the same work per GPU, so DDP's step grows only by its all-reduce, which leaves NVLink
    past one node and approaches 2 x the gradient bytes over the inter-node link."""
    steps = series("1.1B", "data_parallel", "predicted_step_s")
    shares = series("1.1B", "data_parallel", "predicted_comm_share")
    assert all(a <= b for a, b in zip(steps, steps[1:])) and steps[1] > steps[0]
    assert all(a <= b for a, b in zip(shares, shares[1:])) and shares[1] > 5 * shares[0]
    cl = plan.card(CARD)["cluster"]
    assert cl["inter_node_busbw_gbps"] < plan.card(CARD)["link_busbw_gbps"]


@pytest.mark.parametrize("shape,strategy,world", [("1.1B", "pipeline", 8), ("8B", "pipeline", 8),
                                                  ("1.1B", "hybrid_pp_dp", 64), ("8B", "3d_pp_tp_dp", 512)])
def test_pipeline_bubble_is_the_schedules(shape, strategy, world):
    """The bubble the step holds is (p-1)/(m+p-1) of its compute slots (1F1B, one chunk per rank)."""
    run, cfg, _ = pe.resolve_layout(shape, strategy, world, CARD)
    p, m = run.stages, run.micro_batches
    sh = shape_of(pe.SHAPES[shape], pe.SHAPES[shape]["vocab_size"])
    t = step_time(sh, run, True, plan.card(CARD))
    assert p > 1 and t["bubble"] == pytest.approx((p - 1) / (m + p - 1))
    assert pe.predict_row(shape, strategy, world, CARD)["predicted_bubble"] == t["bubble"]
    per_slot = ("gemm", "attention", "elementwise", "micro_batch_fixed", "tp_comm", "pp_p2p")
    busy = sum(t["parts"][k] for k in per_slot)
    assert busy * (1 - t["bubble"]) == pytest.approx(m * t["micro_batch_s"])


def test_assumptions_state_the_bandwidths():
    text = " ".join(pe.assumptions(CARD))
    cl = plan.card(CARD)["cluster"]
    assert f"{cl['inter_node_busbw_gbps']} GB/s" in text and f"{plan.card(CARD)['link_busbw_gbps']} GB/s" in text
    assert "never measured" in text and "8192" in text


def test_report_section_is_labelled_and_cpu_has_none(tmp_path):
    """A GPU study's section shows the table as model output with its assumptions; a study without a card
    (the CPU default) says the plan is not calibrated for CPU and predicts nothing."""
    from llmpar.analysis.report import plan_context
    from llmpar.config import load_yaml, prepare

    ext = tmp_path / "extrapolation.csv"
    write_csv(pe.extrapolate(CARD, shapes=("1.1B",), worlds=(8, 64), strategies=("fsdp", "pipeline")), ext)
    out = tmp_path / "plan.csv"
    preset = Path(__file__).parents[1] / "configs/gpu2-1b.yaml"
    plan_study(str(preset), out=str(out))
    config = prepare(load_yaml(preset))
    assert config["train"]["card"] == CARD
    ctx = plan_context(config, {"plan": out, "extrapolation": ext}, tmp_path, 4)
    text = " ".join(ctx["assumptions"])
    assert "never measured" in text and "45 GB/s" in text
    assert "pp 2 × dp 1" not in ctx["extrapolation_table"] and "dp 64" in ctx["extrapolation_table"]
    cpu = plan_context({"train": {"card": None}}, {}, tmp_path, 4)
    assert "not calibrated for CPU" in cpu["no_card"] and cpu.get("extrapolation_table") is None
