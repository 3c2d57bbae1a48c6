"""Injected faults (``run.fault``), for the failure and resume tests: the run's step ``at_step`` fails as
``kind`` says, so that the launcher's and the loop's handling of real failures can be shown working.

* ``oom``: rank 0 raises ``torch.OutOfMemoryError`` (the run is recorded ``oom``);
* ``crash``: rank 0 raises ``RuntimeError`` (recorded ``failed``);
* ``stall``: rank 0 waits to be killed, in the run's first attempt only (a resumed attempt goes on);
* ``nan``: every step from ``at_step`` on returns a non-finite loss (recorded ``diverged``).

The fault wraps the engine's ``train_step`` once, before the loop; a run without one leaves the loop and
the engine untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def inject(engine, fault: dict, first_step: int, attempt: int, is_main: bool, log: Callable[[str], None]) -> None:
    """Wrap ``engine.train_step``: the wrapped step ``first_step + 1`` is the run's step ``first_step + 1``."""
    inner, kind, at = engine.train_step, fault["kind"], fault.get("at_step", 1)
    step = first_step

    def train_step(micro_batches):
        nonlocal step
        step += 1
        if step == at and is_main:
            if kind == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory fault at step {step}")
            if kind == "crash":
                raise RuntimeError(f"injected crash at step {step}")
            if kind == "stall" and attempt == 0:
                log(f"injected stall at step {step}: waiting to be killed")
                while True:
                    time.sleep(60)
        loss = inner(micro_batches)
        return loss * float("nan") if kind == "nan" and step >= at else loss

    engine.train_step = train_step
