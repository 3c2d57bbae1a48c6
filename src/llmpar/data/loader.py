"""Deterministic batches from packed token shards.

Sequence i of the training shard is tokens[i*s : i*s + s + 1] (inputs and shifted labels). Each epoch
visits the sequences in a permutation drawn from (seed, epoch). The global batch of step t is the
sequences at positions [t*B, (t+1)*B) of that endless stream, so the data order depends only on the
seed, never on the layout, and a resumed run continues from its step number alone. A data-parallel
rank takes its contiguous slice of the global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmpar.data.tokenize import read_meta
from llmpar.errors import DataError


class TokenData:
    def __init__(self, tokens_dir: str | Path, seq_len: int, seed: int):
        self.meta = read_meta(tokens_dir)
        dtype = np.dtype(self.meta["dtype"])
        tokens_dir = Path(tokens_dir)
        self.train = np.memmap(tokens_dir / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(tokens_dir / "val.bin", dtype=dtype, mode="r")
        self.seq_len, self.seed = seq_len, seed
        self.n_train = (len(self.train) - 1) // seq_len
        self.n_val = (len(self.val) - 1) // seq_len
        if self.n_train < 1 or self.n_val < 1:
            raise DataError(
                f"corpus too short: {len(self.train)} train / {len(self.val)} val tokens cannot fill one "
                f"sequence of {seq_len + 1} tokens"
            )
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_train)}
        return self._perm_cache[epoch]

    def step_indices(self, step: int, global_batch: int) -> np.ndarray:
        """Training-sequence indices of the global batch of ``step`` (0-based)."""
        pos = np.arange(step * global_batch, (step + 1) * global_batch)
        epochs, offsets = pos // self.n_train, pos % self.n_train
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def _gather(self, arr: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.seq_len
        rows = np.stack([np.asarray(arr[i * s : i * s + s + 1], dtype=np.int64) for i in idx])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def train_batch(self, step: int, global_batch: int, dp_rank: int, dp_size: int):
        """This data-parallel rank's slice of the step's global batch: (inputs, labels), [B/dp, s]."""
        idx = self.step_indices(step, global_batch)
        per = global_batch // dp_size
        return self._gather(self.train, idx[dp_rank * per : (dp_rank + 1) * per])

    def val_batch(self, i: int, global_batch: int, dp_rank: int, dp_size: int):
        """Validation batch i (fixed, in order, wrapping around the validation shard)."""
        idx = np.arange(i * global_batch, (i + 1) * global_batch) % self.n_val
        per = global_batch // dp_size
        return self._gather(self.val, idx[dp_rank * per : (dp_rank + 1) * per])
