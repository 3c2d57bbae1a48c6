"""Run the real Snakemake workflow in a scratch directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def write_config(workdir: Path, cfg: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict[str, str]:
    """The environment of a Snakemake run in `make test`: one thread per worker, DeepSpeed on CPU, the
    venv's executables first, and before them tests/no-slurm, whose `scontrol` fails at once (the
    Slurm executor plugin asks scontrol for the cluster's config whenever Snakemake starts)."""
    path = os.pathsep.join([str(REPO / "tests" / "no-slurm"), str(Path(sys.executable).parent), os.environ["PATH"]])
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PATH=path)


def command(workdir: Path, *args: str) -> list[str]:
    """The workflow on the study config in ``workdir`` (see write_config), run in ``workdir``, 2 cores."""
    return [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(workdir, *args), capture_output=True, text=True, env=env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Rule -> job count of a dry run ({} when Snakemake says there is nothing to do). Fails when the
    output has neither that sentence nor a job table it can read (Snakemake changed its format)."""
    proc = snakemake(workdir, "--dry-run")
    return job_stats(proc.stdout + proc.stderr)


def job_stats(out: str) -> dict[str, int]:
    """Rule -> job count from a dry run's output (see planned_jobs)."""
    if "Nothing to be done" in out:
        return {}
    if "Job stats:" not in out:
        raise AssertionError(f"no 'Job stats:' table in the dry run's output:\n{out[-3000:]}")
    table = out.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    if not jobs:
        raise AssertionError(f"could not read the dry run's job table:\n{table[:3000]}")
    return jobs
