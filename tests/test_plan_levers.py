"""Which per-run levers the plan has checked against recorded runs, and the reason it gives for the others
instead of an unbounded number."""

import pytest

from llmpar.config import load_yaml, prepare, run_config
from llmpar.paths import REPO_ROOT
from llmpar.plan import predict
from llmpar.plan.calibration import format_predictions
from llmpar.plan.cards import card
from llmpar.shape import shape_of


def _rc(**lever):
    raw = load_yaml(REPO_ROOT / "configs" / "gpu1-1b-levers.yaml")
    raw["runs"] = {"r": {"strategy": "single", "micro_batch_size": 16, **lever}}
    raw["baseline"] = "r"
    return run_config(prepare(raw), "r")


@pytest.mark.parametrize("lever", [{}, {"activation_checkpointing": "full"}, {"compile": False},
                                   {"fused_projections": True}, {"mlp": "quack"}, {"precision": "bf16-master"},
                                   {"norm": "quack"}])
def test_checked_levers_are_modelled(lever):
    rc = _rc(**lever)
    assert predict(rc["model"], 32000, rc["run"], rc["train"], "h200")["unmodelled"] == []


@pytest.mark.parametrize("lever, why", [
    ({"activation_checkpointing": "selective"}, "selective activation checkpointing"),
    ({"precision": "fp32"}, "precision fp32"),
    ({"precision": "bf16-pure"}, "precision bf16-pure"),
    ({"norm": "quack", "compile": False}, "norm quack in eager layers"),
])
def test_unchecked_levers_say_why(lever, why):
    rc = _rc(**lever)
    reasons = predict(rc["model"], 32000, rc["run"], rc["train"], "h200")["unmodelled"]
    assert len(reasons) == 1 and reasons[0].startswith(why)


def test_the_plan_script_prints_the_reason(tmp_path):
    raw = load_yaml(REPO_ROOT / "configs" / "gpu1-1b-levers.yaml")
    raw["runs"]["sel"] = {"strategy": "single", "micro_batch_size": 16, "activation_checkpointing": "selective"}
    text = format_predictions(prepare(raw), "h200", ["sel", "ac-full-mb16"])
    lines = text.splitlines()
    assert "not modelled: selective activation checkpointing" in lines[1] and "not modelled" not in lines[2]


def test_quack_norm_takes_the_residual_adds_off():
    """quack's fused norm removes each compiled layer's closing residual add, forward and backward: three
    stream-sized reads and writes each way per token and layer, off the elementwise time only."""
    torch_norm, quack = _rc(precision="bf16-master"), _rc(precision="bf16-master", norm="quack")
    base = predict(torch_norm["model"], 32000, torch_norm["run"], torch_norm["train"], "h100")
    got = predict(quack["model"], 32000, quack["run"], quack["train"], "h100")
    sh = shape_of(quack["model"], 32000)
    tokens = quack["train"]["global_batch"] * sh.seq
    saved = 6 * 2 * sh.h * sh.layers * tokens / (card("h100")["elementwise_tbps"] * 1e12)  # bf16 stream
    assert base["time_s"]["elementwise"] - got["time_s"]["elementwise"] == pytest.approx(saved)
    assert {k: v for k, v in got["time_s"].items() if k != "elementwise"} == pytest.approx(
        {k: v for k, v in base["time_s"].items() if k != "elementwise"})
    assert got["peak_gib"] == pytest.approx(base["peak_gib"])


def test_bf16_master_takes_the_weight_casts_and_the_fp32_gradient_add_off():
    """bf16-master's step against bf16-residual's (the same bf16 stream): each micro-batch without bf16 autocast's
    cast of every projection weight to bf16 and of its gradient back to fp32 (12 bytes a weight), and a step of 22
    bytes a parameter against 40 (the compiled step's 34, less the second micro-batch's fp32 add it spares)."""
    plain, master = _rc(precision="bf16-residual"), _rc(precision="bf16-master")
    base = predict(plain["model"], 32000, plain["run"], plain["train"], "h100")
    got = predict(master["model"], 32000, master["run"], master["train"], "h100")
    sh = shape_of(master["model"], 32000)
    elem = card("h100")["elementwise_tbps"] * 1e12
    micro_batches = master["train"]["global_batch"] // master["run"]["micro_batch_size"]
    cast = sh.layers * sh.layer_matmul + sh.vocab * sh.h  # the projections and the output layer
    assert base["time_s"]["elementwise"] - got["time_s"]["elementwise"] == pytest.approx(
        12 * cast * micro_batches / elem)
    assert got["time_s"]["optimizer"] == pytest.approx(base["time_s"]["optimizer"] * 22 / 40)
    assert {k: v for k, v in got["time_s"].items() if k not in ("elementwise", "optimizer")} == pytest.approx(
        {k: v for k, v in base["time_s"].items() if k not in ("elementwise", "optimizer")})


