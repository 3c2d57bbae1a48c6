"""The environment of a run: package versions, hardware, node, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

from llmpar.paths import REPO_ROOT


def package_version(pkg: str) -> str | None:
    """The installed version of the distribution ``pkg``, or None."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "transformers": package_version("transformers"),
        "tokenizers": package_version("tokenizers"),
        "datasets": package_version("datasets"),
        "snakemake": package_version("snakemake"),
        "cuda": torch.version.cuda,
        "nccl": None,
        "gpu_name": None,
        "gpu_count": 0,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name()
        env["gpu_count"] = torch.cuda.device_count()
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # NCCL absent from this build
            env["nccl"] = None
    return env
