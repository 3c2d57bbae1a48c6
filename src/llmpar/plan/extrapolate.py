"""Beyond one machine, on paper: :mod:`llmpar.plan` applied to layouts no recorded run has (8 to 1024 GPUs,
8 per node), for the 1.1B preset shape and an 8B Llama-3-like shape.

Everything here is model output, never measured: the card constants are fitted on single-GPU runs and
checked on 2-GPU runs only (results/<study>/plan.csv), and the cluster's bandwidths are the stated
assumptions of ``cards.yaml`` (``cluster``). :func:`assumptions` lists what the table rests on.

Each strategy gets one layout per GPU count (:func:`layout`), resolved and checked by the same code that
resolves a study's runs (``llmpar.layout.resolve``), with ``micro_batch_size: auto`` (the largest
micro-batch the plan predicts to fit 90 % of the card). Weak scaling: every GPU trains
:data:`TOKENS_PER_GPU` tokens per optimizer step, so the global batch grows with the GPU count.
"""

from __future__ import annotations

import math

from llmpar.errors import ConfigError
from llmpar.layout import RunSpec, resolve
from llmpar.plan.cards import card
from llmpar.plan.efficiency import time_to_target
from llmpar.plan.predict import FIT_MARGIN, auto_micro_batch, fits, predict
from llmpar.plan.step import link_bw
from llmpar.shape import model_dims

# Explicit dimensions over the 1B preset (model_dims lets any dimension override the preset).
SHAPES: dict[str, dict] = {
    "1.1B": {"size": "1B", "seq_len": 2048, "vocab_size": 32000},
    # Llama-3-8B's shape at its training context (8192).
    "8B": {"size": "1B", "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
           "intermediate_size": 14336, "seq_len": 8192, "vocab_size": 128256},
}
WORLDS = (8, 64, 512, 1024)
TOKENS_PER_GPU = 16384  # 8 x 2048 (1.1B) or 2 x 8192 (8B) sequences per GPU per step: weak scaling
PP_STAGES = 4  # stages of the hybrid layouts from 64 GPUs (2 at 8 GPUs for 3-D, where tp takes 4)
TRAIN = {"precision": "bf16", "compile": True, "compile_mode": "default", "fused_projections": False, "mlp": "torch",
         "norm": "torch", "device": "cuda", "activation_checkpointing": "none", "micro_batch_size": None}


def tp_degree(shape: str) -> int:
    """Tensor parallel inside one node: 8, or the KV heads where fewer (the 1.1B has 4; tp must divide them)."""
    return min(8, model_dims(SHAPES[shape])["num_kv_heads"])


def _pipeline(world: int, shape: str, gpus_per_node: int) -> tuple[dict | None, str]:
    layers = model_dims(SHAPES[shape])["num_layers"]
    if world > layers:
        return None, f"one pipeline of {world} stages needs >= {world} layers ({layers}): see hybrid and 3-D"
    return {"strategy": "pipeline_parallel", "stages": world, "pp_engine": "torch", "schedule": "1f1b"}, ""


