"""Per-step records without a per-step host sync.

Each step's end (and each boundary after an evaluation or checkpoint) is a CUDA event on GPUs or a
host clock reading on CPU; loss and gradient-norm tensors stay on the device. ``flush`` synchronizes
once and turns the pending steps into rows (see llmpar.metrics.definitions for the row fields).
"""

from __future__ import annotations

import time

import torch


def mark(cuda: bool, host_clock=time.perf_counter):
    """Now, as a recorded CUDA event on the current stream (resolved later, no host sync) or the host clock's
    reading on CPU, where execution is synchronous."""
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return host_clock()


class Recorder:
    def __init__(self, device: torch.device, t0: float, offset_s: float, tokens_per_step: int,
                 samples_per_step: int, attempt: int):
        self.cuda = device.type == "cuda"
        self.t0, self.offset = t0, offset_s
        self.tokens_per_step, self.samples_per_step, self.attempt = tokens_per_step, samples_per_step, attempt
        self.pending: list[tuple[int, torch.Tensor, float, torch.Tensor | None, object, object]] = []
        if self.cuda:
            torch.cuda.synchronize()
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()
            self.ref_host = time.time()
        self._boundary = self._now()

    def _now(self):
        return mark(self.cuda, time.time)

    def _wall(self, mark) -> float:
        """Seconds since the first process start of the run (across restarts)."""
        if self.cuda:
            mark = self.ref_host + self.ref.elapsed_time(mark) / 1000.0
        return mark - self.t0 + self.offset

    def boundary(self) -> None:
        """Call after work that is not a training step (evaluation, checkpoint)."""
        self._boundary = self._now()

    def step_done(self, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor | None = None) -> None:
        end = self._now()
        self.pending.append((step, loss, lr, grad_norm, self._boundary, end))
        self._boundary = end

    def now_elapsed(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.time() - self.t0 + self.offset

    def flush(self) -> list[dict]:
        if not self.pending:
            return []
        if self.cuda:
            self.pending[-1][-1].synchronize()
        losses = torch.stack([p[1].detach().float().reshape(()) for p in self.pending]).cpu().tolist()
        rows = []
        for (step, _, lr, grad_norm, start, end), loss in zip(self.pending, losses):
            t_end = self._wall(end)
            rows.append({
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),  # the sync above waited for it
                "tokens": step * self.tokens_per_step,
                "samples": step * self.samples_per_step,
                "step_time_s": t_end - self._wall(start),
                "elapsed_s": t_end,
                "attempt": self.attempt,
            })
        self.pending.clear()
        return rows
