"""Every term of the plan (llmpar.plan) against its formula, counted by hand for a small shape: the model
states each sharding holds (parameters, gradients, optimizer), and each part of the predicted step time.
A term left out or miscounted changes one of these numbers.

The shape: hidden 8, 2 layers, 2 heads (2 KV heads), MLP 16, sequence 8, vocabulary 32. A decoder layer's
projections are 2·8·8 (q, o) + 2·8·8 (k, v) + 3·8·16 (gate, up, down) = 640 parameters, 656 with its two
norms; embedding and head 32·8 = 256 each; the final norm 8. The whole model: 2·656 + 256 + 8 + 256 = 1832.
"""

from __future__ import annotations

import pytest

from llmpar.config import prepare
from llmpar.plan.memory import local_params, memory, pipeline_ranks, saved_bytes_per_token, state_bytes
from llmpar.plan.step import step_time
from llmpar.shape import shape_of

MODEL = {"size": "tiny", "hidden_size": 8, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
         "intermediate_size": 16, "seq_len": 8}
VOCAB = 32
N = 1832  # parameters of the whole model (module docstring)
N_TP2_TORCH = 2 * (640 // 2 + 16) + 256 + 8 + 256  # torch TP halves the projections, replicates the rest
N_TP2_AUTOTP = 2 * (640 // 2 + 16) + 256 + 8 + 256 // 2  # DeepSpeed AutoTP also splits the head
N_STAGE = [656 + 256, 656 + 8 + 256]  # 2 stages: a layer each, the embedding on the first, norm and head on the last

RUNS = {
    "single": {"strategy": "single"},
    "ddp": {"strategy": "data_parallel", "gpus_per_node": 2},
    "fsdp": {"strategy": "fsdp", "gpus_per_node": 2},
    "fsdp4": {"strategy": "fsdp", "gpus_per_node": 4},
    "zero0-autotp": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "deepspeed"},
    "zero1": {"strategy": "zero", "zero_stage": 1, "gpus_per_node": 2},
    "zero2": {"strategy": "zero", "zero_stage": 2, "gpus_per_node": 2},
    "zero3": {"strategy": "zero", "zero_stage": 3, "gpus_per_node": 2},
    "tp-torch": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch"},
    "ddp-bf16-pure": {"strategy": "data_parallel", "gpus_per_node": 2, "precision": "bf16-pure"},
    "pp": {"strategy": "pipeline_parallel", "stages": 2, "pp_engine": "torch", "schedule": "1f1b"},
    "single-ac": {"strategy": "single", "activation_checkpointing": "full"},
    "single-bf16": {"strategy": "single", "precision": "bf16"},
    "single-bf16-residual": {"strategy": "single", "precision": "bf16-residual"},
    "ddp-bf16": {"strategy": "data_parallel", "gpus_per_node": 2, "precision": "bf16"},
    "pp-bf16": {"strategy": "pipeline_parallel", "stages": 2, "pp_engine": "torch", "schedule": "1f1b",
                "precision": "bf16"},
    "pp-bf16-residual": {"strategy": "pipeline_parallel", "stages": 2, "pp_engine": "torch", "schedule": "1f1b",
                         "precision": "bf16-residual"},
}


@pytest.fixture(scope="module")
def specs():
    from llmpar.layout import RunSpec

    cfg = prepare({"model": MODEL, "train": {"global_batch": 8, "device": "cpu"}, "runs": RUNS, "baseline": "single"})
    return {name: RunSpec.from_dict(spec) for name, spec in cfg["runs"].items()}


SH = shape_of(MODEL, VOCAB)

# (params, grads, optimizer) bytes per rank: fp32 weights and gradients (4 bytes), AdamW's two fp32 moments
# (8); DeepSpeed's ZeRO >= 1 optimizer keeps an fp32 master copy too (12 bytes per partitioned parameter).
STATE_BYTES = {
    "single": (4 * N, 4 * N, 8 * N),
    "ddp": (4 * N, 4 * N, 8 * N),  # every replica holds everything
    "fsdp": (4 * N / 2, 4 * N / 2, 8 * N / 2),  # all three sharded over dp 2
    "fsdp4": (4 * N / 4, 4 * N / 4, 8 * N / 4),
    "zero0-autotp": (4 * N_TP2_AUTOTP, 4 * N_TP2_AUTOTP, 8 * N_TP2_AUTOTP),  # ZeRO-0: plain AdamW moments
    "zero1": (4 * N, 4 * N, 12 * N / 2),  # optimizer states partitioned
    "zero2": (4 * N, 4 * N / 2, 12 * N / 2),  # ... and gradients
    "zero3": (4 * N / 2, 4 * N / 2, 12 * N / 2),  # ... and parameters
    "tp-torch": (4 * N_TP2_TORCH, 4 * N_TP2_TORCH, 8 * N_TP2_TORCH),
    "ddp-bf16-pure": (2 * N, 2 * N, 4 * N),  # bf16 weights, gradients and moments
}


@pytest.mark.parametrize("name", list(STATE_BYTES))
def test_state_bytes_per_sharding(specs, name):
    spec = specs[name]
    [share] = pipeline_ranks(SH, spec)
    states = state_bytes(SH, spec, local_params(SH, spec, share))
    assert (states["params"], states["grads"], states["optimizer"]) == STATE_BYTES[name]


def test_state_bytes_of_pipeline_stages(specs):
    spec = specs["pp"]
    shares = pipeline_ranks(SH, spec)
    assert [local_params(SH, spec, s) for s in shares] == N_STAGE
    for n in N_STAGE:
        assert state_bytes(SH, spec, n) == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}


