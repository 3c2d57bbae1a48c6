#!/usr/bin/env python
"""The data and tokenizer assets torchtitan reads, under results/<study>/data/torchtitan/ (ignored by git;
moved to the GPU host with the token shards):

    assets/tokenizer.json         our study's tokenizer (results/<study>/data/tokenizer/), byte for byte
    assets/tokenizer_config.json  eos_token <|endoftext|>, no bos_token: torchtitan's c4_test loader then
                                  encodes each document as its tokens + EOS, the stream of our shards
    c4_test/train.jsonl.gz        {"text": ...} per line: our corpus's training documents, in order, until
                                  (steps + 5) x global batch x (seq_len + 1) tokens are covered (torchtitan
                                  cuts 2049-token windows); side_by_side.sh unpacks it
    meta.json                     counts, hashes, sizes

    python benchmarks/torchtitan/prepare.py --config configs/gpu2-1b.yaml --steps 45

The model's size does not depend on this tokenizer: torchtitan 0.2.2 takes vocab_size from the model
flavor (32000 in tt_launch.py), not from the tokenizer, as our model pads its embedding to 32000.
Corpus: results/<study>/data/corpus/train.txt when the data rules ran; else the same synthetic corpus is
generated in memory (llmpar.data.corpus with the config's data settings and seed) and, without our
tokenizer, a BPE is trained on it as the tokenize rule would (nothing is written outside data/torchtitan).
"""

import argparse
import gzip
import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from llmpar.config import load_yaml, prepare
from llmpar.data.corpus import load_documents, split_documents
from llmpar.paths import REPO_ROOT

EOS = "<|endoftext|>"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpu2-1b.yaml")
    p.add_argument("--study", help="default: the config's study")
    p.add_argument("--steps", type=int, default=45)
    a = p.parse_args()
    cfg = prepare(load_yaml(a.config))
    study, steps = a.study or cfg["study"], a.steps
    data = REPO_ROOT / "results" / study / "data"
    out = data / "torchtitan"
    assets, c4 = out / "assets", out / "c4_test"
    for d in (assets, c4):
        d.mkdir(parents=True, exist_ok=True)

    train_txt = data / "corpus" / "train.txt"
    if train_txt.is_file():
        docs = [line.rstrip("\n") for line in open(train_txt) if line.strip()]
        source = str(train_txt.relative_to(REPO_ROOT))
    else:
        docs, _ = split_documents(load_documents(cfg["data"], cfg["seed"]), cfg["data"]["val_fraction"], cfg["seed"])
        source = f"llmpar.data.corpus ({cfg['data']['source']}, seed {cfg['seed']}; generated in memory)"

    ours = data / "tokenizer" / "tokenizer.json"
    if ours.is_file():
        shutil.copyfile(ours, assets / "tokenizer.json")
        tok_source = str(ours.relative_to(REPO_ROOT))
    else:
        from llmpar.data.tokenize import build_tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "train.txt").write_text("\n".join(docs) + "\n")
            build_tokenizer(cfg["tokenizer"], Path(tmp) / "train.txt", assets / "tokenizer.json")
        tok_source = f"trained by prepare.py ({cfg['tokenizer']})"

    tok = Tokenizer.from_file(str(assets / "tokenizer.json"))
    if tok.token_to_id(EOS) is None:
        sys.exit(f"{assets / 'tokenizer.json'} has no {EOS} token")
    (assets / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": True,
        "model_max_length": cfg["model"]["seq_len"],
    }, indent=1) + "\n")

    seq, gb = cfg["model"]["seq_len"], cfg["train"]["global_batch"]
    need = (steps + 5) * gb * (seq + 1)
    buf, tokens, n = io.BytesIO(), 0, 0
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        for start in range(0, len(docs), 1000):
            batch = docs[start:start + 1000]
            for doc, enc in zip(batch, tok.encode_batch(batch)):
                gz.write((json.dumps({"text": doc}) + "\n").encode())
                tokens += len(enc.ids) + 1
                n += 1
                if tokens >= need:
                    break
            if tokens >= need:
                break
    if tokens < need:
        sys.exit(f"the corpus holds {tokens} tokens, {need} are needed for {steps} steps")
    (c4 / "train.jsonl.gz").write_bytes(buf.getvalue())

    meta_tokens = data / "tokens" / "meta.json"
    tok_sha = hashlib.sha256((assets / "tokenizer.json").read_bytes()).hexdigest()
    meta = {
        "study": study, "steps_covered": steps + 5, "tokens_needed": need, "tokens": tokens, "documents": n,
        "corpus": source, "tokenizer": tok_source, "tokenizer_vocab": tok.get_vocab_size(), "tokenizer_sha256": tok_sha,
        "same_tokenizer_as_shards": (json.loads(meta_tokens.read_text()).get("tokenizer_sha256") == tok_sha
                                     if meta_tokens.is_file() else None),
        "model_vocab_size": cfg["model"].get("vocab_size"),
        "bytes": {f.name: f.stat().st_size for f in (c4 / "train.jsonl.gz", assets / "tokenizer.json",
                                                     assets / "tokenizer_config.json")},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
