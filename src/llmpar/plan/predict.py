"""One run's prediction (peak memory, step time, tokens/s, MFU) and the micro-batch that fits a card."""

from __future__ import annotations

import math

from llmpar.errors import ConfigError
from llmpar.layout import DDP_BUCKET_MB, RunSpec, default_micro_batches, resolve
from llmpar.metrics.definitions import peak_flops_for
from llmpar.plan.cards import card
from llmpar.plan.memory import GIB, memory
from llmpar.plan.step import step_time
from llmpar.shape import flops_per_token, shape_of

FIT_MARGIN = 0.10  # refuse above 90 % of the card: reserved exceeded allocated by up to 7.5 GiB (9 % of 80 GB)


# The per-run levers the plan predicts and has checked against a recorded run it was not fitted on: the
# compiled and eager layers, bf16 autocast, full activation checkpointing (results/h200-1b-levers), every
# strategy's default settings (the 1-, 2- and 4-GPU studies), and the kernel levers of results/h100-1b-kernels:
# FA4's attention (at the card's own rate for it), the bf16 residual stream, the fused projections (counted as
# the separate ones), quack's MLP (its unsaved SwiGLU product taken off the memory and the elementwise
# traffic), quack's norms in compiled layers (the residual add each fuses taken off the elementwise traffic)
# and bf16-master (bf16 autocast's weight casts and fp32 gradient add taken off the elementwise and optimizer
# traffic, its states as bf16 weights beside fp32 masters). Any other setting is predicted by the same count
# but never checked, so a prediction for it comes with the reason it is not bounded.
def attention_rate_key(train: dict) -> str | None:
    """The card constant that holds the rate of the run's attention kernel beside cuDNN's
    (``attention_tflops_fa4_op`` for ``fa4-op``); None for cuDNN's own (``attention_tflops``)."""
    attention = train.get("attention", "cudnn")
    return None if attention == "cudnn" else "attention_tflops_" + attention.replace("-", "_")


def compiled_layers(run: RunSpec, train: dict) -> bool:
    """Whether the run's layers are compiled: torch.compile on, and the run not on CPU (compile is off there)."""
    return bool(run.compile) and train.get("device", "auto") != "cpu"


def unmodelled(run: RunSpec, train: dict, c: dict | None = None) -> list[str]:
    """Why the plan's prediction of ``run`` on card constants ``c`` is not checked against a recorded run
    (empty: it is)."""
    out = []
    # bf16, bf16-residual and bf16-master (recorded in the kernels study) are checked
    if not run.precision.autocast:
        out.append(f"precision {run.precision}: the card's GEMM and attention rates are bf16 rates; no run "
                   "of this precision is recorded")
    if run.activation_checkpointing == "selective":
        out.append("selective activation checkpointing: counted like full checkpointing on every second layer, "
                   "not checked against a recorded run")
    if run.offload != "none":
        out.append(f"offload {run.offload}: host memory and PCIe transfers are not modelled")
    if not run.reshard_after_forward:
        out.append("reshard_after_forward false: FSDP2's gathered layers kept through the backward are not counted")
    if run.pipeline_balance != "parameters":
        out.append(f"pipeline_balance {run.pipeline_balance}: the recorded pipelines cut their stages by parameters")
    if run.ddp_bucket_mb != DDP_BUCKET_MB:
        out.append(f"ddp_bucket_mb {run.ddp_bucket_mb}: the data-parallel runs the plan was checked on use DDP's "
                   f"{DDP_BUCKET_MB} MiB buckets")
    if run.compile_mode != "default":
        out.append(f"compile_mode {run.compile_mode}: the elementwise rate and host time are fitted on the "
                   "default mode")
    if run.norm != "torch" and not compiled_layers(run, train):
        out.append(f"norm {run.norm} in eager layers: the separate norm and residual-add kernels it fuses are not "
                   "counted")
    key = attention_rate_key(train)
    if key and not (c and key in c):
        out.append(f"attention {train['attention']}: the card has no {key}; the attention rate is cuDNN's")
    if not train.get("fused_loss", True):
        out.append("fused_loss false: the eager cross-entropy's fp32 logits are not counted in the step time")
    return out


