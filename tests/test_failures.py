"""Failures are data: resume after SIGKILL, out-of-memory and divergence as results."""

import copy
import json
import os
import signal
import subprocess
import time

import pandas as pd
import psutil
import pytest
from conftest import BASE_CONFIG, train_run
from workflow_util import command as workflow_command
from workflow_util import env as workflow_env
from workflow_util import snakemake, write_config

from llmpar.analysis.aggregate import read_table
from llmpar.io import read_appended_jsonl

pytestmark = pytest.mark.slow

RESUME = copy.deepcopy(BASE_CONFIG)
RESUME["study"] = "resume"
RESUME["train"].update(steps=150, checkpoint_every=10, log_every=1, eval_every=50)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group of the workflow and every descendant (torchrun agents, workers)."""
    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def _logged_steps(progress) -> list[int]:
    """Steps logged so far (complete lines: the run may be writing one)."""
    return [r["step"] for r in read_appended_jsonl(progress) if r.get("kind") == "step"]


def test_sigkill_mid_run_then_rerun_resumes(tmp_path, tiny_tokens):
    work = tmp_path / "wf"
    work.mkdir()
    write_config(work, RESUME)
    run_dir = work / "results" / "resume" / "runs" / "single"
    progress = run_dir / "progress.jsonl"
    proc = subprocess.Popen(workflow_command(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=workflow_env(), start_new_session=True)
    killed_after = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file():
            steps = _logged_steps(progress)
            if steps and max(steps) >= 35:
                _kill_tree(proc)
                # the worker may log one more step between the poll and the kill: re-read what it left
                killed_after = max(_logged_steps(progress))
                break
        time.sleep(0.01)
    assert killed_after is not None, "the run finished or never started before it could be killed"
    assert not (run_dir / "summary.json").exists()
    assert killed_after < RESUME["train"]["steps"]

    snakemake(work, "--unlock")
    snakemake(work)
    log = (work / "logs" / "resume" / "train" / "single.log").read_text()
    newest = (killed_after // 10) * 10
    assert f"resumed from checkpoint step_{newest:08d} (step {newest})" in log, log[-3000:]

    steps = pd.read_csv(work / "results" / "resume" / "steps.csv")
    assert not steps.duplicated(["run", "step"]).any()
    assert list(steps["step"]) == list(range(1, RESUME["train"]["steps"] + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attempts"] == 2 and summary["redone_steps"] == killed_after - newest

    # the same run uninterrupted: identical losses (1e-5 relative)
    cfg = copy.deepcopy(RESUME)
    cfg["train"]["checkpoint_every"] = 0
    _, ref, _ = train_run(cfg, "single", tiny_tokens, tmp_path / "ref")
    ref_tokens = json.loads((tmp_path / "ref" / "summary.json").read_text())["data"]
    assert ref_tokens["tokens"] == summary["data"]["tokens"]  # same corpus and tokenizer
    for a, b in zip(steps.to_dict("records"), ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])


def test_oom_and_divergence_are_rows_and_the_study_completes(tmp_path):
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["study"] = "faults"
    cfg["runs"] = {
        "single": {"strategy": "single"},
        "oom": {"strategy": "data_parallel", "gpus_per_node": 2, "fault": {"kind": "oom", "at_step": 3}},
        "nan": {"strategy": "single", "fault": {"kind": "nan", "at_step": 2}},
    }
    write_config(tmp_path, cfg)
    snakemake(tmp_path)
    metrics = read_table(tmp_path / "results" / "faults" / "metrics.csv").set_index("run")
    assert metrics.loc["single", "status"] == "ok"
    assert metrics.loc["oom", "status"] == "oom" and "out-of-memory" in metrics.loc["oom", "message"]
    assert metrics.loc["nan", "status"] == "diverged" and "not finite" in metrics.loc["nan", "message"]
    # the steps the failed run completed before the fault stay in its record
    steps = read_table(tmp_path / "results" / "faults" / "steps.csv")
    assert list(steps[steps["run"] == "oom"]["step"]) == [1, 2] and metrics.loc["oom", "steps_completed"] == 2
    html = (tmp_path / "report" / "faults" / "report.html").read_text()
    assert "oom" in html and "diverged" in html and "not finite" in html


def test_unexpected_error_fails_the_job_loudly(tiny_tokens, tmp_path):
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["runs"]["crash"] = {"strategy": "single", "fault": {"kind": "crash", "at_step": 2}}
    summary, _, proc = train_run(cfg, "crash", tiny_tokens, tmp_path, check=False)
    assert proc.returncode != 0 and summary is None
    assert "Traceback" in proc.stderr + proc.stdout and "injected crash" in proc.stderr + proc.stdout
