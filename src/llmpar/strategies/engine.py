"""The Engine contract every strategy returns, and the torch step the torch engines share.

The training loop only calls:

* ``engine.dp_rank`` / ``engine.dp_size`` – which slice of the global batch this rank loads (every
  rank of a tensor- or pipeline-parallel group loads the same slice);
* ``engine.begin_step(step)`` – before each ``train_step``: whether that step measures the noise scale's
  replica gradient norm (every ``train.noise_scale_every``-th step; ``engine.noise``, a
  :class:`~llmpar.strategies.replica_norm.ReplicaNorm`, holds what it measured and why not);
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
* ``engine.named_weights(model)`` – the weights the optimizer updates, under ``model``'s parameter names
  (the parameters themselves, or their fp32 masters where the model holds bf16 copies);
* ``engine.lr()`` – the current learning rate;
* ``engine.grad_norm()`` – the last step's global gradient norm before clipping (the norm the
  clipping divides ``train.grad_clip`` by), the same on every rank, as a 0-d tensor without a host
  sync; None when ``train.grad_clip`` is 0 (nothing clips, so nothing computes it);
* ``engine.time_breakdown()`` – seconds per phase over the steady steps (``engine.timer``), after
  ``engine.reset_time_breakdown()`` at the end of the warm-up;
* ``engine.close()`` – release what the engine registered outside itself once its run is over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from llmpar.layout import Precision
from llmpar.strategies.levers import autocast
from llmpar.strategies.loss import causal_lm_loss, cross_entropy_for
from llmpar.strategies.master import MasterWeights
from llmpar.strategies.optim import make_optimizer, make_scheduler
from llmpar.strategies.replica_norm import ReplicaNorm
from llmpar.strategies.timer import PhaseTimer

MASTERS = "masters.pt"  # a bf16-master engine's checkpoint: fp32 masters and AdamW's state


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


class Engine:
    """Base class; see the module docstring for the contract. ``spec``, ``ctx`` (the process group and
    device, :mod:`llmpar.distributed`) and ``train_cfg`` are the run's; ``dp_group`` is the group the loss
    is averaged over (None: this rank's replica is the only one)."""

    def __init__(self, spec, ctx, train_cfg: dict, *, dp_rank: int = 0, dp_size: int = 1, dp_group=None):
        self.spec, self.ctx, self.train_cfg = spec, ctx, train_cfg
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        # train.metrics switches both on or off: the phase timer and the noise scale's replica norms
        self.timer = PhaseTimer(ctx.device, enabled=train_cfg.get("metrics", True))
        self.noise = ReplicaNorm(train_cfg)
        self.captured_state_bytes: dict[str, int] | None = None
        self._capture_armed = False
        self._grad_norm: torch.Tensor | None = None

    def begin_step(self, step: int) -> None:
        """Called by the loop before :meth:`train_step` of ``step`` (1-based): whether this step measures
        the replica gradient norm (:class:`ReplicaNorm`). An unmeasured step leaves :meth:`local_grad_sq`
        None."""
        self.noise.begin_step(step)

    def hook_micro_batches(self, params: Iterable[torch.Tensor], group=None) -> None:
        """Measure the noise scale's small batch per micro-batch, from gradient hooks on ``params``
        (``group``: the ranks holding the other parts of this replica): batch global / (dp · micro-batches).
        Nothing to measure with one replica of one micro-batch (one batch size)."""
        self.noise.hook_micro_batches(params, group, self.dp_size * self.spec.micro_batches)

    def take_micro_batch_norms(self, n: int) -> None:
        self.noise.take_micro_batches(n, self.ctx.device)

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

    def named_weights(self, model) -> list[tuple[str, torch.Tensor]]:
        """The weights the optimizer updates, by ``model``'s parameter names: its parameters."""
        return list(model.named_parameters())

    def lr(self) -> float:
        raise NotImplementedError

    def grad_norm(self) -> torch.Tensor | None:
        return self._grad_norm

    def local_grad_sq(self) -> torch.Tensor | None:
        """The last step's squared norm of this rank's data-parallel replica's gradient before it was
        averaged with the other replicas (0-d tensor, no host sync), or None (``noise.reason``)."""
        return self.noise.value

    def _reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the data-parallel group (the loss each replica computed on its slice)."""
        if self.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
            t = t / self.dp_size
        return t

    def time_breakdown(self) -> dict[str, float] | None:
        """Accumulated seconds per phase (forward, backward, optimizer), or None where not measurable."""
        return self.timer.result()

    def reset_time_breakdown(self) -> None:
        """Start :meth:`time_breakdown` afresh (after the warm-up steps: compilation stays out)."""
        self.timer.reset()

    def close(self) -> None:
        """Release what the engine registered outside itself (hooks, buffers) once its run is over."""


class TorchEngine(Engine):
    """A module stepped by a torch optimizer: single, DDP, FSDP2 and torch-native TP use this.

    ``model`` is what forward is called on (possibly a DDP/FSDP wrapper); ``params_module`` is the
    module whose parameters are counted; ``dp_group`` is the group the loss is averaged over.
    """

    def __init__(self, model, spec, ctx, train_cfg, *, dp_rank=0, dp_size=1, dp_group=None, no_sync=None):
        super().__init__(spec, ctx, train_cfg, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group)
        self.model = model
        self.no_sync = no_sync  # context manager factory skipping gradient sync on non-final micro-batches
        # precision bf16-master: the model's weights cast to bf16 here, the optimizer steps their fp32 masters
        self.masters = MasterWeights(model) if spec.precision is Precision.BF16_MASTER else None
        self.optimizer = make_optimizer(self.stepped(), train_cfg)
        self.scheduler = make_scheduler(self.optimizer, train_cfg)
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

    def stepped(self) -> list[torch.Tensor]:
        """The tensors the optimizer steps and the clipping measures: the model's trainable parameters, or their
        fp32 masters (``bf16-master``)."""
        if self.masters is not None:
            return self.masters.masters
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_weights(self, model) -> list[tuple[str, torch.Tensor]]:
        return self.masters.named() if self.masters is not None else super().named_weights(model)

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
        if self.masters is not None:
            norm = self.masters.step(self.optimizer, self.train_cfg["grad_clip"])
            self._grad_norm = norm if norm is not None else self._grad_norm
        else:
            if self.train_cfg["grad_clip"] > 0:
                self._grad_norm = self.clip_grads(self.stepped())
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

    # -- accounting
    def model_state_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters()) + (self.masters.masters if self.masters is not None else [])
        held = [g for h in self.masters.held for g in h] if self.masters is not None else []  # bf16, awaiting their sum
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes([p.grad for p in params] + held),
            "optimizer": tensor_bytes(optimizer_state_tensors(self.optimizer)),
        }

    def local_param_count(self) -> int:
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.model.parameters())

    # -- checkpoints: torch distributed checkpoint, sharded as the model is (works for DDP, FSDP2, TP)
    # (bf16-master, one process: the masters and the optimizer's state in one file, MASTERS)
    def save_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.masters is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
            torch.save(self.masters.state_dict(self.optimizer), Path(path) / MASTERS)
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        if self.ctx.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, Path(path) / "scheduler.pt")

    def load_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if self.masters is not None:
            state = torch.load(Path(path) / MASTERS, map_location=self.ctx.device, weights_only=True)
            self.masters.load_state_dict(state, self.optimizer)
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        sched = torch.load(Path(path) / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])
