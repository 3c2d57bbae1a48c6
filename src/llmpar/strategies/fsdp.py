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

Precision ``bf16`` is the study's one mixed-precision numerics (bf16 autocast over fp32 master weights,
fp32 gradient reduction), as in every other engine. The decoder layers take
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, cast_forward_inputs=False)``: their fp32
shards are all-gathered in bf16 (half the traffic), and their inputs are left as they come. The root
(embedding, final norm, lm_head) keeps fp32 parameters. Together these keep the residual stream in
fp32 as autocast does everywhere else: FSDP2's usual policy (bf16 everywhere, inputs cast) carries the
residual stream in bf16, a different rounding path that on the GPU suite's model moved the gradient
norm 3.4 % from ``single``'s where every other engine stays within 0.7 % (2 x H100; on CPU 1.9 %
against DDP's 0.5 %). What remains is the layers' norm weights rounded to bf16 on the way in, as
autocast rounds every projection's. ``bf16-residual`` takes the same policies with the residual stream
cast to bf16 at the embedding (:func:`~llmpar.strategies.levers.carry_residual_in_bf16`), as every engine
does. ``bf16-pure`` shards bf16 weights.

Noise scale: every reduce-scatter goes through :class:`ReplicaNormReduceScatter` (FSDP2's public
``set_custom_reduce_scatter``), which adds the squared norm of its input, this rank's own unsharded
gradient of one parameter group for one micro-batch, before reducing it as FSDP2 would. Summed over
the groups that is the micro-batch's local gradient norm; the engine reports the mean over micro-batches
of the micro-batch mean gradient's squared norm, at batch global / (dp · micro-batches)
(``noise.splits``). FSDP2 divides before the reduction only for fp16 reductions (overflow), which
no precision here uses, so the input is the raw gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from llmpar.layout import MeshAxis
from llmpar.strategies.levers import decoder_layers, prepare_model
from llmpar.strategies.replica_norm import SquaredNorms
from llmpar.strategies.torch_common import MeshEngine


class ReplicaNormReduceScatter(SquaredNorms):
    """FSDP2's reduce-scatter (``dist.reduce_scatter_tensor``, the op FSDP2 chose) that first adds the squared
    norm of its input; runs on FSDP2's reduce-scatter stream, which the optimizer step waits for."""

    active = False  # on the steps that measure (FSDPEngine.begin_step)

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        if self.active:
            self.add(input_tensor)
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


class FSDPEngine(MeshEngine):
    """:class:`MeshEngine` that reshards after evaluation and measures each rank's own gradient norm in
    FSDP2's reduce-scatter (module docstring).

    A forward without backward leaves groups with ``reshard_after_forward=False`` unsharded (the
    backward would reshard them); resharding explicitly keeps memory, the parameter count and
    checkpoints in the sharded state between evaluation and the next step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise.splits = self.dp_size * self.spec.micro_batches
        self.replica_norm: ReplicaNormReduceScatter | None = None
        if not self.noise.enabled:
            return
        if self.spec.tp > 1:
            self.noise.reason = "FSDP x TP: each rank holds a tensor-parallel slice of its replica's gradient"
        elif self.dp_size == 1:  # FSDP2 calls no reduce-scatter on one rank (measured on CPU and gloo)
            self.noise.reason = ("FSDP2 on one rank: no reduce-scatter, so no micro-batch's gradient is seen "
                                 "before it accumulates")
        elif not hasattr(FSDPModule, "set_custom_reduce_scatter"):  # the hook is recent public API of FSDP2
            self.noise.reason = "this torch's FSDP2 has no custom reduce-scatter (set_custom_reduce_scatter)"
        else:
            self.replica_norm = ReplicaNormReduceScatter()
            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.set_custom_reduce_scatter(self.replica_norm)

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        if self.replica_norm is not None:
            self.replica_norm.active = self.noise.measuring

    def sync_grads(self) -> None:
        if self.replica_norm is not None and self.noise.measuring:
            sq = self.replica_norm.take()  # summed over micro-batches k of |g_k|², g_k = grad(L_k) / m
            self.noise.value = None if sq is None else sq * self.spec.micro_batches  # mean_k |m g_k|²
        super().sync_grads()

    def eval_loss(self, inputs, labels):
        loss = super().eval_loss(inputs, labels)
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        return loss


def parallelize(model, spec, ctx, train_cfg) -> FSDPEngine:
    tp, dp = spec.tp, spec.dp
    if tp > 1:
        from llmpar.strategies.tp_torch import apply_tp

        mesh = init_device_mesh(ctx.device.type, (dp, tp), mesh_dim_names=(MeshAxis.DP_SHARD, MeshAxis.TP))
        apply_tp(decoder_layers(model), mesh[MeshAxis.TP])
        dp_mesh = mesh[MeshAxis.DP_SHARD]
    else:
        dp_mesh = init_device_mesh(ctx.device.type, (dp,), mesh_dim_names=(MeshAxis.DP_SHARD,))

    model = prepare_model(model, spec)
    layer_mp = root_mp = MixedPrecisionPolicy()
    if spec.precision.autocast:  # the layers' inputs are left as the residual stream comes (module docstring)
        layer_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
        root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    kwargs = dict(mesh=dp_mesh, reshard_after_forward=spec.reshard_after_forward)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=layer_mp, **kwargs)
    fully_shard(model, mp_policy=root_mp, **kwargs)
    return FSDPEngine(model, spec, ctx, train_cfg, dp_rank=dp_mesh.get_local_rank(), dp_size=dp,
                      dp_group=dp_mesh.get_group())
