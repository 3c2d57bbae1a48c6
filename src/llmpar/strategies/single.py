"""The baseline: one process, the whole model, the whole global batch (with accumulation if asked)."""

from __future__ import annotations

from llmpar.strategies.base import TorchEngine, prepare_model


def parallelize(model, spec, ctx, train_cfg) -> TorchEngine:
    if ctx.world_size != 1:
        raise ValueError(f"strategy single runs one process, got world size {ctx.world_size}")
    return TorchEngine(prepare_model(model, spec), spec, ctx, train_cfg)
