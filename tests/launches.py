"""Many short runs in few launches (``scripts/train.py --batch``), and runs killed mid-way.

Starting torchrun workers costs seconds on the 2-core machine (imports, process group); a batch pays
it once for every run of one process layout. A run with the fault ``stall`` stops at a fixed step in
its first attempt, so the test can kill it when it is certainly mid-run (no race with its end), or copy
its directory (what a kill at that moment leaves) and release it to finish.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from llmpar.config import prepare, run_config

REPO = Path(__file__).resolve().parents[1]


def job(cfg: dict, run: str, out: Path) -> dict:
    """One entry of a batch file: ``run`` of the study ``cfg`` trained into ``out``."""
    return {"run_config": run_config(prepare(cfg), run), "out": str(out)}


def start_batch(jobs: list[dict], tokens: Path, workdir: Path, name: str,
                env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Start one launch training ``jobs`` in order, in its own session; its output goes to a log file."""
    workdir.mkdir(parents=True, exist_ok=True)
    batch = workdir / f"{name}.json"
    batch.write_text(json.dumps(jobs))
    log = workdir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--batch", str(batch),
                                 "--tokens", str(tokens)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    return proc, log


def run_batch(jobs: list[dict], tokens: Path, workdir: Path, name: str, timeout: int = 600,
              env: dict | None = None) -> str:
    """Train ``jobs`` in one launch to the end; returns its log (fails with its tail). The one way the
    CPU tests launch runs (conftest.train_batch and the resume study use it)."""
    proc, log = start_batch(jobs, tokens, workdir, name, env)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    text = log.read_text()
    assert code == 0, f"launch {name} failed ({code}):\n{text[-6000:]}"
    return text


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's whole session and every descendant (torchrun agents, workers)."""
    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def logged_steps(progress: Path) -> list[int]:
    """Steps in a run's progress.jsonl, read here and not with the package's reader: complete lines only
    (a line without its newline may still be being written)."""
    if not progress.is_file():
        return []
    lines = progress.read_text().split("\n")[:-1]
    return [row["step"] for row in map(json.loads, lines) if row.get("kind") == "step"]


def wait_until_stalled(proc: subprocess.Popen, run_dir: Path, checkpoint_step: int, stall_step: int,
                       log: Path, timeout: float = 300, logged: str | None = None) -> list[int]:
    """Wait until the run in ``run_dir`` has completed its checkpoint of ``checkpoint_step`` (its marker,
    meta.json, is written last, before the directory is renamed into place) and logged every step before
    its stall at ``stall_step`` (and, where given, until the launch's log holds the line ``logged``). Returns
    the steps it had logged; fails (killing ``proc``'s session) if the run never gets there."""
    marker = run_dir / "checkpoints" / f"step_{checkpoint_step:08d}" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (marker.is_file() and stall_step - 1 in logged_steps(run_dir / "progress.jsonl")
                and (logged is None or logged in log.read_text())):
            return logged_steps(run_dir / "progress.jsonl")
        time.sleep(0.05)
    code = proc.poll()
    if code is None:
        kill_tree(proc)
    raise AssertionError(f"{run_dir.name} never stalled after checkpoint {checkpoint_step} (exit {code}):\n"
                         f"{log.read_text()[-6000:] if log.is_file() else '(no log)'}")


def copy_when_stalled(proc: subprocess.Popen, name: str, run_dir: Path, copy: Path, checkpoint_step: int,
                      stall_step: int, log: Path, timeout: float = 300) -> list[int]:
    """:func:`wait_until_stalled` until the run ``name`` has also logged its stall (rank 0 then waits in it and
    the other ranks in their next collective), copy ``run_dir`` to ``copy``, the state that a SIGKILL at that
    moment leaves, and release the run (``SIGUSR1`` to rank 0) to go on to its end. Returns the steps the copy
    holds."""
    wait_until_stalled(proc, run_dir, checkpoint_step, stall_step, log, timeout,
                       logged=f"[{name}] injected stall at step {stall_step}")
    shutil.copytree(run_dir, copy)
    rank0 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "llmpar.train" in p.cmdline() and p.environ().get("RANK") == "0"]
    assert len(rank0) == 1, [p.cmdline() for p in rank0]
    rank0[0].send_signal(signal.SIGUSR1)
    return logged_steps(copy / "progress.jsonl")


def kill_when_stalled(proc: subprocess.Popen, run_dir: Path, checkpoint_step: int, stall_step: int,
                      log: Path, timeout: float = 300) -> list[int]:
    """:func:`wait_until_stalled`, then SIGKILL the launch. Returns the steps the run had logged."""
    wait_until_stalled(proc, run_dir, checkpoint_step, stall_step, log, timeout)
    kill_tree(proc)
    return logged_steps(run_dir / "progress.jsonl")
