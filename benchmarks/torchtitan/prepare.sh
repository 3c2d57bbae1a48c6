#!/usr/bin/env bash
# Here (CPU side, before the device call): the data and tokenizer assets torchtitan reads, under
# results/<study>/data/torchtitan/ (ignored; carried to the device with the call):
#
#   assets/tokenizer.json         our study's tokenizer (results/<study>/data/tokenizer/), byte for byte
#   assets/tokenizer_config.json  eos_token <|endoftext|>, no bos_token: torchtitan's c4_test loader then
#                                 encodes each document as its tokens + EOS, the stream of our shards
#   c4_test/train.jsonl.gz        {"text": ...} per line: our corpus's training documents, in order, until
#                                 (STEPS + 5) x global batch x (seq_len + 1) tokens are covered (torchtitan
#                                 cuts 2049-token windows); gzipped, the device script unpacks it
#   meta.json                     counts, hashes, sizes
#
#   CONFIG=configs/gpu2-1b.yaml STUDY=h100x2-1b STEPS=45 bash benchmarks/torchtitan/prepare.sh
#
# The model's size does not depend on this tokenizer: torchtitan 0.2.2 takes vocab_size from the model
# flavor (32000 in tt_launch.py), not from the tokenizer, as our model pads its embedding to 32000.
# Corpus: results/<study>/data/corpus/train.txt when the data rules ran; else the same synthetic corpus is
# generated in memory (llmpar.data.corpus with the config's data settings and seed) and, without our
# tokenizer, a BPE is trained on it as the tokenize rule would (nothing is written outside data/torchtitan).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-configs/gpu2-1b.yaml}
PY=${PY:-.venv/bin/python}
STUDY=${STUDY:-$($PY -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['study'])" "$CONFIG")}
STEPS=${STEPS:-45}
export CONFIG STUDY STEPS
PYTHONPATH=src $PY - <<'EOF'
import gzip, hashlib, io, json, os, shutil, sys, tempfile
from pathlib import Path

from llmpar.config import load_yaml, prepare
from llmpar.data.corpus import split_documents, load_documents

cfg = prepare(load_yaml(os.environ["CONFIG"]))
study, steps = os.environ["STUDY"], int(os.environ["STEPS"])
data = Path("results") / study / "data"
out = data / "torchtitan"
assets, c4 = out / "assets", out / "c4_test"
for d in (assets, c4):
    d.mkdir(parents=True, exist_ok=True)

train_txt = data / "corpus" / "train.txt"
if train_txt.is_file():
    docs = [line.rstrip("\n") for line in open(train_txt) if line.strip()]
    source = str(train_txt)
else:
    docs, _ = split_documents(load_documents(cfg["data"], cfg["seed"]), cfg["data"]["val_fraction"], cfg["seed"])
    source = f"llmpar.data.corpus ({cfg['data']['source']}, seed {cfg['seed']}; generated in memory)"

ours = data / "tokenizer" / "tokenizer.json"
if ours.is_file():
    shutil.copyfile(ours, assets / "tokenizer.json")
    tok_source = str(ours)
else:
    from llmpar.data.tokenize import build_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.txt").write_text("\n".join(docs) + "\n")
        build_tokenizer(cfg["tokenizer"], Path(tmp) / "train.txt", assets / "tokenizer.json")
    tok_source = f"trained here ({cfg['tokenizer']})"

from tokenizers import Tokenizer
tok = Tokenizer.from_file(str(assets / "tokenizer.json"))
EOS = "<|endoftext|>"
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
    "bytes": {p.name: p.stat().st_size for p in (c4 / "train.jsonl.gz", assets / "tokenizer.json",
                                                 assets / "tokenizer_config.json")},
}
(out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
print(json.dumps(meta, indent=1))
EOF
du -sh "results/$STUDY/data/torchtitan"
