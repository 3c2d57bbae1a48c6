"""One `parallelize` function per strategy: plain model in, an Engine the training loop can step out.

Each module registers its function in PARALLELIZE; the loop never branches on the strategy.
"""

from __future__ import annotations

import importlib

# strategy name -> module in this package that defines `parallelize(model, spec, ctx, train_cfg)`
MODULES = {
    "single": "single",
    "data_parallel": "ddp",
    "tensor_parallel": "tensor",
    "pipeline_parallel": "pipeline",
    "hybrid_parallel": "pipeline",
    "fsdp": "fsdp",
    "zero": "zero",
}


def parallelize(model, spec, ctx, train_cfg):
    """Apply ``spec.strategy`` to ``model``; returns a :class:`llmpar.strategies.base.Engine`."""
    if spec.strategy not in MODULES:
        raise ValueError(f"unknown strategy {spec.strategy!r}")
    module = importlib.import_module(f"llmpar.strategies.{MODULES[spec.strategy]}")
    return module.parallelize(model, spec, ctx, train_cfg)
