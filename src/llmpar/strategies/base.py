"""The Engine contract every strategy returns, and the pieces strategies share.

The training loop only calls:

* ``engine.dp_rank`` / ``engine.dp_size`` – which slice of the global batch this rank loads (every
  rank of a tensor- or pipeline-parallel group loads the same slice);
* ``engine.begin_step(step)`` – before each ``train_step``: whether that step measures the noise scale's
  replica gradient norm (every ``train.noise_scale_every``-th step);
* ``engine.train_step(micro_batches)`` – one optimizer step over this replica's micro-batches;
  returns the loss of the whole global batch (mean over its tokens) as a 0-d tensor on the device,
  already averaged over data-parallel replicas and valid on every rank, without a host sync;
* ``engine.eval_loss(inputs, labels)`` – mean validation loss of the global batch, same contract;
* ``engine.save_checkpoint(dir)`` / ``engine.load_checkpoint(dir)`` – in the engine's own format;
* ``engine.model_state_bytes()`` – bytes of parameters, gradients and optimizer state held by this
  rank now, measured from the tensors; after ``engine.arm_state_capture()`` the next step measures
  them after each micro-batch's backward and just before the optimizer applies the update, and keeps
  the moment with the largest total in ``engine.captured_state_bytes`` (the step's model-state peak:
  with gradient accumulation, ZeRO-1 holds full gradients between micro-batches, ZeRO-2 only its
  partition);
* ``engine.local_param_count()`` – parameters (elements) held by this rank;
* ``engine.lr()`` – the current learning rate;
* ``engine.grad_norm()`` – the last step's global gradient norm before clipping (the norm the
  clipping divides ``train.grad_clip`` by), the same on every rank, as a 0-d tensor without a host
  sync; None when ``train.grad_clip`` is 0 (nothing clips, so nothing computes it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# --------------------------------------------------------------------------- shared pieces


def make_optimizer(params, train_cfg: dict) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95), the fused kernel on every device. The same for every strategy.

    Parameters are grouped by kind (plain tensors, and DTensors per device mesh), each group with the
    same hyperparameters: the fused kernel takes one group's tensors in one call, and torch refuses a
    call that mixes plain tensors and DTensors (torch TP keeps the embedding, norms and lm_head as
    plain replicated tensors: ``aten._fused_adamw_.default got mixed torch.Tensor and DTensor``).
    """
    groups: dict[object, list] = {}
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        groups.setdefault(None if mesh is None else id(mesh), []).append(p)
    return torch.optim.AdamW([{"params": ps} for ps in groups.values()], lr=train_cfg["lr"], betas=(0.9, 0.95),
                             eps=1e-8, weight_decay=train_cfg["weight_decay"], fused=True)


def lr_lambda(train_cfg: dict):
    """Linear warmup, then cosine decay to min_lr_ratio × lr at the last step (multiplier of lr)."""
    warm, total, floor = train_cfg["warmup_steps"], train_cfg["steps"], train_cfg["min_lr_ratio"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_scheduler(optimizer, train_cfg: dict):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))


def autocast(precision: str, device: torch.device):
    """bf16 autocast (fp32 master weights) or nothing (fp32, or pure bf16 weights)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def apply_activation_checkpointing(model, mode: str) -> None:
    """Wrap decoder layers in non-reentrant checkpointing: ``full`` every layer, ``selective`` every 2nd."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for i in range(len(layers)):
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)


def apply_compile(model, enabled: bool, in_place: bool = False) -> None:
    """torch.compile each decoder layer (torchtitan's per-block compile: small graphs, fast recompiles).

    The torch engines replace each layer by its ``OptimizedModule`` wrapper (what the recorded GPU
    runs measured; FSDP2 then wraps the compiled layer, its hooks outside the graph). DeepSpeed engines
    compile in place (``nn.Module.compile``: same module, same parameter names), because ZeRO-3's forward
    hooks fail on the wrappers' plain-dict ``_parameters`` (``'dict' object has no attribute
    '_in_forward'``).
    """
    if not enabled:
        return
    layers = decoder_layers(model)
    for i in range(len(layers)):
        if in_place:
            layers[i].compile(fullgraph=False)
        else:
            layers[i] = torch.compile(layers[i], fullgraph=False)


def prepare_model(model, spec) -> torch.nn.Module:
    """Precision, activation checkpointing and compile: the per-run levers, in torchtitan's order."""
    if spec.precision == "bf16-pure":
        model.to(torch.bfloat16)
    apply_activation_checkpointing(model, spec.activation_checkpointing)
    apply_compile(model, spec.compile)
    return model


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


_FUSED_CE = None


