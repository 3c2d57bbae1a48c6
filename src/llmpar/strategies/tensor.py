"""Tensor parallel (``--tp N``), data parallel over the remaining ranks. Two engines:
DeepSpeed AutoTP (``tp_engine: deepspeed``) and PyTorch ``parallelize_module`` (``tp_engine: torch``)."""

from __future__ import annotations


def parallelize(model, spec, ctx, train_cfg):
    if spec.tp_engine == "deepspeed":
        from llmpar.strategies import tp_deepspeed as engine
    else:
        from llmpar.strategies import tp_torch as engine
    return engine.parallelize(model, spec, ctx, train_cfg)
