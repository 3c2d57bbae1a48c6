"""Failures are data: resume after SIGKILL and after a stop signal, out-of-memory and divergence as results."""

import contextlib
import copy
import json
import re
import subprocess

import pandas as pd
import pytest
from conftest import BASE_CONFIG, read_run, train_run
from launches import kill_tree, kill_when_stalled, wait_until_stalled
from workflow_util import command as workflow_command
from workflow_util import env as workflow_env
from workflow_util import snakemake, write_config

from llmpar.analysis.aggregate import read_table

pytestmark = pytest.mark.slow

RESUME = copy.deepcopy(BASE_CONFIG)
RESUME["study"] = "resume"
RESUME["train"].update(checkpoint_every=3, log_every=1)
RESUME["runs"]["single"]["fault"] = {"kind": "stall", "at_step": 5}  # first attempt only


def test_sigkill_mid_run_then_rerun_resumes(tmp_path, baseline):
    """The workflow killed mid-run (SIGKILL to Snakemake, the launcher and the worker once the step-3
    checkpoint is complete and step 4 logged; the run stalls at step 5), then run again: the training
    job resumes from step 3 and the study's tables hold each step once, with the losses of the same
    run uninterrupted (the session's baseline: BASE_CONFIG's single, no checkpoints, no fault)."""
    work = tmp_path / "wf"
    work.mkdir()
    write_config(work, RESUME)
    run_dir = work / "results" / "resume" / "runs" / "single"
    proc = subprocess.Popen(workflow_command(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=workflow_env(), start_new_session=True)
    log = work / "logs" / "resume" / "train" / "single.log"
    killed = kill_when_stalled(proc, run_dir, checkpoint_step=3, stall_step=5, log=log)
    assert killed == [1, 2, 3, 4] and not (run_dir / "summary.json").exists()

    snakemake(work, "--unlock")
    snakemake(work)
    assert "resumed from checkpoint step_00000003 (step 3), attempt 1" in log.read_text(), log.read_text()[-3000:]

    steps = pd.read_csv(work / "results" / "resume" / "steps.csv")
    assert list(steps["step"]) == list(range(1, RESUME["train"]["steps"] + 1))
    assert list(steps["attempt"]) == [0, 0, 0, 1, 1, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attempts"] == 2 and summary["redone_steps"] == 1
    assert baseline[0]["data"]["tokens"] == summary["data"]["tokens"]  # same corpus and tokenizer
    assert list(steps["loss"]) == [r["loss"] for r in baseline[1]]
    assert summary["final_val_loss"] == baseline[0]["final_val_loss"]


def test_sigint_to_snakemake_alone_stops_the_training_and_the_rerun_resumes(tmp_path):
    """SIGINT to the snakemake process only, not its process group (as a parent process or a scheduler
    stops it), once the step-3 checkpoint is complete and step 4 logged (the run stalls at step 5): every
    process of the training job (launcher, torchrun agent, worker) is gone within seconds, the run has no
    summary, and a rerun resumes from step 3 with each step recorded once."""
    import os
    import signal

    import psutil

    cfg = copy.deepcopy(RESUME)
    cfg["study"] = "interrupt"
    write_config(tmp_path, cfg)
    run_dir = tmp_path / "results" / "interrupt" / "runs" / "single"
    target = str(run_dir.relative_to(tmp_path) / "summary.json")
    proc = subprocess.Popen(workflow_command(tmp_path, target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=workflow_env(), start_new_session=True)
    log = tmp_path / "logs" / "interrupt" / "train" / "single.log"
    assert wait_until_stalled(proc, run_dir, checkpoint_step=3, stall_step=5, log=log) == [1, 2, 3, 4]
    job = psutil.Process(proc.pid).children(recursive=True)
    try:
        assert any("llmpar.train" in " ".join(p.cmdline()) for p in job), [p.cmdline() for p in job]
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) != 0
        _, alive = psutil.wait_procs(job, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # a failed check leaves nothing running
        if proc.poll() is None:
            kill_tree(proc)
        for p in job:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert not (run_dir / "summary.json").exists()
    assert "stopped by SIGTERM: no summary written" in log.read_text(), log.read_text()[-3000:]

    snakemake(tmp_path, target)
    assert "resumed from checkpoint step_00000003 (step 3), attempt 1" in log.read_text(), log.read_text()[-3000:]
    summary, steps = read_run(run_dir)
    assert summary["status"] == "ok" and summary["attempts"] == 2
    assert [r["step"] for r in steps] == list(range(1, 7)) and [r["attempt"] for r in steps] == [0, 0, 0, 1, 1, 1]


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
    # the report lists each failed run with its status and message, and marks its table rows
    html = (tmp_path / "report" / "faults" / "report.html").read_text()
    assert re.search(r"<li><b>oom</b>: oom — rank 0: [^<]*injected out-of-memory fault at step 3</li>", html)
    assert re.search(r"<li><b>nan</b>: diverged — [^<]*loss not finite for 3 consecutive steps", html)
    assert '<li><b>single</b>' not in html
    for run in ("oom", "nan"):  # every table row of a failed run is marked
        rows = re.findall(rf'<tr( class="failed")?><td>(?:<span class="sw"[^>]*></span>)?{run}</td>', html)
        assert len(rows) >= 3 and all(rows), (run, rows)


def test_unexpected_error_fails_the_job_loudly(tiny_tokens, tmp_path):
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["runs"]["crash"] = {"strategy": "single", "fault": {"kind": "crash", "at_step": 2}}
    summary, _, proc = train_run(cfg, "crash", tiny_tokens, tmp_path, check=False)
    assert proc.returncode != 0 and summary is None
    assert "Traceback" in proc.stderr + proc.stdout and "injected crash" in proc.stderr + proc.stdout