def test_an_attention_kernel_runs_at_its_own_rate():
    """A run's attention kernel takes the card's rate for it (attention_tflops_fa4_op on the H100, measured);
    a card without one predicts at cuDNN's rate and says so."""
    cudnn, fa4 = _rc(), _rc(attention="fa4-op")
    assert cudnn["train"]["attention"] == "cudnn" and fa4["train"]["attention"] == "fa4-op"
    base = predict(cudnn["model"], 32000, cudnn["run"], cudnn["train"], "h100")
    got = predict(fa4["model"], 32000, fa4["run"], fa4["train"], "h100")
    c = card("h100")
    assert got["unmodelled"] == []
    assert got["time_s"]["attention"] == pytest.approx(
        base["time_s"]["attention"] * c["attention_tflops"] / c["attention_tflops_fa4_op"])
    assert got["step_s"] < base["step_s"]
    on_h200 = predict(fa4["model"], 32000, fa4["run"], fa4["train"], "h200")
    assert on_h200["unmodelled"] == ["attention fa4-op: the card has no attention_tflops_fa4_op; the attention "
                                     "rate is cuDNN's"]
    assert on_h200["time_s"]["attention"] == pytest.approx(
        predict(cudnn["model"], 32000, cudnn["run"], cudnn["train"], "h200")["time_s"]["attention"])


def test_quack_mlp_memory_matches_the_recorded_runs():
    """The peak quack's MLP saves, predicted against measured: single and quack-mlp of the kernels study, one
    session on one card (7.56 GiB measured), within 3 %. Its step is bounded like any checked run's
    (test_plan.test_recorded_runs_meet_the_bounds); the time it saves is not: the plan takes the unsaved product
    off the elementwise traffic at the card's fitted clock, and the measured step gives part of that back to a
    lower clock at the power cap (RESULTS.md, kernel levers)."""
    import json

    raw = load_yaml(REPO_ROOT / "configs" / "gpu1-1b-kernels.yaml")
    cfg = prepare(raw)
    runs = REPO_ROOT / "results" / "h100-1b-kernels" / "runs"
    measured, predicted = {}, {}
    for name in ("single", "quack-mlp"):
        rc = run_config(cfg, name)
        predicted[name] = predict(rc["model"], 32000, rc["run"], rc["train"], "h100")
        measured[name] = json.loads((runs / name / "summary.json").read_text())["peak_mem_gib"]
    saved = predicted["single"]["peak_gib"] - predicted["quack-mlp"]["peak_gib"]
    assert saved == pytest.approx(measured["single"] - measured["quack-mlp"], rel=0.03)
    assert predicted["quack-mlp"]["unmodelled"] == []


def predict_spec(rc):
    from llmpar.layout import RunSpec

    return RunSpec(**rc["run"])


def test_bf16_master_states_count_the_bf16_weights_beside_fp32_masters():
    """bf16 weights (2 bytes) beside fp32 masters (4), fp32 gradient sums (4) and AdamW's two fp32 moments (8):
    2 bytes a parameter more than bf16 autocast's fp32 weights, gradients and moments."""
    from llmpar.plan.memory import state_bytes
    from llmpar.shape import shape_of

    plain, master = _rc(precision="bf16-residual"), _rc(precision="bf16-master")
    sh = shape_of(plain["model"], 32000)
    n = 1000
    a = state_bytes(sh, predict_spec(plain), n)
    b = state_bytes(sh, predict_spec(master), n)
    assert a == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}
    assert b == {"params": 6 * n, "grads": 4 * n, "optimizer": 8 * n}


@pytest.mark.parametrize("micro_batch_size,grad_bytes", [(32, 0), (16, 2), (8, 4)])
def test_bf16_master_gradients_at_the_peak(micro_batch_size, grad_bytes):
    """At the peak (the last micro-batch's activations): no gradient with one micro-batch; with two, the first's
    bf16 gradients, held for the step's fp32 sum (2 bytes a parameter); with more, two bf16 gradients or their fp32
    sums (4)."""
    from llmpar.plan.memory import memory
    from llmpar.shape import shape_of

    rc = _rc(precision="bf16-master", micro_batch_size=micro_batch_size)
    run = predict_spec(rc)
    sh = shape_of(rc["model"], 32000)
    (rank,) = memory(sh, run, compiled=True, overhead_gib=0.0)
    assert rank["parts"]["grads"] == grad_bytes * rank["params_local"]
