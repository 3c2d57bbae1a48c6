"""The corpus: a Hugging Face dataset, local text files, or a built-in synthetic corpus.

Whatever the source, the result is the same pair of files, ``train.txt`` and ``val.txt``, one
document per line, plus ``meta.json`` with document counts and a hash of the text.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import numpy as np

from llmpar.data import debian
from llmpar.data.tokenize import too_short
from llmpar.errors import DataError
from llmpar.io import read_json, write_json, write_text


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


def load_documents(data_cfg: dict, seed: int, text_dir: str | Path | None = None) -> list[str]:
    source = data_cfg["source"]
    if source == "synthetic":
        syn = data_cfg["synthetic"]
        return synthetic_documents(syn["documents"], syn["words_per_document"], seed)
    if source == "text":
        return text_documents(data_cfg["files"])
    if source == "hf":
        return hf_documents(data_cfg["hf"])
    if source == "debian":
        if text_dir is None:
            raise DataError("data.source debian: the corpus step needs the extracted text (its --text-dir)")
        return text_documents(debian.text_files(text_dir))
    raise DataError(f"data.source: unknown source '{source}'")


def source_description(data_cfg: dict, text_dir: str | Path | None = None) -> dict:
    """What the corpus is made of, as a report names it: the packages and versions, the files, the dataset
    or the synthetic generator's settings."""
    source = data_cfg["source"]
    if source == "debian":
        meta = read_json(Path(text_dir) / "meta.json")
        return {"packages": [{"name": p["name"], "version": p["version"]} for p in meta["packages"]],
                "words": meta["words"]}
    if source == "text":
        return {"files": sorted(f for pattern in data_cfg["files"] for f in glob.glob(pattern, recursive=True))}
    if source == "hf":
        hf = data_cfg["hf"]
        return {key: hf.get(key) for key in ("name", "config", "split", "data_files", "max_documents")}
    return dict(data_cfg["synthetic"])


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(docs) < 2:
        raise DataError(f"corpus has {len(docs)} document(s); at least 2 are needed for a train/val split")
    order = np.random.default_rng(seed + 1).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * val_fraction)))
    val_idx = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def build_corpus(data_cfg: dict, seed: int, out_dir: str | Path, text_dir: str | Path | None = None) -> dict:
    """``train.txt``, ``val.txt`` (one document a line) and ``meta.json`` in ``out_dir``.

    The meta records what a report header names (``describe``): the corpus kind, whether it is synthetic,
    its source, documents, bytes and characters per split, and a hash of the text."""
    out_dir = Path(out_dir)
    docs = load_documents(data_cfg, seed, text_dir)
    train, val = split_documents(docs, data_cfg["val_fraction"], seed)
    train_text, val_text = "\n".join(train) + "\n", "\n".join(val) + "\n"
    digest = hashlib.sha256((train_text + "\0" + val_text).encode()).hexdigest()
    meta = {
        "source": data_cfg["source"],
        "synthetic": data_cfg["source"] == "synthetic",
        "description": source_description(data_cfg, text_dir),
        "documents": {"train": len(train), "val": len(val)},
        "characters": {"train": len(train_text), "val": len(val_text)},
        "bytes": {"train": len(train_text.encode()), "val": len(val_text.encode())},
        "sha256": digest,
    }
    write_text(out_dir / "train.txt", train_text)
    write_text(out_dir / "val.txt", val_text)
    write_json(out_dir / "meta.json", meta)
    return meta


# --------------------------------------------------------------------------- tokens before tokenizing

# A split that the bounds below leave undecided is tokenized exactly, with a BPE trained in memory on the
# training split, if that split is at most this many bytes (well under a second); a larger one is left to
# the tokenize step, which counts exactly and refuses with the same message.
EXACT_CHECK_BYTES = 4 << 20


def upper_bound_tokens(docs: list[str]) -> int:
    """Most tokens a byte-level BPE can give: one per byte, plus one end-of-text per document."""
    return sum(len(d.encode()) + 1 for d in docs)


