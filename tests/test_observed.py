"""The levers a run's config pulls change what executes, observed in the run (llmpar.metrics.probe), not
read back from its config: gradient accumulation, FSDP's reshard_after_forward, the pipeline schedule,
activation checkpointing beyond ``single``, compile on FSDP, pipeline and TP, torch bf16 autocast and
bf16-pure, and torch TP x DP. The runs are tests/shared_study.py's (few launches for all of them);
each also trains the same model as ``single`` where its numerics allow.
"""

import pytest
from conftest import assert_counts, assert_same_steps, read_run

from llmpar.shape import MODEL_SIZES

pytestmark = pytest.mark.slow

DIMS = MODEL_SIZES["tiny"]
LAYERS = DIMS["num_layers"]


def layer_params() -> int:
    """Parameters of one decoder layer: q, k, v, o, gate, up, down and its two RMSNorm weights."""
    h, f = DIMS["hidden_size"], DIMS["intermediate_size"]
    kv = DIMS["num_kv_heads"] * h // DIMS["num_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h


def probes(shared, run) -> list[dict]:
    summary, _ = read_run(shared["dir"][run])
    return [r["layer_probe"] for r in sorted(summary["per_rank"], key=lambda r: r["rank"])]


def max_rel(steps, ref_steps) -> float:
    return max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(steps, ref_steps))


def test_gradient_accumulation_runs_each_micro_batch(shared_two, baseline):
    """DDP with 2 micro-batches: every layer runs forward and backward twice per step, once without."""
    assert [p["forwards"] for p in probes(shared_two, "ddp_ref")] == [LAYERS] * 2
    assert [p["passes"] for p in probes(shared_two, "ddp_ref")] == ["FB"] * 2
    assert [p["forwards"] for p in probes(shared_two, "ddp_accumulate")] == [2 * LAYERS] * 2
    assert [p["passes"] for p in probes(shared_two, "ddp_accumulate")] == ["FBFB"] * 2
    summary, steps = read_run(shared_two["dir"]["ddp_accumulate"])
    assert_same_steps(steps, baseline[1], rtol=1e-4, min_steps=6)
    # DDP replicates: every rank holds the whole model
    assert [r["local_params"] for r in summary["per_rank"]] == [summary["params_total"]] * 2


def test_fsdp_keeps_the_layer_gathered_without_reshard(shared_two):
    """Between forward and backward a rank holds its shard of a layer (reshard_after_forward, the
    default) or the whole layer (reshard_after_forward false); DDP holds the whole layer."""
    assert [p["params_at_backward"] for p in probes(shared_two, "ddp_ref")] == [layer_params()] * 2
    resharded = [p["params_at_backward"] for p in probes(shared_two, "fsdp_ref")]
    assert sum(resharded) == layer_params() and max(resharded) < layer_params()
    assert [p["params_at_backward"] for p in probes(shared_two, "fsdp_no_reshard")] == [layer_params()] * 2


