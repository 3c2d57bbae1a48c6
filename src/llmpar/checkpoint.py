"""Checkpoints: atomic, per-engine format, resumable, the last K kept.

Layout under ``results/{study}/runs/{run}/checkpoints/``::

    step_00000020/          complete checkpoint of step 20 (renamed into place when complete)
        engine/             the engine's own (sharded) format: torch DCP or DeepSpeed's
        rng_rank{r}.pt      RNG states of each rank (loaded with weights_only=True)
        meta.json           step, attempt, elapsed_s, config hash; written last, before the rename
    .tmp-step_00000030/     a checkpoint being written (ignored, removed on resume)

The data position is the step number itself (the loader is a pure function of seed and step).
A checkpoint is resumed only if its config hash equals the run's: a changed run starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from llmpar.io import write_json


def _rng_state() -> dict:
    """Torch RNG states (the only global RNGs training draws from; the data order is seeded per step)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoints:
    def __init__(self, root: str | Path, config_hash: str, rank: int, keep: int):
        self.root, self.config_hash, self.rank, self.keep = Path(root), config_hash, rank, keep

    def _name(self, step: int) -> str:
        return f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints of this config, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.glob("step_*")):
            meta = d / "meta.json"
            if meta.is_file():
                try:
                    if json.loads(meta.read_text()).get("config_hash") == self.config_hash:
                        out.append(d)
                except json.JSONDecodeError:
                    continue
        return out

    def latest(self) -> tuple[Path, dict] | None:
        done = self.complete()
        if not done:
            return None
        return done[-1], json.loads((done[-1] / "meta.json").read_text())

    def save(self, engine, step: int, attempt: int, elapsed_s: float) -> Path:
        final = self.root / self._name(step)
        tmp = self.root / f".tmp-{self._name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(tmp / "engine")
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            write_json(tmp / "meta.json", {
                "step": step, "attempt": attempt, "elapsed_s": elapsed_s, "config_hash": self.config_hash,
            })
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, engine, path: Path) -> None:
        engine.load_checkpoint(path / "engine")
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))

    def clean_partial(self) -> None:
        if self.rank == 0 and self.root.is_dir():
            for d in self.root.glob(".tmp-step_*"):
                shutil.rmtree(d, ignore_errors=True)

    def delete_all(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.root, ignore_errors=True)
