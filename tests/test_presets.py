"""Every preset in configs/ is a recorded study: its raw runs are committed under results/<study>/runs/,
so its tables, figures and report regenerate from them on any machine (CI's clean clone included)."""

from __future__ import annotations

import json

import pytest

from llmpar.config import load_yaml, prepare
from llmpar.paths import REPO_ROOT

PRESETS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert len(PRESETS) >= 3, PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_configured_run_of_a_preset_is_recorded(path):
    cfg = prepare(load_yaml(path))
    assert cfg["recorded"], f"{path.name}: recorded must be true for a committed study"
    runs = REPO_ROOT / "results" / cfg["study"] / "runs"
    missing, bad = [], []
    for name in cfg["runs"]:
        summary = runs / name / "summary.json"
        if not summary.is_file() or not (runs / name / "steps.jsonl").is_file():
            missing.append(name)
            continue
        s = json.loads(summary.read_text())
        if s["run"] != name or s["status"] not in ("ok", "oom", "invalid", "failed"):
            bad.append((name, s["run"], s["status"]))
    assert not missing and not bad, (missing, bad)