def lower_bound_tokens(docs: list[str], stop_at: int | None = None) -> int:
    """Fewest tokens a byte-level BPE with GPT-2 pre-tokenization gives: every pre-token (a run of letters,
    of digits or of punctuation, with its leading space) becomes at least one token, plus one end-of-text
    per document. Counting stops once ``stop_at`` is reached."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    total = 0
    for d in docs:
        total += len(pre.pre_tokenize_str(d)) + 1
        if stop_at is not None and total >= stop_at:
            break
    return total


def check_tokens(train: list[str], val: list[str], seq_len: int, tokenizer_cfg: dict, where: str) -> None:
    """Refuse a corpus whose training or validation split cannot fill one sequence of seq_len + 1 tokens,
    without building the tokenizer: the byte bound refuses for certain, the pre-token bound accepts for
    certain, and in between a small corpus is tokenized exactly with a BPE trained in memory. Only for the
    study's own byte-level BPE (a pretrained tokenizer's counts are checked by the tokenize step)."""
    if tokenizer_cfg["kind"] != "bpe":
        return
    need = seq_len + 1
    undecided = []
    n_docs = len(train) + len(val)
    for split, part in (("training", train), ("validation", val)):
        upper = upper_bound_tokens(part)
        if upper < need:
            raise DataError(f"{where}: " + too_short(
                split, f"at most {upper} tokens (the bytes of its {len(part)} of {n_docs} documents plus one "
                "end-of-text each)", need))
        if lower_bound_tokens(part, stop_at=need) < need:
            undecided.append((split, part))
    if not undecided or sum(len(d.encode()) for d in train) > EXACT_CHECK_BYTES:
        return
    from llmpar.data.tokenize import bpe_tokenizer

    tok = bpe_tokenizer(train, tokenizer_cfg["vocab_size"])
    for split, part in undecided:
        count = sum(len(e.ids) + 1 for e in tok.encode_batch(part))
        if count < need:
            raise DataError(f"{where}: " + too_short(
                split, f"{count} tokens ({len(part)} of {n_docs} documents, with the study's BPE of "
                f"{tokenizer_cfg['vocab_size']} trained on the training split)", need))


def check_source(data_cfg: dict, seq_len: int | None = None, seed: int = 0, tokenizer_cfg: dict | None = None,
                 data_dir: str | Path | None = None) -> None:
    """Cheap checks of the corpus source before any job runs (nothing is written on failure).

    Text files: every glob matches a file, the files hold text, and (given ``seq_len``) both sides of the
    train/validation split that ``build_corpus`` will make (the same documents, ``val_fraction`` and
    ``seed``) hold one sequence of seq_len + 1 tokens (``check_tokens``). Hugging Face: the dataset builder
    resolves (offline this succeeds only for local files or a cached dataset). Debian: the package list is
    valid and, unless ``data_dir/debian`` already holds their download, apt-get and every package are
    there. Any source whose token shards exist under ``data_dir`` (from this corpus): both splits hold one
    sequence.
    """
    tokenizer_cfg = tokenizer_cfg or {"kind": "bpe", "vocab_size": 512}
    source = data_cfg["source"]
    if source == "text":
        docs = text_documents(data_cfg["files"])
        if seq_len:
            train, val = split_documents(docs, data_cfg["val_fraction"], seed)
            check_tokens(train, val, seq_len, tokenizer_cfg, "data.files")
    elif source == "hf":
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
    elif source == "debian":
        debian.check_packages(data_cfg["debian"], Path(data_dir) / "debian" if data_dir else None)
    if seq_len and data_dir is not None:
        check_built_tokens(Path(data_dir), seq_len)


def check_built_tokens(data_dir: Path, seq_len: int) -> None:
    """Token shards already built from the current corpus must hold one sequence in each split (a study
    whose model.seq_len grew beyond its corpus is refused before any job)."""
    corpus_meta, tokens_meta = data_dir / "corpus" / "meta.json", data_dir / "tokens" / "meta.json"
    if not (corpus_meta.is_file() and tokens_meta.is_file()):
        return
    tokens = read_json(tokens_meta)
    if tokens.get("source_sha256") != read_json(corpus_meta).get("sha256"):
        return
    for split, name in (("train", "training"), ("val", "validation")):
        if tokens["tokens"][split] < seq_len + 1:
            raise DataError(f"{tokens_meta}: " + too_short(name, f"{tokens['tokens'][split]} tokens", seq_len + 1))
