"""The seed's commands run as written (with --model_size tiny on CPU) and exit 0."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

SEED_COMMANDS = {
    "data_parallel": ["--strategy", "data_parallel"],
    "pipeline_parallel": ["--strategy", "pipeline_parallel", "--stages", "2"],
    "hybrid_parallel": ["--strategy", "hybrid_parallel", "--nodes", "2", "--gpus_per_node", "1"],
}


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_seed_command_exits_zero(name, tiny_tokens, tmp_path):
    out = tmp_path / name
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), *SEED_COMMANDS[name], "--model_size", "tiny",
           "--steps", "4", "--device", "cpu", "--tokens", str(tiny_tokens), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["strategy"] == name and summary["steps_completed"] == 4
    if name == "hybrid_parallel":
        assert summary["nodes"] == 2 and sorted(r["node_rank"] for r in summary["per_rank"]) == [0, 1]