def _fused_cross_entropy():
    """The same cross-entropy, compiled (CUDA only): the fp32 upcast, log-sum-exp, gather and, in
    backward, the softmax gradient fuse into a few kernels that read the bf16 logits once, instead of
    materialising fp32 logits, log-probabilities and their gradients (~6 passes over B·s·V·4 bytes)."""
    global _FUSED_CE
    if _FUSED_CE is None:
        _FUSED_CE = torch.compile(_cross_entropy, dynamic=False)
    return _FUSED_CE


def cross_entropy_for(device: torch.device, fused: bool):
    """The one loss function of every engine: the compiled cross-entropy on CUDA where ``fused``
    (``train.fused_loss``), the eager one elsewhere. ``(logits, labels) -> mean loss``; labels already
    shifted."""
    return _fused_cross_entropy() if device.type == "cuda" and fused else _cross_entropy


def causal_lm_loss(model, inputs: torch.Tensor, labels: torch.Tensor, loss_fn=_cross_entropy) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` with ``loss_fn`` (the engine's :func:`cross_entropy_for`;
    labels are already shifted by the data loader). DTensor logits (a TP-sharded lm_head) take the eager
    function."""
    logits = model(input_ids=inputs).logits
    return (loss_fn if type(logits) is torch.Tensor else _cross_entropy)(logits, labels)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held locally by these tensors (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


class SquaredNorms:
    """The sum of squared L2 norms of tensors a hook sees one at a time (FSDP2's reduce-scatter inputs,
    parameter gradients) for the noise scale: each :meth:`add` is one norm kernel on the caller's stream,
    no host sync; :meth:`take` squares and sums them in one go. A DTensor adds its local shard."""

    def __init__(self):
        self._norms: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> None:
        if hasattr(t, "to_local"):
            t = t.to_local()
        self._norms.append(torch.linalg.vector_norm(t, dtype=torch.float32))

    def take(self) -> torch.Tensor | None:
        """The sum of the squared norms added since the last take (0-d tensor), or None if none was."""
        if not self._norms:
            return None
        norms, self._norms = self._norms, []
        return torch.stack(norms).square().sum()


class GradNormHooks(SquaredNorms):
    """Sum over a step's micro-batches k and the given parameters of |g_k|², g_k the gradient autograd
    hands a parameter: this rank's, this micro-batch's, before it is accumulated or reduced by anyone
    (DDP's and DeepSpeed's hooks run after it, on the accumulated gradient). The tensor hooks exist only
    on measured steps: :meth:`arm` registers them, :meth:`take` removes them, so a step that measures
    nothing runs exactly as without metrics.

    ``group``: the ranks that hold disjoint parts of one replica (pipeline stages, tensor-parallel
    shards; None: this rank holds its whole replica); :meth:`take` sums their parts, so every rank of it
    must take on the same steps. Pass each parameter of the replica on exactly one of them.
    """

    def __init__(self, params: Iterable[torch.Tensor], group=None):
        super().__init__()
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self._handles: list = []

    def arm(self) -> None:
        if not self._handles:
            self._handles = [p.register_hook(self.add) for p in self.params]

    def take(self, device: torch.device) -> torch.Tensor:
        for h in self._handles:
            h.remove()
        self._handles = []
        sq = super().take()
        if sq is None:  # no parameter of this rank took part (or none was given)
            sq = torch.zeros((), device=device)
        if self.group is not None:
            dist.all_reduce(sq, group=self.group)
        return sq


# --------------------------------------------------------------------------- engine


class Engine:
    """Base class; see the module docstring for the contract."""

    dp_rank: int = 0
    dp_size: int = 1
    captured_state_bytes: dict[str, int] | None = None
    _capture_armed: bool = False
    _grad_norm: torch.Tensor | None = None
    _local_grad_sq: torch.Tensor | None = None
    # why local_grad_sq is None for this engine, where the layout cannot measure it (None: it can; see
    # llmpar.metrics.noise_scale)
    noise_scale_reason: str | None = None
    # local_grad_sq is the squared norm of the mean gradient over 1/noise_scale_splits of the global batch
    # (None: dp_size, one replica's share)
    noise_scale_splits: int | None = None
    measure_noise_scale: bool = False  # train.metrics: whether the engine may measure (see init_metrics)
    noise_scale_every: int = 1  # train.noise_scale_every: measure on steps k, 2k, ...
    measuring: bool = False  # this step measures (begin_step)
    grad_hooks: GradNormHooks | None = None  # per-micro-batch parameter hooks, where the engine uses them

    def init_metrics(self, train_cfg: dict, device: torch.device) -> None:
        """The one switch of metric collection, ``train.metrics``, for every engine: the phase timer
        (``self.timer``) and the noise scale's replica gradient norms (measured on every
        ``train.noise_scale_every``-th step) are on or off together; off says so in ``noise_scale_reason``."""
        on = train_cfg.get("metrics", True)
        self.timer = PhaseTimer(device, enabled=on)
        self.measure_noise_scale = on
        self.noise_scale_every = train_cfg.get("noise_scale_every", 1)
        if not on:
            self.noise_scale_reason = "train.metrics is off"

    def begin_step(self, step: int) -> None:
        """Called by the loop before :meth:`train_step` of ``step`` (1-based): whether this step measures
        the replica gradient norm; arms the engine's gradient hooks if it does. An unmeasured step leaves
        :meth:`local_grad_sq` None."""
        self.measuring = self.measure_noise_scale and step % self.noise_scale_every == 0
        self._local_grad_sq = None
        if self.measuring and self.grad_hooks is not None:
            self.grad_hooks.arm()

    def hook_micro_batches(self, params: Iterable[torch.Tensor], group=None) -> None:
        """Measure the noise scale's small batch per micro-batch, from :class:`GradNormHooks` on ``params``
        (``group``: see there): batch global / (dp · micro-batches). Nothing to measure with one replica
        of one micro-batch (one batch size; :mod:`llmpar.metrics.noise_scale` says so)."""
        self.noise_scale_splits = self.dp_size * self.spec.micro_batches
        if self.measure_noise_scale and self.noise_scale_splits > 1:
            self.grad_hooks = GradNormHooks(params, group)

    def take_micro_batch_norms(self, n: int) -> None:
        """After a measured step's ``n`` micro-batches: keep the mean over k of |n g_k|² (each micro-batch's
        loss is divided by n, so g_k = grad(L_k) / n and n g_k is micro-batch k's mean-loss gradient)."""
        if self.measuring and self.grad_hooks is not None:
            self._local_grad_sq = self.grad_hooks.take(self.ctx.device) * n

    def arm_state_capture(self) -> None:
        self._capture_armed = True

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Record :meth:`model_state_bytes` from a pre-step hook of the torch optimizer that applies the
        update (for DeepSpeed, the optimizer inside its ZeRO / bf16 wrapper), when armed."""

        def before_step(_optimizer, _args, _kwargs):
            self.capture_states()
            self._capture_armed = False

        optimizer.register_step_pre_hook(before_step)

    def capture_states(self) -> None:
        """When armed: measure the model-state bytes now and keep them if the total is the step's largest."""
        if not self._capture_armed:
            return
        now = self.model_state_bytes()
        if self.captured_state_bytes is None or sum(now.values()) > sum(self.captured_state_bytes.values()):
            self.captured_state_bytes = now

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        raise NotImplementedError

    def eval_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save_checkpoint(self, path: Path) -> None:
        raise NotImplementedError

    def load_checkpoint(self, path: Path) -> None:
        raise NotImplementedError

    def model_state_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def local_param_count(self) -> int:
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def grad_norm(self) -> torch.Tensor | None:
        return self._grad_norm

    def local_grad_sq(self) -> torch.Tensor | None:
        """The last step's squared norm of this rank's data-parallel replica's gradient before it was
        averaged with the other replicas (0-d tensor, no host sync), or None (``noise_scale_reason``)."""
        return self._local_grad_sq

    def _reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the data-parallel group (the loss each replica computed on its slice)."""
        if self.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
            t = t / self.dp_size
        return t

    def time_breakdown(self) -> dict[str, float] | None:
        """Accumulated seconds per phase (forward, backward, optimizer), or None where not measurable."""
        return None

    def reset_time_breakdown(self) -> None:
        """Start :meth:`time_breakdown` afresh (after the warm-up steps: compilation stays out)."""
        timer = getattr(self, "timer", None)
        if timer is not None:
            timer.reset()

    def close(self) -> None:
        """Release what the engine registered outside itself (hooks, buffers) once its run is over."""


class PhaseTimer:
    """Accumulates time per phase (forward, backward, optimizer, ...) without a per-step host sync.

    On CUDA it records events and resolves them only when asked (at the end of the run); on CPU
    execution is synchronous, so host clocks are exact. ``start``/``stop`` time consecutive phases;
    ``mark``/``span`` time an enclosing interval (a pipeline schedule) independently of them.
    """

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.pending: list[tuple[str, object, object]] = []
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._start = None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        import time

        return time.perf_counter()

    def _add(self, phase: str, start, end) -> None:
        if self.cuda:
            self.pending.append((phase, start, end))
        else:
            self.totals[phase] = self.totals.get(phase, 0.0) + end - start

    def start(self):
        if self.enabled:
            self._start = self._now()

    def stop(self, phase: str):
        if not self.enabled:
            return
        end = self._now()
        self._add(phase, self._start, end)
        self._start = end

    def mark(self):
        return self._now() if self.enabled else None

    def span(self, phase: str, start) -> None:
        if self.enabled:
            self._add(phase, start, self._now())

    def reset(self) -> None:
        """Forget what was measured so far (the loop calls it after the warm-up steps)."""
        self.pending.clear()
        self.totals = dict.fromkeys(self.PHASES, 0.0)

    def result(self) -> dict[str, float] | None:
        if not self.enabled:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            for phase, a, b in self.pending:
                self.totals[phase] = self.totals.get(phase, 0.0) + a.elapsed_time(b) / 1000.0
            self.pending.clear()
        return dict(self.totals)


class TorchEngine(Engine):
    """A module stepped by a torch optimizer: single, DDP, FSDP2 and torch-native TP use this.

    ``model`` is what forward is called on (possibly a DDP/FSDP wrapper); ``params_module`` is the
    module whose parameters are counted; ``dp_group`` is the group the loss is averaged over.
    """

    def __init__(self, model, spec, ctx, train_cfg, *, dp_rank=0, dp_size=1, dp_group=None, no_sync=None):
        self.model, self.spec, self.ctx, self.train_cfg = model, spec, ctx, train_cfg
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.no_sync = no_sync  # context manager factory skipping gradient sync on non-final micro-batches
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg)
        self.scheduler = make_scheduler(self.optimizer, train_cfg)
        self.init_metrics(train_cfg, ctx.device)
        self.loss_fn = cross_entropy_for(ctx.device, train_cfg["fused_loss"])
        self.watch_optimizer(self.optimizer)

    # -- stepping: the one torch step. Engines differ in how gradients are synchronised (inside backward
    # for DDP and FSDP2, by :meth:`sync_grads` for plain replicas) and clipped (:meth:`clip_grads`).
    def train_step(self, micro_batches):
        n = len(micro_batches)
        total = torch.zeros((), device=self.ctx.device)
        for i, (x, y) in enumerate(micro_batches):
            sync_ctx = self.no_sync() if (self.no_sync is not None and i < n - 1) else contextlib.nullcontext()
            with sync_ctx:
                self.timer.start()
                with autocast(self.spec.precision, self.ctx.device):
                    loss = causal_lm_loss(self.model, x, y, self.loss_fn) / n
                self.timer.stop("forward")
                loss.backward()
                self.timer.stop("backward")
            self.capture_states()
            total += loss.detach().float()
        self.take_micro_batch_norms(n)
        self.timer.start()
        self.sync_grads()
        self.step_optimizer()
        return self._reduce_mean(total)

    def hook_replica(self, tp_rank: int) -> None:
        """With one replica (dp 1) spread over the world's ranks (tensor-parallel shards, pipeline stages):
        the noise scale per micro-batch from hooks on this rank's part of it. A DTensor parameter is this
        rank's shard; a plain one is replicated over the tp ranks (the same gradient on each), so only tp
        rank 0 hooks it. Summed over the world, each part counts once."""
        if self.dp_size == 1:
            params = [p for p in self.model.parameters() if hasattr(p, "to_local") or tp_rank == 0]
            self.hook_micro_batches(params, dist.group.WORLD if dist.get_world_size() > 1 else None)

    def sync_grads(self) -> None:
        """Average the gradients over data-parallel replicas where backward did not (DDP's hooks and FSDP2's
        reduce-scatter do it inside backward: nothing to do here)."""

    def clip_grads(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Clip to ``train.grad_clip``; returns the global norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, self.train_cfg["grad_clip"])

    def step_optimizer(self) -> None:
        """Clip (keeping the norm before clipping), step AdamW, clear the gradients, advance the schedule."""
        if self.train_cfg["grad_clip"] > 0:
            self._grad_norm = self.clip_grads(list(self.model.parameters()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.timer.stop("optimizer")

    @torch.no_grad()
    def eval_loss(self, inputs, labels):
        self.model.eval()
        with autocast(self.spec.precision, self.ctx.device):
            loss = causal_lm_loss(self.model, inputs, labels, self.loss_fn).float()
        self.model.train()
        return self._reduce_mean(loss)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def time_breakdown(self):
        return self.timer.result()

    # -- accounting
    def model_state_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params),
            "optimizer": tensor_bytes(optimizer_state_tensors(self.optimizer)),
        }

    def local_param_count(self) -> int:
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.model.parameters())

    # -- checkpoints: torch distributed checkpoint, sharded as the model is (works for DDP, FSDP2, TP)
    def save_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        if self.ctx.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, Path(path) / "scheduler.pt")

    def load_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        sched = torch.load(Path(path) / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])
