"""Tensor parallel with DeepSpeed AutoTP (training), data parallel over the remaining ranks.

``"tensor_parallel": {"autotp_size": tp}`` makes ``deepspeed.initialize`` shard the HF model in
place, following the model's own tensor-parallel plan (``LlamaForCausalLM``'s ``_tp_plan`` and
``LlamaConfig.base_model_tp_plan``): q/k/v, gate and up column-parallel, o and down row-parallel (an
all-reduce of the output), and ``lm_head`` column-parallel over the vocabulary with the logits
gathered. So every decoder-layer matrix and the output projection hold 1/tp of their rows or columns
on each rank; the input embedding and all RMSNorm weights are replicated on every rank of the TP
group (the test asserts this exact split from the per-rank parameter counts).

Precision: ``bf16`` is DeepSpeed's ``torch_autocast`` mode (fp32 weights and gradients, bf16
matmuls; see ds_common). ``bf16-pure`` is rejected (DeepSpeed has no bf16-master mode without ZeRO).

Process layout: DeepSpeed builds a (data, tensor) device mesh over the world
(``deepspeed.utils.groups._init_tp_mesh_device``), so rank = dp_index * tp + tp_index: consecutive
ranks form a TP group and must load the same data (DeepSpeed checks it on the first forward). The
engine's data-parallel coordinates are read back from DeepSpeed's own data-parallel group.
"""

from __future__ import annotations

from llmpar.strategies import ds_common


def parallelize(model, spec, ctx, train_cfg):
    ds_common.init_deepspeed(ctx)
    ds_common.apply_levers(model, spec)
    config = ds_common.ds_config(spec, train_cfg, model=model)
    config["tensor_parallel"] = {"autotp_size": spec.tp}
    # Build DeepSpeed's (data, tensor) mesh now and hand it over as the mpu: DeepSpeed's config checks
    # train_batch_size = micro_batch * accumulation * data-parallel size, and without an mpu it takes the
    # whole world as the data-parallel size (the engine creates the same mesh later, after the check).
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=spec.tp)
    engine = ds_common.initialize(model, config, train_cfg, mpu=groups)
    out = ds_common.DeepSpeedEngine(engine, spec, ctx, train_cfg)
    expected_dp = ctx.world_size // spec.tp
    if out.dp_size != expected_dp or out.dp_rank != ctx.rank // spec.tp:
        raise RuntimeError(f"DeepSpeed AutoTP grouped rank {ctx.rank} as data-parallel {out.dp_rank}/{out.dp_size}, "
                           f"expected {ctx.rank // spec.tp}/{expected_dp} (rank = dp_index * tp + tp_index)")
    return out
