"""A stop asked of the workflow reaches its running jobs.

Run locally, Snakemake waits for its running jobs whatever stops it: on SIGINT its scheduler catches the
KeyboardInterrupt and only shuts its pool of job threads down, which waits for them; on SIGTERM its
scheduler's own handler lets the running jobs finish. A signal sent to the snakemake process alone (not to
its process group, as a terminal's Ctrl-C is) would leave a training job running to its end.

:func:`forward_stop_signals` is called from the Snakefile's ``onstart`` (Snakemake has installed its own
handlers by then). On SIGINT or SIGTERM it sends SIGTERM to every process of the running jobs but their
shells, then hands the signal on to Snakemake's handler, which waits for the jobs as before, now while they
stop. A job shell is left alone because it waits for its command and so holds Snakemake's wait until the
command has stopped; the training launcher (:func:`llmpar.launch.run_agents`) stops its torchrun agents and
their workers and exits non-zero, so Snakemake marks the job failed and its rerun resumes from the newest
complete checkpoint.
"""

from __future__ import annotations

import os
import signal

import psutil

SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh"})
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def job_processes(pid: int | None = None) -> list[psutil.Process]:
    """The processes under ``pid`` (default: this one) but shells: the commands of the running jobs and
    everything they started."""
    procs = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.name() not in SHELLS:
                procs.append(p)
        except psutil.NoSuchProcess:
            continue
    return procs


def stop_jobs(sig: int = signal.SIGTERM, pid: int | None = None) -> list[psutil.Process]:
    """Send ``sig`` to every process of the running jobs under ``pid`` but their shells; returns them."""
    procs = job_processes(pid)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            continue
    return procs


def forward_stop_signals() -> None:
    """On SIGINT or SIGTERM, first :func:`stop_jobs`, then whatever handled the signal before (Snakemake's
    handler; Python's KeyboardInterrupt for SIGINT; the default action). Call from the main thread."""
    for signum in STOP_SIGNALS:
        previous = signal.getsignal(signum)

        def handler(num, frame, previous=previous):
            print(f"{signal.Signals(num).name}: stopping the running jobs", flush=True)
            stop_jobs()
            if callable(previous):
                previous(num, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(num, signal.SIG_DFL)
                os.kill(os.getpid(), num)

        signal.signal(signum, handler)
