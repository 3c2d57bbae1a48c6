"""Predicted step time: per micro-batch, GEMM FLOPs over the card's GEMM rate, attention FLOPs over its
attention rate, elementwise traffic (4 x the saved activation bytes) over its measured elementwise
bandwidth, plus a fixed cost per micro-batch; times the micro-batches (plus the pipeline's idle slots:
the closed-form bubble of GPipe and 1F1B, torch's interleaved schedule simulated as its runtime issues
the transfers, :mod:`llmpar.plan.pipeline`); plus the communication that is not hidden behind compute
(bytes per collective over the link's bus bandwidth), the optimizer's bytes, and a fixed cost per step.
"""

from __future__ import annotations

import dataclasses

from llmpar.layout import Engine, Precision, RunSpec, Sharding
from llmpar.metrics.definitions import bubble_fraction
from llmpar.plan.memory import local_params, pipeline_ranks, saved_bytes_per_token, state_bytes
from llmpar.plan.pipeline import interleaved_idle
from llmpar.shape import Shape

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's bucket_cap_mb


def link_bw(card_c: dict, group: int, stride: int) -> float:
    """Bus bandwidth (bytes/s) of a collective over ``group`` ranks ``stride`` apart: NVLink inside a
    node, the inter-node link when the group spans nodes (a ring is as slow as its slowest hop)."""
    cl = card_c["cluster"]
    if group * stride <= cl["gpus_per_node"]:
        return card_c["link_busbw_gbps"] * 1e9
    return cl["inter_node_busbw_gbps"] * 1e9


def fitted_bw(card_c: dict, key: str, group: int, stride: int) -> float:
    """Effective bus bandwidth (bytes/s) of collectives that sit on the critical path one by one, fitted per
    card as ``key``: tensor parallelism's activation all-reduces (``tp_allreduce_busbw_gbps``: ~MB-to-100-MB
    collectives between a layer's GEMMs, far below a 1 GiB all-reduce's rate) and DeepSpeed ZeRO-3's
    module-by-module gathers and reduce-scatters (``zero3_busbw_gbps``: each behind host-side hooks); the
    link's rate (:func:`link_bw`) where that is slower, across nodes."""
    return min(card_c[key] * 1e9, link_bw(card_c, group, stride))


def allreduce_s(nbytes: float, group: int, bw: float, latency: float) -> float:
    return 0.0 if group <= 1 else latency + 2 * (group - 1) / group * nbytes / bw


def gather_s(nbytes: float, group: int, bw: float, latency: float) -> float:
    """All-gather or reduce-scatter of a tensor of ``nbytes`` (whole) over ``group`` ranks."""
    return 0.0 if group <= 1 else latency + (group - 1) / group * nbytes / bw


