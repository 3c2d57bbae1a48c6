"""Data parallel: PyTorch DistributedDataParallel, every rank a full replica on its slice of the batch.

Gradients are averaged by DDP's bucketed all-reduce, overlapped with the backward pass; with several
micro-batches per step, the all-reduce runs only on the last one (``no_sync``). The all-reduce goes
through a communication hook that first adds each bucket's squared norm: the squared norm of this
replica's own gradient before averaging, the small-batch half of the gradient noise scale
(:mod:`llmpar.metrics.noise_scale`). The hook then does exactly what DDP does without one (divide by
the world size, all-reduce).
"""

from __future__ import annotations

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from llmpar.strategies.base import SquaredNorms, TorchEngine, prepare_model


class LocalNorm(SquaredNorms):
    """The communication hook: adds each bucket's squared norm, then DDP's own average."""

    def hook(self, _state, bucket):
        self.add(bucket.buffer())
        return allreduce_hook(None, bucket)


class DDPEngine(TorchEngine):
    def __init__(self, ddp: DDP, *args, **kwargs):
        super().__init__(ddp, *args, no_sync=ddp.no_sync, **kwargs)
        self.local_norm = LocalNorm()
        if self.measure_noise_scale:  # else DDP's own all-reduce, without the hook (train.metrics: false)
            ddp.register_comm_hook(None, self.local_norm.hook)

    def sync_grads(self) -> None:
        # DDP averaged the gradients inside backward; keep what the hook saw before
        self._local_grad_sq = self.local_norm.take()


def parallelize(model, spec, ctx, train_cfg) -> TorchEngine:
    model = prepare_model(model, spec)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    return DDPEngine(ddp, spec, ctx, train_cfg, dp_rank=ctx.rank, dp_size=ctx.world_size)