@pytest.mark.parametrize("name", ["fsdp", "zero1", "ddp"])
def test_predicted_memory_holds_every_state(specs, name):
    """The predicted peak's parts: the states as above (gradients counted where the engine holds them at the
    peak: DDP's reducer buckets do; with one micro-batch FSDP2 and ZeRO-1 have none when the backward starts
    and free each layer's as its activations go), and the parts add up to the total."""
    [rank] = memory(SH, specs[name], compiled=False, overhead_gib=0.5)
    params, grads, optimizer = STATE_BYTES[name]
    parts = rank["parts"]
    assert (parts["params"], parts["optimizer"]) == (params, optimizer)
    assert parts["grads"] == (grads if name == "ddp" else 0.0)
    assert parts["overhead"] == 0.5 * 2**30 and rank["total"] == sum(parts.values())
    assert set(parts) == {"params", "grads", "optimizer", "buffers", "activations", "logits_grad", "overhead"}


# A card of round numbers: 1 MFLOP/s GEMMs and attention, 1 MB/s elementwise traffic (twice the bytes for the
# eager layers these tests time), 10 kB/s links.
CARD = {"gemm_tflops": 1e-6, "attention_tflops": 1e-6, "elementwise_tbps": 1e-6, "link_busbw_gbps": 1e-5,
        "tp_allreduce_busbw_gbps": 1e-5, "zero3_busbw_gbps": 1e-5, "micro_batch_overhead_s": 0.01,
        "step_overhead_s": 0.005, "ds_pipeline_host_s_per_layer": 1e-3, "eager_elementwise_factor": 2.0,
        "cluster": {"collective_latency_s": 0.001, "gpus_per_node": 8, "inter_node_busbw_gbps": 1e-5}}
RATE, BW, LAT = 1e6, 1e4, 0.001
EAGER = 2.0  # eager layers move this many times the compiled layers' elementwise bytes (cards.yaml)
# Bytes a token saves for the backward per layer, fp32, eager (plan.memory's docstring): replicated
# 2·(4h + 4h) + 2·4h = 192; split 4·(2h + 2kv + 3f) + 4·heads + 4·(h + f) = 424; the last rank adds the
# final norm's input and output and the fp32 log-softmax: 4h + 4h + 4V = 192.
SAVED_LAYER, SAVED_HEAD = 192 + 424, 4 * 8 + 4 * 8 + 4 * VOCAB


def gather(nbytes: float) -> float:  # all-gather or reduce-scatter over 2 ranks
    return LAT + nbytes / 2 / BW


