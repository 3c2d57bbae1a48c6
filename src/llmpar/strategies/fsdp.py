"""Fully sharded data parallel: FSDP2 (``fully_shard``), optionally composed with tensor parallel.

``fully_shard`` is applied bottom-up: each decoder layer is its own group (all-gathered before its
forward, and, with ``reshard_after_forward``, freed after it and gathered again in backward), then the
root takes the rest (embedding, final norm, lm_head). Parameters, gradients and AdamW state are
DTensors sharded on dim 0 over the data-parallel ranks; gradients are reduce-scattered after every
micro-batch's backward (memory stays sharded under gradient accumulation).

With ``tp > 1`` (FSDP x TP) the ranks form a 2-D mesh (dp_shard, tp), tp innermost: the decoder
projections are first split over tp with ``parallelize_module`` (see :mod:`tp_torch`), then every
parameter is sharded over dp_shard (TP weights become 2-D DTensors; embedding, norms and lm_head
are 1-D DTensors on the dp_shard mesh, replicated over tp). The ranks of a tp group load the same
batch slice; ``dp_rank`` is the coordinate on dp_shard.

Precision ``bf16`` uses ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the fp32
sharded master weights are all-gathered in bf16 and gradients reduced in fp32 (the training loop's
bf16 autocast stays on for the ops it covers); ``bf16-pure`` shards bf16 weights.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from llmpar.errors import ConfigError
from llmpar.strategies.base import decoder_layers, prepare_model
from llmpar.strategies.torch_common import MeshEngine


class FSDPEngine(MeshEngine):
    """:class:`MeshEngine` that reshards after evaluation.

    A forward without backward leaves groups with ``reshard_after_forward=False`` unsharded (the
    backward would reshard them); resharding explicitly keeps memory, the parameter count and
    checkpoints in the sharded state between evaluation and the next step.
    """

    def eval_loss(self, inputs, labels):
        loss = super().eval_loss(inputs, labels)
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        return loss


def parallelize(model, spec, ctx, train_cfg) -> FSDPEngine:
    if spec.stages != 1:
        raise ConfigError("fsdp composes with tp, not with pipeline stages")
    tp = spec.tp
    if ctx.world_size % tp:
        raise ConfigError(f"world size {ctx.world_size} is not divisible by tp {tp}")
    dp = ctx.world_size // tp
    if tp > 1:
        if spec.tp_engine != "torch":
            raise ConfigError("fsdp x tp composes with the torch tensor-parallel engine only "
                              "(tp_engine: torch)")
        from llmpar.strategies.tp_torch import apply_tp, check_heads

        check_heads(model, tp)
        mesh = init_device_mesh(ctx.device.type, (dp, tp), mesh_dim_names=("dp_shard", "tp"))
        apply_tp(decoder_layers(model), mesh["tp"])
        dp_mesh = mesh["dp_shard"]
    else:
        dp_mesh = init_device_mesh(ctx.device.type, (dp,), mesh_dim_names=("dp_shard",))

    model = prepare_model(model, spec)
    mp = MixedPrecisionPolicy()
    if spec.precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = dict(mesh=dp_mesh, reshard_after_forward=spec.reshard_after_forward, mp_policy=mp)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return FSDPEngine(model, spec, ctx, train_cfg, dp_rank=dp_mesh.get_local_rank(), dp_size=dp,
                      dp_group=dp_mesh.get_group())
