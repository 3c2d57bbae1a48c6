"""What a study trained on, in the words of a report header: kind, source, size, tokens, synthetic or not."""

from __future__ import annotations


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


def _listing(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f", and {len(items) - shown} more" if len(items) > shown else "")


def describe(corpus_meta: dict, tokens_meta: dict | None = None) -> dict:
    """The corpus of a study from its ``data/corpus/meta.json`` and (once tokenized) ``data/tokens/meta.json``.

    Returns ``kind`` (debian, text, hf or synthetic), ``synthetic``, ``source`` (packages and versions,
    files, dataset, or the generator's settings), ``documents``, ``bytes``, ``tokens`` ({train, val}, or
    None before tokenization), ``tokenizer`` (e.g. "BPE 32000") and ``line``, one sentence such as
    "real text: 35 Debian documentation packages (linux-doc-6.1 6.1.192-3, ...), 19.7 M words, 3.9 M
    documents ..., 28.1 M train / 0.6 M val tokens (BPE 32000), not synthetic".
    """
    kind = corpus_meta["source"]
    synthetic = corpus_meta.get("synthetic", kind == "synthetic")
    source = corpus_meta.get("description", {})
    documents = sum(corpus_meta["documents"].values())
    size = corpus_meta.get("bytes", corpus_meta.get("characters", {}))
    n_bytes = sum(size.values())
    if kind == "debian":
        packages = source.get("packages", [])
        what = (f"real text: {len(packages)} Debian documentation packages "
                f"({_listing([p['name'] + ' ' + p['version'] for p in packages])}), {_millions(source['words'])} words")
    elif kind == "text":
        files = source.get("files", [])
        what = f"text: {len(files)} local file{'s' if len(files) != 1 else ''} ({_listing(files)})"
    elif kind == "hf":
        name = source.get("name", "?")
        detail = ", ".join(str(v) for v in (source.get("config"), f"split {source.get('split')}") if v)
        what = f"Hugging Face dataset {name} ({detail})"
        if source.get("data_files"):
            what += f" from local files {_listing(list(source['data_files']))}"
    else:
        what = (f"synthetic: Markov chain over 200 made-up words, {source.get('documents', documents)} documents "
                f"of {source.get('words_per_document', '?')} words")
    size_text = f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes:,} bytes"
    parts = [what, f"{documents:,} documents", size_text]
    tokens = tokenizer = None
    if tokens_meta is not None:
        tokens = dict(tokens_meta["tokens"])
        tokenizer = f"{tokens_meta.get('tokenizer_model', 'tokenizer')} {tokens_meta['vocab_size']}"
        parts.append(f"{_millions(tokens['train'])} train / {_millions(tokens['val'])} val tokens ({tokenizer})")
    parts.append("synthetic" if synthetic else "not synthetic")
    return {
        "kind": kind,
        "synthetic": synthetic,
        "source": source,
        "documents": documents,
        "bytes": n_bytes,
        "tokens": tokens,
        "tokenizer": tokenizer,
        "line": ", ".join(parts),
    }


def describe_study(data_cfg: dict, corpus_meta: dict | None, tokens_meta: dict | None) -> str:
    """One sentence for a report header: :func:`describe`'s where the study's corpus metadata is at hand
    (``results/<study>/data/corpus/meta.json``), else what the config and the runs' token metadata say (a
    study whose runs were recorded elsewhere keeps only its runs' records)."""
    if corpus_meta is not None:
        return describe(corpus_meta, tokens_meta)["line"]
    kind = data_cfg["source"]
    if kind == "synthetic":
        syn = data_cfg.get("synthetic", {})
        what = (f"synthetic: Markov chain over 200 made-up words, {syn.get('documents', '?'):,} documents of "
                f"{syn.get('words_per_document', '?')} words")
    elif kind == "debian":
        what = f"real text: {len(data_cfg['debian']['packages'])} Debian documentation packages"
    elif kind == "text":
        what = f"text: local files {_listing(data_cfg.get('files', []))}"
    else:
        what = f"Hugging Face dataset {data_cfg.get('hf', {}).get('name', '?')}"
    parts = [what]
    if tokens_meta is not None:
        tokens = tokens_meta["tokens"]
        tokenizer = f"{tokens_meta.get('tokenizer_model', 'BPE')} {tokens_meta['vocab_size']}"
        parts.append(f"{_millions(tokens['train'])} train / {_millions(tokens['val'])} val tokens ({tokenizer})")
    parts.append("synthetic" if kind == "synthetic" else "not synthetic")
    return ", ".join(parts)


def repetition(tokens_trained: list[int], train_tokens: int) -> str:
    """How often the runs see the training tokens: once at most, or how many times the longest run goes round."""
    most = max(tokens_trained, default=0)
    if not train_tokens or not most:
        return ""
    if most <= train_tokens:
        return f"the longest run trains on {most / train_tokens:.0%} of the training tokens: no token is seen twice"
    return f"the longest run goes {most / train_tokens:.2f} times through the training tokens"