def allreduce(nbytes: float) -> float:  # over 2 ranks
    return LAT + nbytes / BW


def micro_batch_parts(tokens: int, layers: int, first: bool, last: bool) -> dict:
    """One micro-batch on one rank of the small shape, tp 1."""
    head = 256 if last else 0
    return {"gemm": 6 * tokens * (layers * 640 + head) / RATE,
            "attention": 6 * layers * 8 * 8 * tokens / RATE,
            "elementwise": 4 * tokens * (layers * SAVED_LAYER + (SAVED_HEAD if last else 0)) * EAGER / RATE,
            "micro_batch_fixed": 0.01 * layers / 2,
            "tp_comm": 0.0}


def test_saved_bytes_per_token(specs):
    assert saved_bytes_per_token(SH, specs["fsdp"], 2, True, compiled=False) == 2 * SAVED_LAYER + SAVED_HEAD


def test_a_bf16_residual_stream_halves_the_residual_bytes(specs):
    """bf16-residual against bf16 (eager, 2 layers): each layer saves its two residual-stream tensors twice
    over (2·2 of h each) in 2 bytes instead of 4, and the head its final norm's input: 2·(4·2·8) + 8·2 = 144
    bytes a token less; the pipeline sends and receives the hidden state and its gradient in 2 bytes, and the
    weights, gradients and AdamW moments stay fp32 (the states of bf16)."""
    fp32_stream, bf16_stream = specs["single-bf16"], specs["single-bf16-residual"]
    saved = [saved_bytes_per_token(SH, s, 2, True, compiled=False) for s in (fp32_stream, bf16_stream)]
    assert saved[0] - saved[1] == 2 * (4 * 2 * 8) + 8 * 2
    assert state_bytes(SH, bf16_stream, N) == state_bytes(SH, fp32_stream, N)
    # the 1F1B pipeline's 5 slots (test_pipeline_step_time_parts), each sending 16 tokens forward and back
    p2p = [step_time(SH, specs[n], compiled=False, c=CARD)["parts"]["pp_p2p"] for n in ("pp-bf16", "pp-bf16-residual")]
    assert p2p == pytest.approx([5 * 2 * (LAT + 16 * 8 * b / BW) for b in (4, 2)], rel=1e-12)
    buffers = [memory(SH, specs[n], compiled=False, overhead_gib=0.0)[0]["parts"]["buffers"]
               for n in ("pp-bf16", "pp-bf16-residual")]
    assert buffers[0] == 2 * buffers[1] > 0


def test_quack_mlp_saves_neither_swiglu_product_nor_silu_output(specs):
    """quack's MLP recomputes SwiGLU's product (f = 16 wide, bf16) in the backward: 2·16 bytes a token and layer
    fewer when compiled, twice that where the torch MLP also saves its silu output (eager layers, and DDP's
    compiled layers split at the gradient buckets). The specs are built directly: a study refuses quack on CPU."""
    import dataclasses

    torch_mlp = specs["single-bf16"]
    quack = dataclasses.replace(torch_mlp, mlp="quack")
    for compiled, fewer in ((True, 2 * 16), (False, 2 * 2 * 16)):
        saved = [saved_bytes_per_token(SH, s, 2, True, compiled=compiled) for s in (torch_mlp, quack)]
        assert saved[0] - saved[1] == 2 * fewer, compiled
    ddp = [saved_bytes_per_token(SH, s, 2, True, compiled=True)
           for s in (specs["ddp-bf16"], dataclasses.replace(specs["ddp-bf16"], mlp="quack"))]
    assert ddp[0] - ddp[1] == 2 * 2 * 2 * 16


