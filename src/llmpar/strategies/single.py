"""The baseline: one process, the whole model, the whole global batch (with accumulation if asked)."""

from __future__ import annotations

from llmpar.strategies.engine import TorchEngine
from llmpar.strategies.levers import prepare_model


def parallelize(model, spec, ctx, train_cfg) -> TorchEngine:
    if ctx.world_size != 1:
        raise ValueError(f"strategy single runs one process, got world size {ctx.world_size}")
    engine = TorchEngine(prepare_model(model, spec), spec, ctx, train_cfg)
    engine.hook_micro_batches(engine.model.parameters())  # several micro-batches: the noise scale's small batch
    return engine