def test_pipeline_schedule_orders_forward_and_backward(shared_two):
    """The passes of each stage's first layer over the 4 micro-batches: GPipe runs every forward first;
    1F1B (both engines) starts the first micro-batch's backward before the last forward, and the last
    stage alternates."""
    assert [p["passes"] for p in probes(shared_two, "pp_gpipe")] == ["FFFFBBBB"] * 2
    for run in ("pp_torch_ref", "pp_deepspeed_ref"):
        assert [p["passes"] for p in probes(shared_two, run)] == ["FFBFBFBB", "FBFBFBFB"], run
    assert [p["layer"] for p in probes(shared_two, "pp_gpipe")] == [0, LAYERS // 2]  # one stage per rank


def test_activation_checkpointing_recomputes_under_fsdp_and_pipeline(shared_two, baseline):
    """full: every layer's forward runs again in backward (R after B); selective: every second layer."""
    assert [(p["forwards"], p["passes"]) for p in probes(shared_two, "fsdp_ac")] == [(2 * LAYERS, "FBR")] * 2
    # pipeline stage = 2 layers, of which layer 0 (stage 0) and layer 2 (stage 1) are checkpointed
    per_micro_batch = LAYERS // 2 + 1
    assert [p["forwards"] for p in probes(shared_two, "pp_ac")] == [4 * per_micro_batch] * 2
    assert [p["passes"] for p in probes(shared_two, "pp_ac")] == ["FFBRFBRFBRBR", "FBRFBRFBRFBR"]
    for run in ("fsdp_ac", "pp_ac"):
        assert_same_steps(read_run(shared_two["dir"][run])[1], baseline[1], rtol=1e-4, min_steps=6)


@pytest.mark.parametrize("run", ["fsdp_compile", "pp_compile", "tp_compile"])
def test_compile_on_fsdp_pipeline_and_tp(shared_two, baseline, run):
    """Every rank compiled graphs (eager runs compile none on CPU) and trains the same model (the
    inductor's float32 reordering: at most 1.7e-7 relative measured)."""
    summary, steps = read_run(shared_two["dir"][run])
    eager, _ = read_run(shared_two["dir"][run.replace("compile", "ref").replace("pp_ref", "pp_torch_ref")])
    assert all(r["compiled_graphs"] > 0 for r in summary["per_rank"]), summary["per_rank"]
    assert all(r["compiled_graphs"] == 0 for r in eager["per_rank"])
    assert_same_steps(steps, baseline[1], rtol=1e-4, min_steps=6)


@pytest.mark.parametrize("run", ["ddp_bf16", "fsdp_bf16"])
def test_torch_bf16_autocast_trains_in_bf16_with_fp32_weights(shared_two, baseline, run):
    """bf16 on the torch engines (autocast; FSDP's bf16 all-gather of the layers): the losses move off fp32
    by far more than fp32 engines differ among themselves (2e-7), but stay the same training (measured
    1.1e-4 for DDP, 1.2e-4 for FSDP, 2.1e-4 for FSDP with a bf16 residual stream); the weights,
    gradients and optimizer state stay fp32, and the decoder layers take fp32 inputs."""
    summary, steps = read_run(shared_two["dir"][run])
    assert 1e-5 < max_rel(steps, baseline[1]) < 1e-3
    # the residual stream stays fp32 as autocast keeps it: FSDP2's usual policy (bf16 parameters, layer
    # inputs cast to bf16) would carry it in bf16, a different rounding path from every other engine's
    assert [p["input_dtype"] for p in probes(shared_two, run)] == ["float32"] * 2
    for r in summary["per_rank"]:
        assert r["state_bytes"]["params"] == 4 * r["local_params"], r
        assert r["state_bytes"]["optimizer"] == 2 * 4 * r["local_params"], r


def test_bf16_pure_halves_the_model_states(shared_two, baseline):
    """bf16-pure: parameters, gradients and AdamW moments in bf16 (2 bytes each), against fp32's 4;
    the run still trains the same model within 1e-2 (measured 1.0e-3 off fp32)."""
    summary, steps = read_run(shared_two["dir"]["ddp_bf16_pure"])
    assert [p["input_dtype"] for p in probes(shared_two, "ddp_bf16_pure")] == ["bfloat16"] * 2
    for r in summary["per_rank"]:
        n = r["local_params"]
        assert r["state_bytes"] == {"params": 2 * n, "grads": 2 * n, "optimizer": 2 * 2 * n}, r
    assert 1e-4 < max_rel(steps, baseline[1]) < 1e-2


@pytest.mark.parametrize("run", ["ddp_bf16_residual", "fsdp_bf16_residual", "pp_bf16_residual",
                                 "zero3_bf16_residual", "pp_deepspeed_bf16_residual", "tp_bf16_residual",
                                 "tp_deepspeed_bf16_residual"])
def test_bf16_residual_carries_the_stream_in_bf16(shared_two, baseline, baselines, run):
    """bf16-residual in the torch engines and DeepSpeed's (DDP, FSDP2, ZeRO-3, torch TP and AutoTP, and a torch
    and a DeepSpeed pipeline, whose stages pass the hidden states): every decoder layer takes bf16 inputs while
    the weights stay fp32. The dtypes are what tells the lever apart here: on this model over 6 steps its losses
    move from bf16's by no more than bf16's engine-to-engine spread. Each trains as ``single`` of the same
    precision does (measured 2.8e-5 to 7.9e-5 apart) and off fp32 by bf16's rounding (8.3e-5 to 1.3e-4)."""
    summary, steps = read_run(shared_two["dir"][run])
    assert {p["input_dtype"] for p in probes(shared_two, run)} == {"bfloat16"}
    for r in summary["per_rank"]:
        assert r["state_bytes"]["params"] == 4 * r["local_params"], r
    _, single_steps = baselines["single-bf16-residual"]
    assert max_rel(steps, single_steps) < 1e-3
    assert 1e-5 < max_rel(steps, baseline[1]) < 1e-3


def test_torch_tp_x_dp_matches_single(shared_four, baseline):
    """tensor_parallel tp 2 on 4 processes (dp 2): each tp pair trains half the global batch; losses as
    single's, and each rank holds half of every projection."""
    summary, steps = read_run(shared_four["dir"]["tp_dp"])
    assert summary["status"] == "ok" and summary["world_size"] == 4
    assert_same_steps(steps, baseline[1], rtol=1e-4, min_steps=6)
    total, projections = summary["params_total"], LAYERS * (layer_params() - 2 * DIMS["hidden_size"])
    assert [r["local_params"] for r in summary["per_rank"]] == [total - projections // 2] * 4


def test_every_run_counts_the_tokens_it_trained(shared_two, shared_four):
    """Every run of the shared study, killed-and-resumed ones included, in every layout: tokens and
    throughput against our own count (conftest.assert_counts: global_batch x seq_len tokens per step)."""
    for shared in (shared_two, shared_four):
        for run, run_dir in shared["dir"].items():
            summary, steps = read_run(run_dir)
            assert summary["status"] == "ok", (run, summary["message"])
            try:
                assert_counts(summary, steps)
            except AssertionError as exc:
                raise AssertionError(f"run {run}: {exc}") from exc
