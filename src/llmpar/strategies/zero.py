"""ZeRO (DeepSpeed): data parallel with partitioned model states.

* stage 1 partitions the optimizer state (fp32 master weights and Adam moments) across the ranks;
* stage 2 also the gradients (reduce-scatter instead of all-reduce);
* stage 3 also the parameters (all-gathered layer by layer for forward and backward).

``offload: optimizer`` moves the optimizer partitions and the optimizer step to host memory (stage
1-3); ``offload: parameters`` (stage 3) also keeps the parameter partitions in host memory. The
optimizer stays the shared torch AdamW (not DeepSpeed's CPUAdam), so the update is the same as every
other engine's.

With ``stages > 1`` ZeRO-1 is composed with DeepSpeed's pipeline engine (the optimizer state of each
stage partitioned over that stage's data-parallel replicas): see :mod:`pp_deepspeed`. ZeRO-2/3 with a
pipeline are rejected at config time (DeepSpeed rejects them by design).
"""

from __future__ import annotations

from llmpar.strategies import ds_common


def parallelize(model, spec, ctx, train_cfg):
    if spec.stages > 1:
        from llmpar.strategies import pp_deepspeed

        return pp_deepspeed.parallelize(model, spec, ctx, train_cfg)
    ds_common.init_deepspeed(ctx)
    ds_common.apply_levers(model, spec)
    config = ds_common.ds_config(spec, train_cfg, model=model)
    engine = ds_common.initialize(model, config, train_cfg)
    return ds_common.DeepSpeedEngine(engine, spec, ctx, train_cfg)
