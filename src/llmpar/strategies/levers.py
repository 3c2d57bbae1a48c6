"""The per-run levers every engine applies to the plain model, in torchtitan's order: precision,
activation checkpointing, compile."""

from __future__ import annotations

import contextlib

import torch

from llmpar.kernels import QUACK_MLPS
from llmpar.layout import Precision
from llmpar.model import fuse_projections


def autocast(precision: Precision | str, device: torch.device):
    """bf16 autocast (fp32 master weights) or nothing (fp32, or pure bf16 weights)."""
    if Precision(precision).autocast:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def _to_bf16(module, args, output):
    return output.to(torch.bfloat16)


def carry_residual_in_bf16(model) -> None:
    """``precision: bf16-residual``: the token embedding's output cast to bf16, so the residual stream (the
    hidden states every decoder layer reads and adds to) and its gradient are bf16 while the weights,
    gradients and optimizer states stay fp32 under autocast. Each RMSNorm still normalises in fp32; its
    output rounds to bf16 before the projections, as autocast rounds it anyway. Megatron-LM carries the
    residual in bf16 by default (``fp32_residual_connection`` off), as FSDP2's usual mixed precision does;
    the hook is on the embedding module itself, so every engine that runs the module (a pipeline's first
    stage, ZeRO-3's gathered module) runs it."""
    model.model.embed_tokens.register_forward_hook(_to_bf16)


def apply_activation_checkpointing(model, mode: str) -> None:
    """Wrap decoder layers in non-reentrant checkpointing: ``full`` every layer, ``selective`` every 2nd."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for i in range(len(layers)):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)


def apply_compile(model, enabled: bool, in_place: bool = False, mode: str = "default") -> None:
    """torch.compile each decoder layer (torchtitan's per-block compile: small graphs, fast recompiles).

    The torch engines replace each layer by its ``OptimizedModule`` wrapper (what the recorded GPU
    runs measured; FSDP2 then wraps the compiled layer, its hooks outside the graph). DeepSpeed engines
    compile in place (``nn.Module.compile``: same module, same parameter names), because ZeRO-3's forward
    hooks fail on the wrappers' plain-dict ``_parameters`` (``'dict' object has no attribute
    '_in_forward'``). ``mode``: torch.compile's (``train.compile_mode``).
    """
    if not enabled:
        return
    options = {"fullgraph": False, "mode": None if mode == "default" else mode}
    layers = decoder_layers(model)
    for i in range(len(layers)):
        if in_place:
            layers[i].compile(**options)
        else:
            layers[i] = torch.compile(layers[i], **options)


def prepare_model(model, spec) -> torch.nn.Module:
    """Fused projections, quack's MLP or norms, precision, activation checkpointing and compile: the per-run levers,
    in torchtitan's order. (``bf16-master`` casts the weights in its engine, which keeps their fp32 masters:
    :class:`llmpar.strategies.master.MasterWeights`.)"""
    if spec.fused_projections:
        fuse_projections(model, mlp=spec.mlp not in QUACK_MLPS)
    if spec.mlp in QUACK_MLPS:
        from llmpar.quack_mlp import use_quack_mlp

        use_quack_mlp(model, autotuned=spec.mlp == "quack-autotuned")
    if spec.norm == "quack":
        from llmpar.quack_norm import use_quack_norm

        use_quack_norm(model)
    if spec.precision is Precision.BF16_PURE:
        model.to(torch.bfloat16)
    if spec.precision is Precision.BF16_RESIDUAL:
        carry_residual_in_bf16(model)
    apply_activation_checkpointing(model, spec.activation_checkpointing)
    apply_compile(model, spec.compile, mode=spec.compile_mode)
    return model


