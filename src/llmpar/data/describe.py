"""What a study trained on, in the words of a report header: kind, source, size, tokens, synthetic or not."""

from __future__ import annotations


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


def _listing(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f", and {len(items) - shown} more" if len(items) > shown else "")


def config_source(data_cfg: dict) -> dict:
    """What the study's config says its corpus is made of, in the shape of a corpus record's ``description``
    (:func:`llmpar.data.corpus.source_description`): for a corpus record that holds no description, and for a
    study that keeps no corpus record. Debian packages carry the versions the config pins (the candidate's is
    known only to the fetched manifest)."""
    kind = data_cfg["source"]
    if kind == "debian":
        return {"packages": [{"name": p["name"], "version": p.get("version")} for p in data_cfg["debian"]["packages"]]}
    if kind == "text":
        return {"files": list(data_cfg["files"])}
    if kind == "hf":
        return {key: data_cfg["hf"].get(key) for key in ("name", "config", "split", "data_files")}
    return dict(data_cfg["synthetic"])


def _what(kind: str, source: dict) -> str:
    """The corpus's kind and source in words, from a description (:func:`config_source`'s shape)."""
    if kind == "debian":
        packages = [" ".join(filter(None, (p["name"], p.get("version")))) for p in source["packages"]]
        words = f", {_millions(source['words'])} words" if "words" in source else ""
        return f"real text: {len(packages)} Debian documentation packages ({_listing(packages)}){words}"
    if kind == "text":
        files = source["files"]
        return f"text: {len(files)} local file{'s' if len(files) != 1 else ''} ({_listing(files)})"
    if kind == "hf":
        detail = ", ".join(str(v) for v in (source.get("config"), f"split {source.get('split')}") if v)
        what = f"Hugging Face dataset {source['name']} ({detail})"
        return what + (f" from local files {_listing(list(source['data_files']))}" if source.get("data_files") else "")
    return f"synthetic: Markov chain over 200 made-up words, {source['words_per_document']} words a document"


def tokenizer_name(tokens_meta: dict, tokenizer_cfg: dict | None) -> str:
    """The tokenizer's model and vocabulary (e.g. "BPE 32000"): the model the token shards' record names, else
    the study's tokenizer config's (a record without ``tokenizer_model`` and no config is refused)."""
    model = tokens_meta.get("tokenizer_model")
    if model is None:
        if tokenizer_cfg is None:
            raise ValueError("the token shards' meta names no tokenizer_model; pass the study's tokenizer config")
        model = "BPE" if tokenizer_cfg["kind"] == "bpe" else f"pretrained {tokenizer_cfg['pretrained']}"
    return f"{model} {tokens_meta['vocab_size']}"


def _token_counts(tokens_meta: dict, tokenizer: str) -> str:
    tokens = tokens_meta["tokens"]
    return f"{_millions(tokens['train'])} train / {_millions(tokens['val'])} val tokens ({tokenizer})"


def describe(corpus_meta: dict, tokens_meta: dict | None = None, data_cfg: dict | None = None,
             tokenizer_cfg: dict | None = None) -> dict:
    """The corpus of a study from its ``data/corpus/meta.json`` and (once tokenized) ``data/tokens/meta.json``;
    what those records lack (the source's description, the tokenizer's model) from the study's ``data`` and
    ``tokenizer`` config, and an error naming the missing field where no config is given.

    Returns ``kind`` (debian, text, hf or synthetic), ``synthetic``, ``source`` (packages and versions,
    files, dataset, or the generator's settings), ``documents``, ``bytes``, ``tokens`` ({train, val}, or
    None before tokenization), ``tokenizer`` (e.g. "BPE 32000") and ``line``, one sentence such as
    "real text: 35 Debian documentation packages (linux-doc-6.1 6.1.192-3, ...), 19.7 M words, 3.9 M
    documents ..., 28.1 M train / 0.6 M val tokens (BPE 32000), not synthetic".
    """
    kind = corpus_meta["source"]
    synthetic = corpus_meta.get("synthetic", kind == "synthetic")
    source = corpus_meta.get("description")
    if source is None:
        if data_cfg is None:
            raise ValueError("the corpus meta holds no description of its source; pass the study's data config")
        source = config_source(data_cfg)
    documents = sum(corpus_meta["documents"].values())
    n_bytes = sum(corpus_meta.get("bytes", corpus_meta["characters"]).values())
    size_text = f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes:,} bytes"
    parts = [_what(kind, source), f"{documents:,} documents", size_text]
    tokens = tokenizer = None
    if tokens_meta is not None:
        tokens, tokenizer = dict(tokens_meta["tokens"]), tokenizer_name(tokens_meta, tokenizer_cfg)
        parts.append(_token_counts(tokens_meta, tokenizer))
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


def describe_study(data_cfg: dict, tokenizer_cfg: dict, corpus_meta: dict | None, tokens_meta: dict | None) -> str:
    """One sentence for a report header: :func:`describe`'s where the study's corpus metadata is at hand
    (``results/<study>/data/corpus/meta.json``), else what the config and the runs' token metadata say (a
    study whose runs were recorded elsewhere keeps only its runs' records)."""
    if corpus_meta is not None:
        return describe(corpus_meta, tokens_meta, data_cfg, tokenizer_cfg)["line"]
    kind = data_cfg["source"]
    parts = [_what(kind, config_source(data_cfg))]
    if tokens_meta is not None:
        parts.append(_token_counts(tokens_meta, tokenizer_name(tokens_meta, tokenizer_cfg)))
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
