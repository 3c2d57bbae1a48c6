"""Pipeline parallel and pipeline x data parallel with ``torch.distributed.pipelining``.

Splitting. The HF model the loop built is cut into ``stages`` chunks (``2 x stages`` for
``interleaved_1f1b``), each a contiguous run of decoder layers; the first chunk also holds the
embedding, the last the final norm and ``lm_head``. The cut minimises the largest chunk's parameter
count (embedding and head included), or with ``pipeline_balance: flops`` its training FLOPs. Chunk ``c``
runs on pipeline rank ``c % stages`` (loop order, as ``ScheduleInterleaved1F1B`` expects). Chunks take
the model's own modules (moved, not re-initialised), and the unused modules are dropped from the model
so a rank keeps only its layers. Each chunk recomputes the rotary embeddings and causal mask itself
(``LlamaModel.forward`` computes them once for all layers) and runs under the run's autocast.

Schedules: ``gpipe`` (ScheduleGPipe), ``1f1b`` (Schedule1F1B), ``interleaved_1f1b``
(ScheduleInterleaved1F1B, 2 virtual stages per rank), manual ``PipelineStage`` objects whose shapes are
inferred on the first step. The loop's ``micro_batches`` are concatenated and the schedule splits
them again into the same micro-batches. The per-micro-batch loss is the mean cross-entropy divided by
the number of micro-batches (``scale_grads=False``), exactly what ``single`` back-propagates under
gradient accumulation, so the sum of the micro-batch losses is the replica's mean loss (the same
cross-entropy function as ``causal_lm_loss``: eager on CPU, compiled on CUDA).

Mesh: (pp, dp, tp), pipeline outermost (across nodes), tp innermost (within a node). Data parallel
(``hybrid_parallel``, dp = world / (stages x tp)): every pipeline loads its dp slice and gradients
are averaged over the dp group after the schedule's backward. With ``tp > 1`` (3-D) each chunk's
decoder projections are additionally split with ``parallelize_module`` over the tp ranks of its stage
(see :mod:`tp_torch`; activations between stages are plain replicated tensors, so every tp rank
sends to its peer of the next stage). The loss lives on the last stage; one all-reduce over the world
(only the last stage's tp-rank-0 contributes) gives every rank the global mean without a host sync.
Gradient clipping sums the squared norms of all stages (and of the DTensor shards).

``time_breakdown`` measures, per rank, the forward and backward compute of its chunks, the data-parallel
gradient all-reduce (``grad_sync``), the optimizer and ``pipeline_idle``: the rest of the schedule's
time (bubble plus point-to-point waits), the measured counterpart of the theoretical bubble (host
clocks on CPU, CUDA events on GPUs).

Evaluation runs the schedule forward-only (``schedule.eval``) on the same micro-batch shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from llmpar.layout import MeshAxis
from llmpar.model import decoder_layer_kwargs, model_shape
from llmpar.shape import balanced_split, pipeline_layer_weights
from llmpar.strategies.engine import TorchEngine
from llmpar.strategies.levers import autocast, decoder_layers, prepare_model
from llmpar.strategies.loss import cross_entropy_for
from llmpar.strategies.torch_common import allreduce_grads_, clip_grad_norm_, total_grad_norm

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


# --------------------------------------------------------------------------- splitting


def chunk_layer_ranges(model, n_chunks: int, balance: str = "parameters") -> list[tuple[int, int]]:
    """Layer ranges per chunk, balanced (``pipeline_balance``) by the count the plan uses
    (:func:`llmpar.shape.pipeline_layer_weights` of the model's shape): by parameters, with the embedding on
    the first and the final norm + lm_head on the last chunk, or by training FLOPs per token."""
    return balanced_split(pipeline_layer_weights(model_shape(model.config), balance), n_chunks)


class PipelineChunk(nn.Module):
    """One pipeline stage's module: decoder layers [start, end), plus the embedding (first chunk) or the
    final norm and lm_head (last chunk)."""

    def __init__(self, model, start: int, end: int, first: bool, last: bool, precision: str):
        super().__init__()
        inner = model.model
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): inner.layers[i] for i in range(start, end)})
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary_emb = inner.rotary_emb  # buffers only (inv_freq); shared by the chunks of a rank
        self.config = model.config
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, x.device):
            h = self.embed_tokens(x) if self.embed_tokens is not None else x
            kwargs = decoder_layer_kwargs(self.config, self.rotary_emb, h)
            for layer in self.layers.values():
                h = layer(h, **kwargs)
            if self.lm_head is not None:
                h = self.lm_head(self.norm(h))
        return h


class MicroBatchLoss:
    """The schedule's loss: mean cross-entropy of a micro-batch divided by the number of micro-batches,
    timed as forward compute of the last stage while the engine times its schedule."""

    def __init__(self, cross_entropy, micro_batches: int):
        self.cross_entropy, self.micro_batches = cross_entropy, micro_batches
        self.timer = None  # the engine's PhaseTimer during a timed training schedule, else None

    def __call__(self, logits, labels):
        if self.timer is None:
            return self.cross_entropy(logits, labels) / self.micro_batches
        self.timer.start()
        loss = self.cross_entropy(logits, labels) / self.micro_batches
        self.timer.stop("forward")
        return loss


def local_holder(model, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """This rank's modules under the FQNs of the HF model (``model.layers.7...``, ``lm_head``): what the
    optimizer steps and the checkpoint saves, so checkpoints name parameters as the full model does."""
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layer_ids})
    if first:
        holder.model.embed_tokens = model.model.embed_tokens
    if last:
        holder.model.norm = model.model.norm
        holder.lm_head = model.lm_head
    return holder


# --------------------------------------------------------------------------- engine


class PipelineEngine(TorchEngine):
    """Steps the schedule; the optimizer, checkpoints and accounting act on this rank's ``holder``."""

    def __init__(self, holder, chunks, schedule, loss, spec, ctx, train_cfg, *, mesh, has_first, has_last):
        dp_group = mesh[MeshAxis.DP].get_group()
        super().__init__(holder, spec, ctx, train_cfg, dp_rank=mesh.get_local_rank(MeshAxis.DP),
                         dp_size=mesh.size(mesh.mesh_dim_names.index(MeshAxis.DP)), dp_group=dp_group)
        self.chunks, self.schedule, self.loss, self.mesh = chunks, schedule, loss, mesh
        self.has_first, self.has_last = has_first, has_last
        self.pp_group = mesh[MeshAxis.PP].get_group()
        # the loss is contributed once: by the last stage's first tp rank
        self.loss_source = has_last and mesh.get_local_rank(MeshAxis.TP) == 0
        if self.timer.enabled:
            self._time_stage_calls()
        # dp 1: the noise scale per micro-batch (dp > 1: sync_grads)
        self.hook_replica(mesh.get_local_rank(MeshAxis.TP))

    def _time_stage_calls(self):
        """Time this rank's compute inside the schedule: every call of a stage's ``forward_one_chunk``
        and ``backward_one_chunk`` and of the loss, all on this thread. The schedule waits for a call's
        point-to-point transfers before making it, so the waits fall between the intervals: with CUDA
        events, an interval starts when the stream has its input (the wait is queued before it)."""
        for stage in self.schedule_stages():
            for method, phase in (("forward_one_chunk", "forward"), ("backward_one_chunk", "backward")):
                original = getattr(stage, method)

                def timed(*args, _original=original, _phase=phase, **kwargs):
                    if self.loss.timer is None:  # evaluation, or timing off: not timed
                        return _original(*args, **kwargs)
                    self.timer.start()
                    out = _original(*args, **kwargs)
                    self.timer.stop(_phase)
                    return out

                setattr(stage, method, timed)

    def schedule_stages(self):
        return getattr(self.schedule, "_stages", None) or [self.schedule._stage]

    def _global_mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.ctx.device)
        if self.loss_source:
            total = total + torch.stack([loss.detach().float() for loss in losses]).sum()
        if dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.dp_size

    def _run(self, method, x, y) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        method(*args, target=y if self.has_last else None, losses=losses if self.has_last else None,
               return_outputs=False)
        return losses

    def train_step(self, micro_batches):
        if len(micro_batches) != self.spec.micro_batches:
            raise ValueError(f"expected {self.spec.micro_batches} micro-batches, got {len(micro_batches)}")
        # the schedule splits the replica's batch again into the same micro-batches (equal chunks, dim 0)
        x = torch.cat([mb[0] for mb in micro_batches])
        y = torch.cat([mb[1] for mb in micro_batches])
        t0 = self.timer.mark()
        self.loss.timer = self.timer if self.timer.enabled else None  # set only while the schedule trains
        try:
            losses = self._run(self.schedule.step, x, y)
        finally:
            self.loss.timer = None
        self.timer.span("schedule", t0)
        self.take_micro_batch_norms(len(micro_batches))
        self.timer.start()
        self.sync_grads()
        self.step_optimizer()
        return self._global_mean(losses)

    def sync_grads(self) -> None:
        params = list(self.model.parameters())
        # this pipeline's own gradient (all stages), before the average (noise scale)
        if self.dp_size > 1 and self.noise.measuring:
            self.noise.value = total_grad_norm(params, self.pp_group).square()
        allreduce_grads_(params, self.dp_group, self.dp_size)
        self.timer.stop("grad_sync")

    def clip_grads(self, params):
        return clip_grad_norm_(params, self.train_cfg["grad_clip"], pp_group=self.pp_group)

    @torch.no_grad()
    def eval_loss(self, inputs, labels):
        for chunk in self.chunks:
            chunk.eval()
        try:
            losses = self._run(self.schedule.eval, inputs, labels)
        finally:
            for chunk in self.chunks:
                chunk.train()
        return self._global_mean(losses)

    # Checkpoints: torch DCP with the HF names of this rank's parameters. The optimizer state is
    # flattened to per-parameter keys ("param_groups.<fqn>.lr"): the stages hold different parameters,
    # so the nested form's "param_groups.0" entries would collide between stages.
    def save_checkpoint(self, path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        if self.ctx.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, Path(path) / "scheduler.pt")

    def load_checkpoint(self, path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=opts)
        sched = torch.load(Path(path) / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])

    def time_breakdown(self):
        """forward / backward: this rank's stage calls inside the schedule (the loss counts as forward);
        pipeline_idle: the rest of the schedule's time (the bubble and point-to-point waits; host clocks
        on CPU, CUDA events on GPUs); grad_sync: the data-parallel
        gradient all-reduce; optimizer: clipping and the AdamW step."""
        result = self.timer.result()
        if result is None:
            return None
        schedule = result.pop("schedule", 0.0)
        result["pipeline_idle"] = max(0.0, schedule - result["forward"] - result["backward"])
        return result