def _three_d(world: int, shape: str, gpus_per_node: int) -> tuple[dict | None, str]:
    tp = tp_degree(shape)
    tp3 = tp if world > gpus_per_node else min(tp, world // 2)
    stages = PP_STAGES if world > gpus_per_node else world // tp3
    return {"strategy": "hybrid_parallel", "tp": tp3, "stages": stages, "pp_engine": "torch", "schedule": "1f1b"}, ""


# Each row of the table: a label and the run entry (as a study config writes it) of that layout at ``world``
# GPUs for ``shape``, or None and why not.
LAYOUTS = {
    "data_parallel": lambda world, shape, gpn: ({"strategy": "data_parallel"}, ""),
    "fsdp": lambda world, shape, gpn: ({"strategy": "fsdp"}, ""),
    "zero1": lambda world, shape, gpn: ({"strategy": "zero", "zero_stage": 1}, ""),
    "zero2": lambda world, shape, gpn: ({"strategy": "zero", "zero_stage": 2}, ""),
    "zero3": lambda world, shape, gpn: ({"strategy": "zero", "zero_stage": 3}, ""),
    "tensor_parallel": lambda world, shape, gpn: (
        {"strategy": "tensor_parallel", "tp": tp_degree(shape), "tp_engine": "torch"}, ""),
    "pipeline": _pipeline,
    "hybrid_pp_dp": lambda world, shape, gpn: (
        {"strategy": "hybrid_parallel", "stages": PP_STAGES, "pp_engine": "torch", "schedule": "1f1b"}, ""),
    "3d_pp_tp_dp": _three_d,
}
STRATEGIES = tuple(LAYOUTS)


def layout(strategy: str, world: int, shape: str, gpus_per_node: int = 8) -> tuple[dict | None, str]:
    """The run entry (as a study config writes it) of ``strategy`` at ``world`` GPUs, or None and why not."""
    if strategy not in LAYOUTS:
        raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")
    entry, why = LAYOUTS[strategy](world, shape, gpus_per_node)
    if entry is None:
        return None, why
    nodes, per_node = max(1, world // gpus_per_node), min(world, gpus_per_node)
    return {"nodes": nodes, "gpus_per_node": per_node, "micro_batch_size": "auto", **entry}, ""


def train_section(shape: str, world: int, card_name: str) -> dict:
    """The train settings of a layout at ``world`` GPUs: weak scaling at TOKENS_PER_GPU per GPU."""
    return {**TRAIN, "card": card_name, "global_batch": world * TOKENS_PER_GPU // SHAPES[shape]["seq_len"]}


def resolve_layout(shape: str, strategy: str, world: int, card_name: str,
                   micro_batch_size: int | str = "auto") -> tuple[RunSpec | None, dict, str]:
    """(the resolved run, its train settings, a note). With ``auto`` and no micro-batch predicted to fit,
    the run at micro-batch 1 (so its peak can still be shown) and the reason in the note."""
    entry, why = layout(strategy, world, shape, card(card_name)["cluster"]["gpus_per_node"])
    model = SHAPES[shape]
    train = train_section(shape, world, card_name)
    if entry is None:
        return None, train, why
    if micro_batch_size != "auto":
        return resolve(strategy, {**entry, "micro_batch_size": micro_batch_size}, model, train), train, ""
    try:
        return auto_micro_batch(strategy, entry, model, train, model["vocab_size"]), train, ""
    except ConfigError:
        spec = resolve(strategy, {**entry, "micro_batch_size": 1}, model, train)
        memory = card(card_name)["memory_gib"]
        return spec, train, (f"does not fit {1 - FIT_MARGIN:.0%} of {memory} GiB even at "
                             "micro-batch 1 (its peak shown)")


def layout_text(run: RunSpec) -> str:
    parts = [f"{k} {getattr(run, k)}" for k in ("tp", "stages", "dp") if getattr(run, k) > 1 or k == "dp"]
    text = " × ".join(parts).replace("stages", "pp")
    if run.preset.zero:
        text += f" (ZeRO-{run.zero_stage})"
    return text


def inter_node_groups(run: RunSpec, c: dict) -> str:
    """The parallel groups whose collectives the plan sends over the inter-node link (as ``plan.step.link_bw``)."""
    intra = c["link_busbw_gbps"] * 1e9
    groups = {"tp": (run.tp, 1), "dp": (run.dp, run.tp), "pp": (2 if run.stages > 1 else 1, run.tp * run.dp)}
    out = [g for g, (size, stride) in groups.items() if size > 1 and link_bw(c, size, stride) < intra]
    return ", ".join(out) or "none"


def predict_row(shape: str, strategy: str, world: int, card_name: str,
                micro_batch_size: int | str = "auto", efficiency: dict | None = None) -> dict:
    """One row of the extrapolation table (model output)."""
    run, train, note = resolve_layout(shape, strategy, world, card_name, micro_batch_size)
    model = SHAPES[shape]
    c = card(card_name)
    row = {"shape": shape, "seq_len": model["seq_len"], "strategy": strategy, "gpus": world,
           "nodes": max(1, world // c["cluster"]["gpus_per_node"]), "layout": "–",
           "inter_node": "–", "global_batch": train["global_batch"], "micro_batch_size": None,
           "micro_batches": None, "predicted_peak_gib": math.nan, "predicted_fits": None,
           "predicted_step_s": math.nan, "predicted_tokens_per_s_per_gpu": math.nan, "predicted_mfu": math.nan,
           "predicted_comm_share": math.nan, "predicted_bubble": math.nan, "note": note}
    if run is None:
        return row
    pred = predict(model, model["vocab_size"], run, train, card_name)
    fit = fits(pred["peak_gib"], c["memory_gib"])
    row.update(layout=layout_text(run), inter_node=inter_node_groups(run, c), micro_batch_size=run.micro_batch_size,
               micro_batches=run.micro_batches, predicted_peak_gib=pred["peak_gib"], predicted_fits=fit,
               predicted_bubble=pred["bubble"])
    if fit:  # a layout that does not fit does not run: no time for it
        comm = sum(pred["time_s"].get(k, 0.0) for k in ("tp_comm", "pp_p2p", "dp_comm"))
        row.update(predicted_step_s=pred["step_s"], predicted_tokens_per_s_per_gpu=pred["tokens_per_s"] / world,
                   predicted_mfu=pred["mfu"], predicted_comm_share=comm / pred["step_s"])
        if efficiency:
            row.update(time_to_target(efficiency, train["global_batch"] * model["seq_len"], pred["step_s"]))
    return row


def extrapolate(card_name: str, shapes=tuple(SHAPES), worlds=WORLDS, strategies=STRATEGIES,
                efficiency: dict | None = None) -> list[dict]:
    """The table: every strategy for every shape at every GPU count, on ``card_name``'s constants (with
    ``efficiency``, each row's predicted steps and time to the sweep's target)."""
    return [predict_row(s, k, w, card_name, efficiency=efficiency) for s in shapes for k in strategies
            for w in worlds]


def assumptions(card_name: str) -> list[str]:
    """What the table rests on, with the numbers it used."""
    c = card(card_name)
    cl = c["cluster"]
    shapes = "; ".join(
        f"{name}: hidden {d['hidden_size']}, {d['num_layers']} layers, {d['num_heads']} heads / "
        f"{d['num_kv_heads']} KV heads, SwiGLU {d['intermediate_size']}, vocabulary {m['vocab_size']:,}, "
        f"sequence {m['seq_len']}"
        for name, m in SHAPES.items() for d in [model_dims(m)])
    return [
        "Model output of llmpar.plan, never measured: no recorded run crosses a node or uses more than 4 GPUs. "
        f"Card constants: {c['name']} (src/llmpar/cards.yaml, each with its source), fitted on single-GPU runs "
        "(the TP all-reduce rate on the 2-GPU TP runs, ZeRO-3's gather rate on the 2-GPU ZeRO-3 run) and checked on "
        "the other 2- and 4-GPU runs (the predicted-vs-measured figure).",
        f"Shapes: {shapes}.",
        f"Weak scaling: {TOKENS_PER_GPU:,} tokens per GPU per optimizer step (8 × 2048 for the 1.1B, 2 × 8192 for "
        "the 8B), so the global batch is GPUs × that; tokens/s per GPU and MFU are comparable across columns.",
        f"{cl['gpus_per_node']} GPUs per node. Intra-node all-reduce bus bandwidth {c['link_busbw_gbps']} GB/s "
        f"(NVLink, measured on the 2 x H100 machines), {c['tp_allreduce_busbw_gbps']} GB/s effective for tensor "
        f"parallelism's activation all-reduces and {c['zero3_busbw_gbps']} GB/s for DeepSpeed ZeRO-3's "
        "module-by-module gathers and reduce-scatters (both fitted); inter-node "
        f"{cl['inter_node_busbw_gbps']} GB/s per GPU "
        "(400 Gb/s InfiniBand, one NIC per GPU, ~90 % achieved: an assumption); "
        f"{cl['collective_latency_s'] * 1e6:.0f} µs per collective. A collective whose group spans nodes runs at "
        "the inter-node rate (a ring is as slow as its slowest hop; no tree or hierarchical all-reduce, no "
        "SHARP, no congestion, no topology).",
        "Rank order: tensor parallel innermost (inside a node), then data parallel, then pipeline stages; "
        f"tp = {tp_degree('8B')} for the 8B, {tp_degree('1.1B')} for the 1.1B (it must divide the KV heads: 4). "
        f"Hybrid pp × dp: {PP_STAGES} stages; 3-D: tp × {PP_STAGES} stages × dp (at 8 GPUs tp 4 × 2 stages); "
        "a single pipeline only up to the layer count. Pipelines: torch pipelining, 1F1B.",
        "bf16 autocast with fp32 weights, gradients and AdamW moments, per-layer torch.compile, no activation "
        "checkpointing, no offload. Engines: torch DDP, FSDP2 (full shard over all GPUs), DeepSpeed ZeRO "
        "(torch_autocast), torch tensor parallel, torch pipelining.",
        f"Micro-batch: the largest the plan predicts to fit {1 - FIT_MARGIN:.0%} of the card "
        f"({c['memory_gib']} GiB), as micro_batch_size: auto; pipelines keep at least max(4, 2 × stages) "
        "micro-batches. 'fits' is that criterion; a layout that does not fit at micro-batch 1 shows its peak "
        "there and no time.",
        "Overlap as the plan models it: DDP and ZeRO-1/2 hide their gradient all-reduce behind the last "
        "micro-batch's backward; FSDP prefetches its gathers; ZeRO-3's gathers, tensor-parallel all-reduces "
        "and pipeline transfers are on the critical path. Attention runs at the rate measured at sequence "
        "2048 (the 8B uses 8192).",
        "Every recorded GPU run is within the plan's bounds (plan.csv). Not modelled: stragglers, failures "
        "and restarts, data "
        "loading, NCCL's algorithm choice, hierarchical sharding (HSDP).",
        "As the code runs them: torch tensor parallel replicates the output head (DeepSpeed AutoTP splits it), "
        "and the pipeline cut balances parameters, not work; with the 8B's 128,256-row head the last stage of "
        "a 3-D layout does several times the GEMMs of the others, and the step waits for it. Torch "
        "pipelining allocates its receive buffers for every micro-batch up front (counted).",
    ]
