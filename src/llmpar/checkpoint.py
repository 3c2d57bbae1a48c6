"""Checkpoints: atomic, per-engine format, verified on resume, the last K kept.

Layout under ``results/{study}/runs/{run}/checkpoints/``::

    step_00000020/          complete checkpoint of step 20 (renamed into place when complete)
        engine/             the engine's own (sharded) format: torch DCP or DeepSpeed's
        rng_rank{r}.pt      RNG states of each rank (loaded with weights_only=True)
        meta.json           step, attempt, elapsed_s, config hash, and the size and SHA-256 of every
                            other file of the checkpoint; written last, before the rename
    .tmp-step_00000030/     a checkpoint being written (ignored, removed on resume)

The data position is the step number itself (the loader is a pure function of seed and step).
A checkpoint is resumed only if its config hash equals the run's: a changed run starts afresh. Before
loading, rank 0 checks the newest checkpoint's files against the sizes and checksums its meta.json
recorded; a damaged one is reported with its reason and removed, and the next older intact checkpoint is
resumed instead (none left: the run starts afresh). Every rank loads the checkpoint rank 0 chose.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from llmpar.io import write_json

META = "meta.json"


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_manifest(root: Path) -> dict[str, list]:
    """``{path relative to root: [size in bytes, SHA-256]}`` of every file under ``root`` but meta.json
    (hashed in parallel threads: hashlib releases the GIL on large buffers)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != META)
    with ThreadPoolExecutor(max(1, min(8, len(files)))) as pool:
        digests = list(pool.map(_sha256, files))
    return {p.relative_to(root).as_posix(): [p.stat().st_size, d] for p, d in zip(files, digests)}


def damage(path: Path, meta: dict) -> str | None:
    """Why the checkpoint in ``path`` cannot be trusted (a file missing, of another size or checksum than
    when it was written), or None when every file its meta.json lists is intact."""
    recorded = meta.get("files")
    if not recorded:
        return "its meta.json records no file sizes and checksums, so it cannot be verified"
    for rel, (size, digest) in sorted(recorded.items()):
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, {size} when it was written"
        if _sha256(f) != digest:
            return f"{rel} does not have the SHA-256 it was written with"
    return None


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
            meta = d / META
            if meta.is_file():
                try:
                    if json.loads(meta.read_text()).get("config_hash") == self.config_hash:
                        out.append(d)
                except json.JSONDecodeError:
                    continue
        return out

    def newest_intact(self, report: Callable[[str], None]) -> tuple[Path, dict] | None:
        """The newest complete checkpoint of this config whose files are intact, the same on every rank.

        Rank 0 verifies the candidates newest first; each damaged one is reported (``report``) with the
        reason and removed, so no later attempt tries it again. Collective: every rank calls it."""
        choice = [None]
        if self.rank == 0:
            skipped = []
            for path in reversed(self.complete()):
                meta = json.loads((path / META).read_text())
                reason = damage(path, meta)
                if reason is None:
                    choice[0] = path.name
                    break
                skipped.append(path.name)
                report(f"checkpoint {path.name} is damaged ({reason}): not resumed, removed")
                shutil.rmtree(path, ignore_errors=True)
            if skipped and choice[0] is None:
                report("no intact checkpoint of this configuration is left: the run starts afresh")
            elif skipped:
                report(f"resuming from the newest intact checkpoint, {choice[0]}")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        path = self.root / choice[0]
        return path, json.loads((path / META).read_text())

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
            write_json(tmp / META, {
                "step": step, "attempt": attempt, "elapsed_s": elapsed_s, "config_hash": self.config_hash,
                "files": file_manifest(tmp),
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