def step_time(sh: Shape, run: RunSpec, compiled: bool, c: dict) -> dict:
    """Predicted seconds of one optimizer step (by component) on card constants ``c``."""
    tp, dp, p, m = run.tp, run.dp, run.stages, run.micro_batches
    tokens = run.micro_batch_size * sh.seq
    gemm, attn, elem = c["gemm_tflops"] * 1e12, c["attention_tflops"] * 1e12, c["elementwise_tbps"] * 1e12
    lat = c["cluster"]["collective_latency_s"]
    bw_tp, bw_dp, bw_pp = fitted_bw(c, "tp_allreduce_busbw_gbps", tp, 1), link_bw(c, dp, tp), link_bw(c, 2, tp * dp)
    compute = run.precision.compute_bytes
    # tensor parallel all-reduces: the row-parallel outputs in the forward (compute dtype) and the gradients
    # of the column-parallel inputs in the backward, which are in the residual stream's dtype
    grad_bytes_tp = run.precision.residual_bytes
    per_rank = []
    shares = pipeline_ranks(sh, run)
    # Activation checkpointing recomputes a checkpointed layer's forward in its backward: a third more of the
    # layer's GEMM and attention FLOPs, and its forward's elementwise traffic (half of the 4 passes) again.
    ckpt = {"full": 1.0, "selective": 0.5}.get(run.activation_checkpointing, 0.0)
    unchecked = dataclasses.replace(run, activation_checkpointing="none")
    master = run.precision is Precision.BF16_MASTER
    for share in shares:
        head = sh.vocab * sh.h // (tp if run.tp_splits_head else 1) if share["last"] else 0
        layers_gemm = 6 * tokens * share["layers"] * sh.layer_matmul / tp
        flops_gemm = layers_gemm * (1 + ckpt / 3) + 6 * tokens * head
        flops_attn = 6 * share["layers"] * sh.h * sh.seq * tokens / tp * (1 + ckpt / 3)
        # the elementwise work is the activations the layers produce, whether they are kept or recomputed
        produced = tokens * saved_bytes_per_token(sh, unchecked, share["layers"], share["last"], compiled)
        eager = 1.0 if compiled else c["eager_elementwise_factor"]  # unfused kernels move more bytes
        t = {"gemm": flops_gemm / gemm, "attention": flops_attn / attn,
             "elementwise": (4 + 2 * ckpt) * produced * eager / elem,
             "micro_batch_fixed": c["micro_batch_overhead_s"] * share["layers"] / sh.layers}
        if run.norm == "quack" and compiled:
            # quack's RMSNorm sums the stream and the layer's output as it normalises, so each layer's closing
            # residual add, a kernel of its own in a compiled layer (the next norm lies in the next layer's graph),
            # is gone: forward two reads and a write of the stream, backward the same for its gradient
            t["elementwise"] -= 6 * run.precision.residual_bytes * sh.h * share["layers"] * tokens / elem
        if master:
            # bf16 autocast casts each projection's fp32 weight to bf16 in the forward (4 bytes read, 2 written) and
            # its bf16 gradient to fp32 in the backward (2 read, 4 written), every micro-batch; bf16-master's
            # projections take their bf16 weights and gradients as they are
            t["elementwise"] -= 12 * (share["layers"] * sh.layer_matmul / tp + head) / elem
        # Tensor parallel: two all-reduces of the activations per layer in the forward, two in the backward.
        t["tp_comm"] = 2 * share["layers"] * (allreduce_s(tokens * sh.h * compute, tp, bw_tp, lat)
                                              + allreduce_s(tokens * sh.h * grad_bytes_tp, tp, bw_tp, lat))
        if p > 1:  # the hidden state forward and its gradient backward, on the critical path
            t["pp_p2p"] = 2 * (lat + tokens * sh.h * run.precision.residual_bytes / bw_pp)
        per_rank.append(t)
    slowest = max(per_rank, key=lambda t: sum(t.values()))
    t_mb = sum(slowest.values())
    chunks = run.virtual_stages
    # GPipe and 1F1B: the closed-form bubble the metric bubble_theoretical is defined by
    bubble = bubble_fraction(p, m, chunks)
    if chunks > 1:  # torch's interleaved 1F1B, its transfers as its runtime issues them (plan.pipeline)
        chunk_fwd = (t_mb - slowest["pp_p2p"]) / (3 * chunks)
        bubble = interleaved_idle(p, m, chunks, round(slowest["pp_p2p"] / 2 / chunk_fwd, 3))
    slots = m / (1 - bubble)  # m micro-batch slots and the idle ones
    parts = {k: v * slots for k, v in slowest.items()}
    deepspeed = run.engine is Engine.DEEPSPEED
    if p > 1 and deepspeed:
        # DeepSpeed's pipeline engine issues its instructions from the host, in time proportional to a
        # stage's layers (ds_pipeline_host_s_per_layer); at small micro-batches that exceeds the GPU's
        # time per micro-batch and the GPUs wait (profiled: no kernel runs for 29-41 % of the step)
        host = c["ds_pipeline_host_s_per_layer"] * max(share["layers"] for share in shares)
        parts["pipeline_host"] = slots * max(0.0, host - t_mb)

    n_local = max(local_params(sh, run, s) for s in shares)
    grad_bytes = 4 * n_local
    exposed = 0.0
    sharding = run.sharding
    backward = t_mb * 2 / 3  # the last micro-batch's backward hides a bucketed gradient reduction
    if run.ddp or sharding in (Sharding.ZERO1, Sharding.ZERO2):
        exposed = max(0.0, allreduce_s(grad_bytes, dp, bw_dp, lat) - backward) + \
            allreduce_s(min(DDP_BUCKET_BYTES, grad_bytes), dp, bw_dp, lat)
        if not run.ddp:  # ZeRO-1/2: the updated fp32 partitions are all-gathered after the optimizer, exposed
            exposed += gather_s(4 * n_local, dp, bw_dp, lat)
    elif sharding is Sharding.FSDP:  # bf16 gathers in forward and backward, fp32 reduce-scatter, prefetched
        per_mb = 2 * gather_s(2 * n_local, dp, bw_dp, lat) + gather_s(4 * n_local, dp, bw_dp, lat)
        exposed = m * max(0.0, per_mb - t_mb) + gather_s(2 * sh.layer_params / tp, dp, bw_dp, lat)
    elif sharding is Sharding.ZERO3:  # DeepSpeed fetches each module's fp32 weights on the critical path
        bw_z3 = fitted_bw(c, "zero3_busbw_gbps", dp, tp)
        exposed = m * (2 * gather_s(4 * n_local, dp, bw_z3, lat) + gather_s(4 * n_local, dp, bw_z3, lat))
    elif dp > 1:  # TP x DP and PP x DP: one bucketed all-reduce after the backward (torch_common)
        exposed = allreduce_s(grad_bytes, dp, bw_dp, lat)
    parts["dp_comm"] = exposed

    # AdamW + clipping read/write ~40 bytes per updated fp32 parameter (param r/w, grad r x2 + w,
    # two moments r/w); DeepSpeed also copies the fp32 master partition back into the module (8 B).
    states = state_bytes(sh, run, n_local)
    ds_master = deepspeed and run.zero_stage >= 1
    updated = states["optimizer"] / (12 if ds_master else 8)
    copy_back = 8 * updated if ds_master else 0.0
    step_bytes = 40.0
    if master:
        # bf16-master's compiled step reads the two held bf16 gradients twice (the norm, then the update: 8 bytes),
        # the masters and moments (24) and writes the bf16 weights (2): 34; and it spares bf16 autocast's fp32 add
        # of the second micro-batch's gradient into .grad (12 bytes read and written, part of the micro-batch cost
        # fitted on bf16 runs)
        step_bytes = 34.0 - (12.0 if m > 1 else 0.0)
    parts["optimizer"] = (step_bytes * updated + copy_back) / elem
    parts["step_fixed"] = c["step_overhead_s"]
    return {"parts": parts, "total": sum(parts.values()), "micro_batch_s": t_mb, "bubble": bubble}
