"""The noise scale's small batch: each replica's (or micro-batch's) gradient norm before anyone reduces it.

:class:`ReplicaNorm` is an engine's whole measurement state: whether the run measures (``train.metrics``),
on which steps (every ``train.noise_scale_every``-th), the batch split it measures at, why it cannot
(``reason``), and the last measured step's value. The engines feed it from :class:`GradNormHooks` (a tensor
hook per parameter and micro-batch), FSDP2's reduce-scatter inputs or a plain replica's gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


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



class ReplicaNorm:
    """An engine's measurement of the noise scale's small batch (module docstring).

    ``value``: the last measured step's squared norm of the small batch's mean gradient (0-d tensor, no
    host sync), None on unmeasured steps; ``splits``: the small batch is global / ``splits`` (None: one
    data-parallel replica's share, global / dp); ``reason``: why this engine measures nothing (None where
    it can; see :mod:`llmpar.metrics.noise_scale`)."""

    def __init__(self, train_cfg: dict):
        self.enabled = train_cfg.get("metrics", True)
        self.every = train_cfg.get("noise_scale_every", 1)
        self.reason: str | None = None if self.enabled else "train.metrics is off"
        self.splits: int | None = None
        self.hooks: GradNormHooks | None = None
        self.measuring = False  # this step measures (begin_step)
        self.value: torch.Tensor | None = None

    def begin_step(self, step: int) -> None:
        """Before step ``step`` (1-based): whether it measures; arms the gradient hooks if it does."""
        self.measuring = self.enabled and step % self.every == 0
        self.value = None
        if self.measuring and self.hooks is not None:
            self.hooks.arm()

    def hook_micro_batches(self, params: Iterable[torch.Tensor], group, splits: int) -> None:
        """Measure per micro-batch from :class:`GradNormHooks` on ``params`` (``group``: see there); the small
        batch is global / ``splits``. Nothing to measure at one split (one batch size; the summary says so)."""
        self.splits = splits
        if self.enabled and splits > 1:
            self.hooks = GradNormHooks(params, group)

    def take_micro_batches(self, n: int, device: torch.device) -> None:
        """After a measured step's ``n`` micro-batches: keep the mean over k of |n g_k|² (each micro-batch's
        loss is divided by n, so g_k = grad(L_k) / n and n g_k is micro-batch k's mean-loss gradient)."""
        if self.measuring and self.hooks is not None:
            self.value = self.hooks.take(device) * n
