"""Injected faults (``run.fault``), for the failure and resume tests: the run's step ``at_step`` fails as
``kind`` says, so that the launcher's and the loop's handling of real failures can be shown working.

* ``oom``: rank 0 raises ``torch.OutOfMemoryError`` (the run is recorded ``oom``);
* ``crash``: rank 0 raises ``RuntimeError`` (recorded ``failed``);
* ``stall``: rank 0 waits, in the run's first attempt only (a resumed attempt goes on), until the process is
  killed or receives ``SIGUSR1``, which lets the run go on (the resume tests copy the directory of a stalled
  run, the state a kill at that moment leaves, and release the run to finish as the uninterrupted one);
* ``nan``: every step from ``at_step`` on returns a non-finite loss (recorded ``diverged``).

The fault wraps the engine's ``train_step`` once, before the loop; a run without one leaves the loop and
the engine untouched.
"""

from __future__ import annotations

import signal
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
                stall(step, log)
        loss = inner(micro_batches)
        return loss * float("nan") if kind == "nan" and step >= at else loss

    engine.train_step = train_step


def stall(step: int, log: Callable[[str], None]) -> None:
    """Wait until ``SIGUSR1`` arrives (or the process is killed). Its handler is installed before the stall is
    logged, so a signal sent once the log line is seen always finds it."""
    released = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: released.append(signum))
    try:
        log(f"injected stall at step {step}: waiting to be killed or released (SIGUSR1)")
        while not released:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    log(f"stall at step {step} released")
