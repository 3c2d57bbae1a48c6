"""The injected faults' own behaviour (the failure and resume tests rely on it): a stall waits until
``SIGUSR1`` releases it, and only in the run's first attempt."""

import os
import signal
import threading
import time
import types

import pytest

from llmpar import faults


def stalled_engine():
    return types.SimpleNamespace(train_step=lambda micro_batches: 1.0)


def test_a_stall_waits_for_sigusr1_and_then_the_step_runs():
    engine, lines = stalled_engine(), []
    faults.inject(engine, {"kind": "stall", "at_step": 2}, first_step=0, attempt=0, is_main=True, log=lines.append)
    assert engine.train_step([]) == 1.0 and lines == []
    def release():  # once the stall is logged, as the resume tests do
        while not lines:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=release, daemon=True).start()
    assert engine.train_step([]) == 1.0
    assert lines == ["injected stall at step 2: waiting to be killed or released (SIGUSR1)",
                     "stall at step 2 released"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is the stall's only while it waits


@pytest.mark.parametrize("attempt, is_main", [(1, True), (0, False)])
def test_a_resumed_attempt_and_the_other_ranks_do_not_stall(attempt, is_main):
    engine, lines = stalled_engine(), []
    faults.inject(engine, {"kind": "stall", "at_step": 1}, first_step=0, attempt=attempt, is_main=is_main,
                  log=lines.append)
    assert engine.train_step([]) == 1.0 and lines == []
