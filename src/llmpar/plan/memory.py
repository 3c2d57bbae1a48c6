"""Predicted peak memory per rank: model states as each engine shards them, communication buffers, the
activations each micro-batch saves for the backward, the logits' gradient and the allocator's overhead.

Activations saved per token and decoder layer under bf16 autocast with per-layer ``torch.compile``
(fp32 residual stream; matmul inputs and outputs bf16), ``h`` hidden, ``kv`` KV width, ``f`` MLP width:
replicated over tensor-parallel ranks 2 x (4h fp32 norm input + 2h bf16 norm output) = 12h; split
over them q 2h, k 2kv, v 2kv, attention output 2h, its log-sum-exp 4 per head, gate, up and their
SwiGLU product 3 x 2f. At the 1.1B shape that is 67,712 bytes; with the head's 2V bf16 logits the
measured slope between micro-batch 8 and 16 (results/h100x2-1b: single and single-mb8) is 1.548 MB per
token against 1.554 MB counted.

With quack's MLP (``mlp: quack``) the down projection's backward recomputes SwiGLU's product in its epilogue
from the saved gate/up products: f x 2 bytes a token and layer fewer (7.56 GiB at the 1.1B shape and a micro-batch
of 16 x 2048 tokens, as measured between results/h100-1b-kernels' single and quack-mlp), and no silu output is
saved where the lines below count one.

Eager layers (no compile) also save, per token and layer: each RMSNorm's normalised fp32 input
(2 x 4h), one bf16 cast of a norm's output per projection that reads it beyond the first (q/k/v: 2,
gate/up: 1; 3 x 2h), o_proj's contiguous copy of the attention output (2h, split) and SwiGLU's
unfused silu output (2f, split): at the 1.1B shape 43,008 bytes.
"""

from __future__ import annotations

import dataclasses

from llmpar.kernels import QUACK_MLPS
from llmpar.layout import Engine, Precision, RunSpec, Schedule, Sharding
from llmpar.shape import Shape, balanced_split, pipeline_layer_weights

GIB = 2**30
DS_BUCKET = 5e8  # DeepSpeed's default reduce/prefetch bucket (elements), capped at the model (ds_common)
DS_MAX_LIVE = 1e9  # DeepSpeed's stage3_max_live_parameters default (elements), not set by ds_common


def pipeline_ranks(sh: Shape, run: RunSpec) -> list[dict]:
    """What each pipeline rank holds: its decoder layers and whether it has the embedding / the head.
    Chunks are balanced as the engines cut them (``pipeline_balance``; ``pp_torch.chunk_layer_ranges``)."""
    p, v = run.stages, run.virtual_stages
    chunks = balanced_split(pipeline_layer_weights(sh, run.pipeline_balance), p * v)
    ranks = []
    for r in range(p):
        mine = [chunks[r + i * p] for i in range(v)]
        ranks.append({"rank": r, "layers": sum(e - s for s, e in mine), "first": r == 0, "last": r == p - 1,
                      "receives": 2 * v - (r == 0) - (r == p - 1)})  # chunk inputs + gradients received
    return ranks


