"""The corpus: a Hugging Face dataset, local text files, or a built-in synthetic corpus.

Whatever the source, the result is the same pair of files, ``train.txt`` and ``val.txt``, one
document per line, plus ``meta.json`` with document counts and a hash of the text.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import numpy as np

from llmpar.errors import DataError
from llmpar.io import write_json, write_text


def synthetic_documents(documents: int, words_per_document: int, seed: int) -> list[str]:
    """A deterministic corpus with learnable structure.

    A vocabulary of 200 pronounceable words and a first-order Markov chain in which every word has
    four likely successors (probabilities 0.55/0.25/0.15/0.05). A model that learns the bigram table
    drops from ln(V) to about 1.2 nats per word, so the loss falls clearly within a few dozen steps.
    Every 12th word is a period that restarts the chain at one of ten sentence openers.
    """
    rng = np.random.default_rng(seed)
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    words: list[str] = []
    seen = set()
    while len(words) < 200:
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.integers(1, 4)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    successors = rng.integers(0, len(words), size=(len(words), 4))
    probs = np.array([0.55, 0.25, 0.15, 0.05])
    openers = rng.integers(0, len(words), size=10)
    docs = []
    for _ in range(documents):
        cur = int(rng.choice(openers))
        out = [words[cur].capitalize()]
        for i in range(1, words_per_document):
            if i % 12 == 0:
                out.append(".")
                cur = int(rng.choice(openers))
                out.append(words[cur].capitalize())
                continue
            cur = int(successors[cur, rng.choice(4, p=probs)])
            out.append(words[cur])
        docs.append(" ".join(out) + " .")
    return docs


def text_documents(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise DataError(f"data.files: the pattern '{pattern}' matches no file")
        files.extend(matched)
    docs = []
    for f in files:
        docs.extend(line.strip() for line in Path(f).read_text(errors="replace").splitlines() if line.strip())
    if not docs:
        raise DataError(f"data.files: the files {files} hold no text (corpus is empty)")
    return docs


def hf_documents(hf: dict) -> list[str]:
    """Load through ``datasets.load_dataset``: a hub name (needs the network or a cache) or a local builder."""
    import datasets

    kwargs = {"split": hf["split"]}
    if hf.get("data_files"):
        kwargs["data_files"] = hf["data_files"]
    try:
        ds = datasets.load_dataset(hf["name"], hf.get("config"), **kwargs)
    except Exception as exc:  # datasets raises many types: connection, not found, offline mode
        raise DataError(
            f"data.hf.name: cannot load dataset '{hf['name']}' (config {hf.get('config')!r}, split "
            f"{hf['split']!r}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Without network access only local files or an existing cache work."
        ) from exc
    if hf["text_field"] not in ds.column_names:
        raise DataError(
            f"data.hf.text_field: column '{hf['text_field']}' not in dataset '{hf['name']}' "
            f"(columns: {ds.column_names})"
        )
    if hf.get("max_documents"):
        ds = ds.select(range(min(hf["max_documents"], len(ds))))
    docs = [t.strip() for t in ds[hf["text_field"]] if t and t.strip()]
    if not docs:
        raise DataError(f"data.hf: dataset '{hf['name']}' has no non-empty '{hf['text_field']}' text")
    return docs


def load_documents(data_cfg: dict, seed: int) -> list[str]:
    source = data_cfg["source"]
    if source == "synthetic":
        syn = data_cfg["synthetic"]
        return synthetic_documents(syn["documents"], syn["words_per_document"], seed)
    if source == "text":
        return text_documents(data_cfg["files"])
    if source == "hf":
        return hf_documents(data_cfg["hf"])
    raise DataError(f"data.source: unknown source '{source}'")


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(docs) < 2:
        raise DataError(f"corpus has {len(docs)} document(s); at least 2 are needed for a train/val split")
    order = np.random.default_rng(seed + 1).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * val_fraction)))
    val_idx = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def build_corpus(data_cfg: dict, seed: int, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    docs = load_documents(data_cfg, seed)
    train, val = split_documents(docs, data_cfg["val_fraction"], seed)
    train_text, val_text = "\n".join(train) + "\n", "\n".join(val) + "\n"
    digest = hashlib.sha256((train_text + "\0" + val_text).encode()).hexdigest()
    meta = {
        "source": data_cfg["source"],
        "documents": {"train": len(train), "val": len(val)},
        "characters": {"train": len(train_text), "val": len(val_text)},
        "sha256": digest,
    }
    write_text(out_dir / "train.txt", train_text)
    write_text(out_dir / "val.txt", val_text)
    write_json(out_dir / "meta.json", meta)
    return meta


def check_source(data_cfg: dict, seq_len: int | None = None, seed: int = 0) -> None:
    """Cheap checks of the corpus source before any job runs (nothing is written on failure).

    Text files: every glob matches a file, the files hold text, and (given ``seq_len``) enough of it
    on both sides of the train/validation split that ``build_corpus`` will make (the same documents,
    ``val_fraction`` and ``seed``): a byte-level BPE token covers at least one byte, so a split of fewer
    bytes (plus one end-of-text token per document) than seq_len + 1 tokens can never fill one
    sequence. Hugging Face: the dataset builder resolves (offline this succeeds only for local files or
    a cached dataset).
    """
    if data_cfg["source"] == "text":
        docs = text_documents(data_cfg["files"])
        if seq_len:
            train, val = split_documents(docs, data_cfg["val_fraction"], seed)
            for split, part in (("training", train), ("validation", val)):
                upper_bound_tokens = sum(len(d.encode()) + 1 for d in part)
                if upper_bound_tokens < seq_len + 1:
                    raise DataError(
                        f"data.files: corpus too short: its {split} split ({len(part)} of {len(docs)} lines, "
                        f"data.val_fraction {data_cfg['val_fraction']}) holds at most {upper_bound_tokens} tokens, "
                        f"fewer than one sequence of model.seq_len + 1 = {seq_len + 1} tokens"
                    )
    elif data_cfg["source"] == "hf":
        hf = data_cfg["hf"]
        import datasets

        kwargs = {"data_files": hf["data_files"]} if hf.get("data_files") else {}
        try:
            datasets.load_dataset_builder(hf["name"], hf.get("config"), **kwargs)
        except Exception as exc:
            raise DataError(
                f"data.hf.name: cannot load dataset '{hf['name']}' (config {hf.get('config')!r}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Without network "
                "access only local files (data.hf.data_files) or an existing cache work."
            ) from exc
