"""One module per strategy, each a ``parallelize(model, spec, ctx, train_cfg) -> Engine`` applied to the plain
model (:mod:`llmpar.model`); which module serves a strategy name is its row of :data:`llmpar.layout.PRESETS`.

Shared by the engines: the contract and the torch step (:mod:`.engine`), the per-run levers
(:mod:`.levers`), the loss (:mod:`.loss`), the optimizer and schedule (:mod:`.optim`), the phase timer
(:mod:`.timer`) and the noise scale's replica norms (:mod:`.replica_norm`).
"""

from __future__ import annotations

import importlib

from llmpar.layout import PRESETS


def parallelize(model, spec, ctx, train_cfg):
    """Apply ``spec.strategy`` to ``model``; returns a :class:`llmpar.strategies.engine.Engine`."""
    if spec.strategy not in PRESETS:
        raise ValueError(f"unknown strategy {spec.strategy!r}")
    module = importlib.import_module(f"llmpar.strategies.{PRESETS[spec.strategy].module}")
    return module.parallelize(model, spec, ctx, train_cfg)
