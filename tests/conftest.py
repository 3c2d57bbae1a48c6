"""Shared fixtures: a tiny tokenized corpus and a helper that trains one run through the real launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmpar.config import prepare, run_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The small, fast study every equivalence test trains: fp32, global batch 8, 6 steps.
BASE_CONFIG = {
    "study": "test",
    "seed": 7,
    "data": {"source": "synthetic", "synthetic": {"documents": 300, "words_per_document": 40}},
    "tokenizer": {"vocab_size": 300},
    "model": {"size": "tiny", "seq_len": 32},
    "train": {"steps": 6, "global_batch": 8, "lr": 0.003, "warmup_steps": 2, "eval_every": 3,
              "eval_batches": 1, "log_every": 2, "device": "cpu", "sample_period_s": 0.05},
    "runs": {"single": {"strategy": "single"}},
    "baseline": "single",
}


def make_config(runs: dict | None = None, **sections) -> dict:
    cfg = json.loads(json.dumps(BASE_CONFIG))
    if runs:
        cfg["runs"] = {"single": {"strategy": "single"}, **runs}
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Corpus -> BPE -> token shards for BASE_CONFIG, built once per test session."""
    from llmpar.data.corpus import build_corpus
    from llmpar.data.tokenize import build_shards, build_tokenizer

    cfg = prepare(BASE_CONFIG)
    root = tmp_path_factory.mktemp("data")
    build_corpus(cfg["data"], cfg["seed"], root / "corpus")
    build_tokenizer(cfg["tokenizer"], root / "corpus" / "train.txt", root / "tokenizer.json")
    build_shards(root / "tokenizer.json", root / "corpus", root / "tokens")
    return root / "tokens"


def train_run(cfg: dict, run: str, tokens: Path, out: Path, timeout: int = 600, check: bool = True):
    """Train ``run`` of ``cfg`` through scripts/train.py; returns (summary, steps, completed process)."""
    prepared = prepare(cfg)
    rc = run_config(prepared, run)
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--run-config", json.dumps(rc),
           "--tokens", str(tokens), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{run} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    steps_path = out / "steps.jsonl"
    steps = [json.loads(x) for x in steps_path.read_text().splitlines()] if steps_path.is_file() else []
    return summary, steps, proc


@pytest.fixture(scope="session")
def baseline(tiny_tokens, tmp_path_factory):
    """The single-process reference run of BASE_CONFIG (summary, steps)."""
    summary, steps, _ = train_run(make_config(), "single", tiny_tokens, tmp_path_factory.mktemp("single"))
    return summary, steps


def assert_same_losses(steps, ref_steps, rtol: float, min_steps: int = 5):
    """Per-step training losses within ``rtol`` relative of the baseline, for at least ``min_steps`` steps."""
    assert len(steps) >= min_steps and len(ref_steps) >= min_steps, (len(steps), len(ref_steps))
    for a, b in zip(steps, ref_steps):
        assert a["step"] == b["step"]
        rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        assert rel <= rtol, f"step {a['step']}: loss {a['loss']} vs baseline {b['loss']} (rel {rel:.2e} > {rtol})"


@pytest.fixture(scope="session")
def shared_two(tiny_tokens, tmp_path_factory):
    """The 2-process runs of tests/shared_study.py (killed and resumed runs, their references, extras)."""
    from shared_study import train_layout

    return train_layout("two", tiny_tokens, tmp_path_factory.mktemp("shared-two"))


@pytest.fixture(scope="session")
def shared_four(tiny_tokens, tmp_path_factory):
    """The 4-process runs of tests/shared_study.py."""
    from shared_study import train_layout

    return train_layout("four", tiny_tokens, tmp_path_factory.mktemp("shared-four"))
