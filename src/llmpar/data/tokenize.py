"""Tokenizer (trained byte-level BPE or a pretrained one) and packed token shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from llmpar.errors import DataError
from llmpar.io import atomic_path, read_json, write_json

EOS = "<|endoftext|>"


def _lines(path: Path, batch: int = 1000):
    buf = []
    with open(path) as f:
        for line in f:
            if line.strip():
                buf.append(line.rstrip("\n"))
                if len(buf) == batch:
                    yield buf
                    buf = []
    if buf:
        yield buf


def bpe_tokenizer(lines, vocab_size: int):
    """A byte-level BPE (GPT-2 pre-tokenization, no prefix space, ``<|endoftext|>`` special) trained on
    ``lines`` (an iterable of documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def train_bpe(train_txt: str | Path, vocab_size: int, out_json: str | Path) -> dict:
    """Train a byte-level BPE on the training split only (no validation text leaks in)."""
    tok = bpe_tokenizer((line for batch in _lines(Path(train_txt)) for line in batch), vocab_size)
    with atomic_path(out_json) as tmp:
        tok.save(str(tmp))
    return {"kind": "bpe", "vocab_size": tok.get_vocab_size()}


def save_pretrained(name_or_path: str, out_json: str | Path) -> dict:
    """Load a pretrained tokenizer through transformers (local path, or hub name with a cache)."""
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        raise DataError(
            f"tokenizer.pretrained: cannot load '{name_or_path}': {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not getattr(hf_tok, "is_fast", False):
        raise DataError(f"tokenizer.pretrained: '{name_or_path}' has no fast (tokenizers) version")
    with atomic_path(out_json) as tmp:
        hf_tok.backend_tokenizer.save(str(tmp))
    return {"kind": "pretrained", "vocab_size": len(hf_tok)}


def build_tokenizer(tok_cfg: dict, train_txt: str | Path, out_json: str | Path) -> dict:
    if tok_cfg["kind"] == "bpe":
        return train_bpe(train_txt, tok_cfg["vocab_size"], out_json)
    return save_pretrained(tok_cfg["pretrained"], out_json)


def _eos_id(tok) -> int:
    for name in (EOS, "</s>", "<eos>", "<|end_of_text|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError("tokenizer has no end-of-text token (looked for <|endoftext|>, </s>, <eos>)")


def tokenize_file(tok, path: Path, eos: int, dtype) -> np.ndarray:
    parts = []
    for batch in _lines(path):
        for enc in tok.encode_batch(batch):
            parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
    if not parts:
        raise DataError(f"{path} holds no text to tokenize")
    return np.concatenate(parts)


def too_short(split: str, holds: str, need: int) -> str:
    """The message for a split that cannot fill one training sequence (every check words it alike)."""
    return (f"corpus too short: its {split} split holds {holds}, fewer than one sequence of "
            f"model.seq_len + 1 = {need} tokens")


def build_shards(tokenizer_json: str | Path, corpus_dir: str | Path, out_dir: str | Path,
                 min_tokens: int | None = None) -> dict:
    """Pack each split into one flat token array (uint16 when the vocabulary fits).

    With ``min_tokens`` (one training sequence: model.seq_len + 1), a split with fewer tokens is a
    DataError before any shard is written."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = _eos_id(tok)
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    arrays = {split: tokenize_file(tok, corpus_dir / f"{split}.txt", eos, dtype) for split in ("train", "val")}
    for split, arr in arrays.items():
        if min_tokens and arr.size < min_tokens:
            name = "training" if split == "train" else "validation"
            raise DataError(too_short(name, f"{arr.size} tokens with {Path(tokenizer_json).name}", min_tokens))
    for split, arr in arrays.items():
        with atomic_path(out_dir / f"{split}.bin") as tmp:
            arr.tofile(tmp)
    meta = {
        "vocab_size": vocab,
        "tokenizer_model": type(tok.model).__name__,
        "dtype": np.dtype(dtype).name,
        "eos_id": eos,
        "tokens": {split: int(arr.size) for split, arr in arrays.items()},
        "source_sha256": read_json(corpus_dir / "meta.json")["sha256"],
        "tokenizer_sha256": hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest(),
    }
    write_json(out_dir / "meta.json", meta)
    return meta


def read_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"token shards not found: {path} (run the tokenize rule first)")
    return json.loads(path.read_text())