# --------------------------------------------------------------------------- parallelize


def parallelize(model, spec, ctx, train_cfg) -> PipelineEngine:
    # one stage is allowed (the schedule's micro-batching cost alone: the 1.1B GPU study); the layout
    # (stages x dp x tp = world, micro-batches for the schedule, layers per chunk) was checked by config
    pp, tp, dp, m = spec.stages, spec.tp, spec.dp, spec.micro_batches
    virtual = spec.virtual_stages
    n_chunks = pp * virtual

    mesh = init_device_mesh(ctx.device.type, (pp, dp, tp), mesh_dim_names=(MeshAxis.PP, MeshAxis.DP, MeshAxis.TP))
    pp_rank = mesh.get_local_rank(MeshAxis.PP)
    ranges = chunk_layer_ranges(model, n_chunks, spec.pipeline_balance)
    mine = [c for c in range(n_chunks) if c % pp == pp_rank]
    layer_ids = [i for c in mine for i in range(*ranges[c])]
    has_first, has_last = 0 in mine, n_chunks - 1 in mine

    if tp > 1:
        from llmpar.strategies.tp_torch import apply_tp

        apply_tp([decoder_layers(model)[i] for i in layer_ids], mesh[MeshAxis.TP])
    keep = set(layer_ids)
    layers = decoder_layers(model)
    for i in range(len(layers)):  # drop the other stages' layers before any cast or wrapper touches them
        if i not in keep:
            layers[i] = nn.Identity()
    model = prepare_model(model, spec)

    chunks = [PipelineChunk(model, *ranges[c], first=c == 0, last=c == n_chunks - 1, precision=spec.precision)
              for c in mine]
    holder = local_holder(model, layer_ids, has_first, has_last)
    if not has_first:
        model.model.embed_tokens = None
    if not has_last:
        model.model.norm = None
        model.lm_head = None

    group = mesh[MeshAxis.PP].get_group()
    stages = [PipelineStage(chunk, c, n_chunks, ctx.device, group=group) for chunk, c in zip(chunks, mine)]

    loss = MicroBatchLoss(cross_entropy_for(ctx.device, train_cfg["fused_loss"]), m)
    cls = SCHEDULES[spec.schedule]
    schedule = cls(stages if virtual > 1 else stages[0], m, loss_fn=loss, scale_grads=False)
    return PipelineEngine(holder, chunks, schedule, loss, spec, ctx, train_cfg, mesh=mesh,
                          has_first=has_first, has_last=has_last)