def test_fsdp_step_time_parts(specs):
    """FSDP2 over 2 ranks, one micro-batch of 4 sequences (32 tokens). Communication: each micro-batch
    gathers the bf16 parameters in forward and backward and reduce-scatters the fp32 gradients, exposed
    where longer than the micro-batch's compute, plus one layer's gather before the first; optimizer:
    40 bytes per updated parameter (its shard of N/2) at the elementwise rate."""
    t = step_time(SH, specs["fsdp"], compiled=False, c=CARD)
    mb = micro_batch_parts(32, 2, True, True)
    t_mb = sum(mb.values())
    expected = {**mb,
                "dp_comm": max(0.0, 2 * gather(2 * N) + gather(4 * N) - t_mb) + gather(2 * 656),
                "optimizer": 40 * (N / 2) / RATE,
                "step_fixed": 0.005}
    assert t["parts"] == pytest.approx(expected, rel=1e-12)
    assert t["parts"]["optimizer"] > 0 and t["parts"]["dp_comm"] > 0
    assert t["total"] == pytest.approx(sum(expected.values()), rel=1e-12) and t["bubble"] == 0


def test_zero1_step_time_parts(specs):
    """ZeRO-1 over 2 ranks: the gradient all-reduce exposed beyond the last backward (2/3 of a
    micro-batch) plus its last bucket, then the updated fp32 partitions all-gathered; the optimizer reads and
    writes 40 bytes per partitioned parameter and copies the fp32 master back into the module (8 bytes)."""
    t = step_time(SH, specs["zero1"], compiled=False, c=CARD)
    mb = micro_batch_parts(32, 2, True, True)
    t_mb = sum(mb.values())
    expected = {**mb,
                "dp_comm": max(0.0, allreduce(4 * N) - 2 / 3 * t_mb) + allreduce(4 * N) + gather(4 * N),
                "optimizer": (40 + 8) * (N / 2) / RATE,
                "step_fixed": 0.005}
    assert t["parts"] == pytest.approx(expected, rel=1e-12)


def test_pipeline_step_time_parts(specs):
    """The torch 1F1B pipeline, 2 stages, 4 micro-batches of 2 sequences (16 tokens): the slower stage's
    micro-batch (the last: the head) plus the fp32 hidden state sent forward and its gradient back, times
    m / (1 - bubble) slots with the bubble (p-1)/(m+p-1) = 1/5; the optimizer over the larger stage."""
    t = step_time(SH, specs["pp"], compiled=False, c=CARD)
    last = micro_batch_parts(16, 1, False, True) | {"pp_p2p": 2 * (LAT + 16 * 8 * 4 / BW)}
    slots = 4 / (1 - 1 / 5)
    expected = {**{k: v * slots for k, v in last.items()},
                "dp_comm": 0.0,
                "optimizer": 40 * N_STAGE[1] / RATE,
                "step_fixed": 0.005}
    assert t["bubble"] == pytest.approx(1 / 5, rel=1e-12)
    assert t["parts"] == pytest.approx(expected, rel=1e-12)


def test_full_checkpointing_recomputes_each_layer_and_holds_one_phase(specs):
    """Full activation checkpointing, one micro-batch of 8 sequences (64 tokens): the step recomputes every
    layer's forward in its backward (a third more layer GEMM and attention FLOPs, the forward half of the
    elementwise traffic again, on the activations the layers produce); the peak holds each layer's fp32 input
    (4h bytes a token) plus the larger of the head's backward (what the head saves and the logits' gradient)
    and one recomputed layer's full set."""
    spec, tokens = specs["single-ac"], 64
    t = step_time(SH, spec, compiled=False, c=CARD)["parts"]
    plain = micro_batch_parts(tokens, 2, True, True)
    assert t["gemm"] == pytest.approx((6 * tokens * 2 * 640 * 4 / 3 + 6 * tokens * 256) / RATE)
    assert t["attention"] == pytest.approx(plain["attention"] * 4 / 3)
    assert t["elementwise"] == pytest.approx(plain["elementwise"] * 6 / 4)
    [rank] = memory(SH, spec, compiled=False, overhead_gib=0.0)
    parts = rank["parts"]
    assert parts["activations"] == tokens * 2 * 4 * 8  # each layer keeps its input
    assert parts["logits_grad"] == 0.0
    assert parts["backward_peak"] == tokens * max(SAVED_HEAD + 4 * VOCAB, SAVED_LAYER)
    assert rank["total"] == sum(parts.values())