def predict(model_cfg: dict, vocab_size: int, run: RunSpec | dict, train: dict, card_name: str | None) -> dict:
    """Predicted peak GiB (max over ranks), step seconds, tokens/s and MFU of one run on ``card_name``
    (None: memory only, no allocator overhead; the CPU check uses this), and ``unmodelled``: the reasons the
    prediction is not checked against a recorded run (:func:`unmodelled`)."""
    run = run if isinstance(run, RunSpec) else RunSpec.from_dict(run)
    sh = shape_of(model_cfg, vocab_size)
    compiled = compiled_layers(run, train)
    c = card(card_name) if card_name else None
    key = attention_rate_key(train)
    if c and key in c:  # the run's attention kernel at its own rate
        c = {**c, "attention_tflops": c[key]}
    mem = memory(sh, run, compiled, c["allocator_overhead_gib"] if c else 0.0)
    peak = max(mem, key=lambda r: r["total"])
    out = {"peak_gib": peak["total"] / GIB, "peak_rank": peak["rank"], "unmodelled": unmodelled(run, train, c),
           "memory_gib": {k: v / GIB for k, v in peak["parts"].items()},
           "per_rank_gib": [r["total"] / GIB for r in mem]}
    if c:
        t = step_time(sh, run, compiled, c)
        tokens = run.global_batch * sh.seq
        out.update(step_s=t["total"], time_s=t["parts"], bubble=t["bubble"], tokens_per_s=tokens / t["total"],
                   mfu=tokens / t["total"] / run.world_size * flops_per_token(model_cfg, vocab_size)
                   / peak_flops_for(c["name"], None),
                   card_memory_gib=c["memory_gib"])
    return out


def fits(peak_gib: float, memory_gib: float, margin: float = FIT_MARGIN) -> bool:
    return peak_gib <= (1 - margin) * memory_gib


def error(predicted: float, measured: float) -> float:
    """Relative error of a prediction: (predicted - measured) / measured."""
    return (predicted - measured) / measured if measured else math.nan


def auto_micro_batch(name: str, entry: dict, model: dict, train: dict, vocab_size: int, runtime_min: int = 20,
                     default_procs: int = 2) -> RunSpec:
    """``micro_batch_size: auto``: the largest size that divides the replica's batch and that the plan
    predicts to fit ``train.card`` with its margin (peak <= 90 % of the card). A pipeline keeps at least the
    default micro-batches (max(4, 2 x stages)), so its bubble stays small."""
    where = f"runs.{name}.micro_batch_size"
    card_name = train.get("card")
    if not card_name:
        raise ConfigError(f"{where}: auto needs train.card (the card to fit: h100, h200; src/llmpar/cards.yaml)")
    try:
        memory_gib = card(card_name)["memory_gib"]
    except KeyError as exc:
        raise ConfigError(f"config key 'train.card': {exc.args[0]}") from None
    if entry.get("micro_batches") is not None:
        raise ConfigError(f"{where}: auto chooses the micro-batches too; remove runs.{name}.micro_batches")
    base = {k: v for k, v in entry.items() if k != "micro_batch_size"}
    one = resolve(name, {**base, "micro_batch_size": 1}, model, train, runtime_min, default_procs)
    per_replica = one.global_batch // one.dp
    tried = {}
    for mbs in sorted((d for d in range(1, per_replica + 1) if per_replica % d == 0), reverse=True):
        try:
            spec = resolve(name, {**base, "micro_batch_size": mbs}, model, train, runtime_min, default_procs)
        except ConfigError:  # e.g. interleaved 1F1B needs micro-batches divisible by stages
            continue
        if spec.stages > 1 and spec.micro_batches < default_micro_batches(spec.stages, spec.pipelined):
            continue
        tried[mbs] = predict(model, vocab_size, spec, train, card_name)["peak_gib"]
        if fits(tried[mbs], memory_gib):
            return spec
    shown = ", ".join(f"{k}: {v:.1f} GiB" for k, v in tried.items())
    raise ConfigError(f"{where}: no micro-batch size is predicted to fit {1 - FIT_MARGIN:.0%} of the "
                      f"{memory_gib:.1f} GiB of {card_name} ({shown})")