def local_params(sh: Shape, run: RunSpec, share: dict) -> int:
    """Parameters (elements) of one rank's layers, before data-parallel sharding. Tensor parallel splits
    the projections; embedding and norms are replicated; lm_head is replicated by torch TP and split by
    DeepSpeed AutoTP (``local_params`` of the recorded tp runs: 615.6 M and 582.8 M)."""
    tp = run.tp
    n = share["layers"] * (sh.layer_matmul // tp + 2 * sh.h)
    if share["first"]:
        n += sh.vocab * sh.h
    if share["last"]:
        head_split = tp if run.tp_splits_head else 1
        n += sh.h + sh.vocab * sh.h // head_split
    return n


def saved_bytes_per_token(sh: Shape, run: RunSpec, layers: int, last: bool, compiled: bool) -> float:
    """Bytes one token of a micro-batch keeps alive for the backward on one rank (its layers, and the
    head on the last pipeline rank). See the module docstring for the count."""
    tp = run.tp
    # The residual stream's dtype: fp32 under bf16 autocast in every engine (FSDP2 included since it leaves
    # the layers' inputs uncast, strategies/fsdp.py), bf16 with bf16-residual and bf16-pure.
    residual = run.precision.residual_bytes
    compute = run.precision.compute_bytes  # matmul inputs/outputs
    zero3 = run.sharding is Sharding.ZERO3
    if run.activation_checkpointing == "full":
        # Each layer keeps only its input; one layer's full set is recomputed at a time (memory() adds it).
        per_layer_kept = residual * sh.h
    replicated = 2 * (residual * sh.h + compute * sh.h)
    quack = run.mlp in QUACK_MLPS  # SwiGLU's product and silu output are not saved (module docstring)
    split = compute * (2 * sh.h + 2 * sh.kv + (2 if quack else 3) * sh.f) + 4 * sh.heads
    if not compiled:
        replicated += 2 * residual * sh.h + (3 * compute * sh.h if run.precision.autocast else 0)
        split += compute * (sh.h + (0 if quack else sh.f))
    elif run.ddp and not quack:
        # Under DDP, Dynamo's DDPOptimizer splits each compiled layer at the 25 MB bucket boundaries
        # (every MLP weight is a bucket of its own), so SwiGLU's silu output is materialised and saved.
        split += compute * sh.f
    elif zero3:
        # DeepSpeed ZeRO-3 runs every linear through its own autograd function, which saves its input as
        # given: the two norms' outputs in the stream's dtype, where autocast's linear saves a bf16 copy;
        # and the compiled layer breaks at each such call, so o_proj's copy of the attention output and
        # SwiGLU's silu output are materialised and saved (as in eager layers). At the 1.1B shape
        # 91,264 bytes, as the allocator's live blocks at the peak of results/h100x{2,4}-1b's zero3 runs
        # (benchmarks/results/zero3_memory_gpu{2,4}_h100x4.json: 1.393 GiB per layer at micro-batch 8).
        replicated += 2 * (residual - compute) * sh.h
        split += compute * (sh.h + sh.f)
    layer = replicated + split / tp
    if run.activation_checkpointing == "full":
        total = layers * per_layer_kept
    elif run.activation_checkpointing == "selective":  # every 2nd layer checkpointed
        total = layers // 2 * residual * sh.h + (layers - layers // 2) * layer
    else:
        total = layers * layer
    if last:
        total += head_bytes_per_token(sh, run, compiled)
    return total


def head_bytes_per_token(sh: Shape, run: RunSpec, compiled: bool) -> float:
    """What the head saves per token: the final norm's input and output, and the logits the cross-entropy
    saves: bf16 when compiled (the CUDA loss; on every TP rank in full), else the eager loss's fp32
    log-softmax."""
    residual, compute = run.precision.residual_bytes, run.precision.compute_bytes
    total = residual * sh.h + compute * sh.h + (compute if compiled else 4) * sh.vocab
    if run.sharding is Sharding.ZERO3:
        # the final norm (never compiled) keeps its normalised fp32 input, and lm_head's ZeRO-3
        # linear its output in the stream's dtype instead of the bf16 copy
        total += 4 * sh.h + (residual - compute) * sh.h
    return total


def live_micro_batches(run: RunSpec, rank: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak (in units of all its layers).

    GPipe: all m. 1F1B (torch, DeepSpeed): p - rank. Interleaved 1F1B (torch, v chunks per rank): its
    warm-up runs (v-1)·p + 2·(p-1-rank) chunk forwards before the first backward, plus the one in
    flight, each chunk 1/v of the rank's layers."""
    p, m = run.stages, run.micro_batches
    if not run.pipelined:
        return 1
    if run.schedule is Schedule.GPIPE and run.pp_engine is Engine.TORCH:
        return m
    if p == 1:
        return 1
    v = run.virtual_stages
    if v > 1:
        return min(m * v, (v - 1) * p + 2 * (p - 1 - rank) + 1) / v
    return min(m, p - rank)


def state_bytes(sh: Shape, run: RunSpec, n_local: int) -> dict:
    """Parameters, gradients and optimizer state (bytes) one rank holds, as each engine shards them."""
    dp, sharding = run.dp, run.sharding
    w = run.precision.weight_bytes
    if run.precision is Precision.BF16_MASTER:  # strategy single: bf16 weights beside fp32 masters, fp32 sums
        return {"params": (2 + w) * n_local, "grads": w * n_local, "optimizer": 2 * w * n_local}
    if run.engine is Engine.TORCH:
        shard = dp if sharding is Sharding.FSDP else 1
        return {"params": w * n_local / shard, "grads": w * n_local / shard, "optimizer": 2 * w * n_local / shard}
    # DeepSpeed under torch_autocast: fp32 module weights and gradients; ZeRO >= 1 adds an fp32 master
    # partition to the moments (12 bytes per partitioned parameter), ZeRO-0 keeps plain AdamW moments.
    # ZeRO-3 holds one fp32 gradient partition through the backward (its flat buffer: one 4n/dp block at
    # the peak, benchmarks/results/zero3_memory_gpu{2,4}_h100x4.json); the optimizer step adds a second (state_bytes
    # of results/h100x{2,4}-1b/runs/zero3, captured at the step: 2/dp), when the activations are gone.
    zero = run.zero_stage
    return {"params": w * n_local / (dp if zero >= 3 else 1),
            "grads": w * n_local / dp if zero >= 2 else w * n_local,
            "optimizer": (3 * w * n_local / dp) if zero >= 1 else 2 * w * n_local}


def buffer_bytes(sh: Shape, run: RunSpec, n_local: int, share: dict) -> float:
    """Communication buffers beside the states: DDP's reducer buckets hold a second gradient copy while
    ``no_sync`` micro-batches accumulate into separate ``.grad`` tensors; DeepSpeed ZeRO's fp32 reduce
    bucket (and ZeRO-3's live gathered parameters); FSDP2's two gathered bf16 layers; torch
    pipelining's receive buffers, one hidden state in the residual stream's dtype per micro-batch for each
    input and gradient a rank's chunks receive (allocated for every micro-batch up front)."""
    w = run.precision.weight_bytes
    if run.stages > 1 and run.pp_engine is Engine.TORCH:
        return (share["receives"] * run.micro_batches * run.micro_batch_size * sh.seq * sh.h
                * run.precision.residual_bytes)
    if run.ddp and run.dp > 1 and run.micro_batches > 1:
        return w * n_local
    if run.sharding in (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3):
        # ZeRO-3 also keeps up to stage3_max_live_parameters (DeepSpeed's default 1e9) gathered.
        live = w * min(DS_MAX_LIVE, n_local) if run.sharding is Sharding.ZERO3 else 0.0
        return w * min(DS_BUCKET, n_local) + live
    if run.sharding is Sharding.FSDP and run.dp > 1:
        return 2 * 2 * sh.layer_params / run.tp
    return 0.0


def memory(sh: Shape, run: RunSpec, compiled: bool, overhead_gib: float) -> list[dict]:
    """Predicted peak memory per pipeline rank (bytes, by component)."""
    tokens = run.micro_batch_size * sh.seq
    out = []
    for share in pipeline_ranks(sh, run):
        n_local = local_params(sh, run, share)
        states = state_bytes(sh, run, n_local)
        if run.micro_batches == 1 and (
                (run.engine is Engine.TORCH and not run.ddp)
                or run.sharding in (Sharding.ZERO1, Sharding.ZERO2)):
            # One micro-batch: no gradient exists when the backward starts (zero_grad sets them to None;
            # DeepSpeed ZeRO-1/2 free theirs once reduced); each layer's appears as its activations are
            # freed. DDP's reducer buckets always hold them; with several micro-batches the first one's
            # gradients are held through the next's activations.
            states["grads"] = 0.0
        if run.precision is Precision.BF16_MASTER and run.micro_batches == 2:
            # the first micro-batch's bf16 gradients are held through the second's activations (with more
            # micro-batches two bf16 gradients or their fp32 sums, 4 bytes; llmpar.strategies.master)
            states["grads"] = 2 * n_local
        act = tokens * saved_bytes_per_token(sh, run, share["layers"], share["last"], compiled)
        live = live_micro_batches(run, share["rank"])
        compute = run.precision.compute_bytes
        grad_logits = tokens * sh.vocab * (compute if compiled else 4) if share["last"] else 0.0
        parts = {**states, "buffers": buffer_bytes(sh, run, n_local, share), "activations": live * act,
                 "logits_grad": grad_logits, "overhead": overhead_gib * GIB}
        if run.activation_checkpointing != "none":
            # One checkpointed layer's full set is recomputed at a time, and only after the head's backward has
            # freed what the head saved and the logits' gradient: the peak holds the larger of the two phases
            # (results/h200-1b-levers: 318 kB per token measured at micro-batch 16 and 32, against 320 counted).
            head = tokens * head_bytes_per_token(sh, run, compiled) if share["last"] else 0.0
            unchecked = dataclasses.replace(run, activation_checkpointing="none")
            recomputed = tokens * saved_bytes_per_token(sh, unchecked, 1, False, compiled)
            parts["activations"] -= head
            parts["logits_grad"] = 0.0
            parts["backward_peak"] = max(head + grad_logits, recomputed)
        out.append({"rank": share["rank"], "params_local": n_local, "live_micro_batches": live,
                    "parts": parts, "total": sum(parts.values())})
    return out
