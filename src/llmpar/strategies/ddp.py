"""Data parallel: PyTorch DistributedDataParallel, every rank a full replica on its slice of the batch.

Gradients are averaged by DDP's bucketed all-reduce (buckets of ``ddp_bucket_mb`` MiB),
overlapped with the backward pass, the gradients views into the buckets; with several
micro-batches per step, the all-reduce runs only on the last one (``no_sync``). DDP runs its own
all-reduce, with no communication hook: the noise scale's small batch is measured before it, by a hook
on every parameter's gradient per micro-batch (:class:`~llmpar.strategies.replica_norm.GradNormHooks`, as for
DeepSpeed), registered only on the steps that measure (``train.noise_scale_every``).
"""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel as DDP

from llmpar.strategies.engine import TorchEngine
from llmpar.strategies.levers import prepare_model


def parallelize(model, spec, ctx, train_cfg) -> TorchEngine:
    model = prepare_model(model, spec)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # static_graph=True is not offered: in a run of two micro-batches (no_sync on the first) on the CPU, the first
    # backward failed in torch 2.11's reducer (INTERNAL ASSERT expect_autograd_hooks_)
    ddp = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, bucket_cap_mb=spec.ddp_bucket_mb)
    engine = TorchEngine(ddp, spec, ctx, train_cfg, dp_rank=ctx.rank, dp_size=ctx.world_size, no_sync=ddp.no_sync)
    engine.hook_micro_batches(ddp.module.parameters())
    return engine
