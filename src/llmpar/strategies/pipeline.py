"""Pipeline parallel (``--stages P``, ``--micro_batches M``) and hybrid pipeline x data parallel.
Two engines: DeepSpeed ``PipelineModule`` (``pp_engine: deepspeed``, 1F1B) and
``torch.distributed.pipelining`` (``pp_engine: torch``: gpipe, 1f1b, interleaved_1f1b)."""

from __future__ import annotations


def parallelize(model, spec, ctx, train_cfg):
    if spec.pp_engine == "deepspeed":
        from llmpar.strategies import pp_deepspeed as engine
    else:
        from llmpar.strategies import pp_torch as engine
    return engine.parallelize(model, spec, ctx, train_cfg)
