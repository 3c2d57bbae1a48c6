"""Time per phase of a step (forward, backward, optimizer, ...) without a per-step host sync."""

from __future__ import annotations

import torch

from llmpar.metrics.recorder import mark


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
        return mark(self.cuda)

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


