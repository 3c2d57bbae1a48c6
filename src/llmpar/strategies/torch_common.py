"""Pieces the PyTorch-native mesh strategies share (tensor parallel, pipelines, FSDP2).

* :func:`clip_grad_norm_` – global-norm clipping that is correct when gradients are DTensors (sharded
  by TP and/or FSDP, possibly on different meshes) and/or spread over pipeline stages;
* :func:`allreduce_grads_` – bucketed gradient averaging over a data-parallel group (for the layouts
  that keep full replicas per data-parallel rank: TP x DP and PP x DP);
* :class:`MeshEngine` – :class:`~llmpar.strategies.engine.TorchEngine` with those two in its step.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llmpar.strategies.engine import TorchEngine
from llmpar.strategies.optim import clip_coefficient

BUCKET_ELEMENTS = 25_000_000  # elements per all-reduce bucket (100 MB in fp32)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (the local shard of a DTensor; a view sharing its storage)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def total_grad_norm(params, pp_group=None) -> torch.Tensor:
    """L2 norm of all gradients of the model (not just this rank's shard).

    DTensor gradients are grouped by mesh; each group's norm is a partial DTensor that
    ``full_tensor()`` reduces over that mesh (TP shards, FSDP shards). Plain tensors are replicated
    (identical on the ranks of their group), so their local norm is already the full one. With
    ``pp_group`` the squared norms of the stages are summed (each rank holds different layers).
    """
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups[key].append(p.grad)
    device = next((g for gs in groups.values() for g in gs), torch.zeros(())).device
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = sq + norm.float() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pp_group)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, pp_group=None) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (global norm + 1e-6)), as torch's clip_grad_norm_ does;
    returns the global norm before clipping."""
    params = [p for p in params if p.grad is not None]
    total = total_grad_norm(params, pp_group)
    coef = clip_coefficient(total, max_norm)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = local(p.grad)
        by_dtype[g.dtype].append(g)
    for grads in by_dtype.values():
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


@torch.no_grad()
def allreduce_grads_(params, group, size: int) -> None:
    """Average gradients over ``group`` (``size`` ranks) in flat buckets of ``BUCKET_ELEMENTS``.

    Used where every data-parallel rank holds a full replica of its (TP or pipeline) shard; the
    local shard of a DTensor gradient is averaged, which is what its replicas over the dp dimension
    need. Not overlapped with the backward pass (DDP's hooks would be; this is simpler and exact).
    """
    if size <= 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = local(p.grad)
            by_dtype[g.dtype].append(g)
    for grads in by_dtype.values():
        bucket: list[torch.Tensor] = []
        n = 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                n += g.numel()
            if bucket and (g is None or n >= BUCKET_ELEMENTS):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                flat.div_(size)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, n = [], 0


class MeshEngine(TorchEngine):
    """A module on a device mesh stepped by a torch optimizer (TP x DP, FSDP2, FSDP2 x TP).

    Differs from :class:`TorchEngine` in two places of the step: gradients are averaged over
    ``grad_sync_group`` when the data-parallel dimension is a plain replica (``grad_sync_size`` > 1;
    FSDP2 reduce-scatters by itself and passes none), and clipping uses :func:`clip_grad_norm_`,
    which is correct for DTensor gradients on several meshes.
    """

    def __init__(self, model, spec, ctx, train_cfg, *, grad_sync_group=None, grad_sync_size=1, **kwargs):
        super().__init__(model, spec, ctx, train_cfg, **kwargs)
        self.grad_sync_group, self.grad_sync_size = grad_sync_group, grad_sync_size

    def sync_grads(self) -> None:
        params = list(self.model.parameters())
        # a plain replica: its own gradient, before the average (noise scale)
        if self.grad_sync_size > 1 and self.noise.measuring:
            self.noise.value = total_grad_norm(params).square()
        allreduce_grads_(params, self.grad_sync_group, self.grad_sync_size)
        self.timer.stop("backward")  # the gradient all-reduce is part of backward (as inside DDP)

    def clip_grads(self, params):
        return clip_grad_norm_(params, self.train_cfg["grad_clip"])
