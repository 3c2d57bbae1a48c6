"""The study on a real Slurm cluster, through `snakemake --profile slurm` (run by `make test-slurm`).

Needs the local cluster of scripts/slurm/setup-local-cluster.sh (or any cluster whose partition and
account match profiles/slurm, with two nodes and two GPUs per node). The default study runs under
the name ``slurm-test`` (tests/slurm/study.yaml) with GPUs requested and a two-node hybrid run.
What each test saw is also written to logs/slurm-test/*.txt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmpar.config import load_yaml, prepare
from llmpar.io import read_appended_jsonl

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STUDY = "slurm-test"
OVERLAY = "tests/slurm/study.yaml"
RES = REPO / "results" / STUDY
LOGS = REPO / "logs" / STUDY
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M)
WORKFLOW_TIMEOUT = 900


def _env() -> dict:
    env = dict(os.environ)
    # the jobs run `python` from PATH (sbatch --export=ALL hands this environment to them)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # Snakemake's log reaches the file as it happens
    return env


def _snakemake(*args: str, configfiles: tuple[str, ...] = ()) -> list[str]:
    """`snakemake --profile slurm` as a user types it: the default study (config.yaml, named explicitly
    so it does not matter whether --configfile replaces or extends it) with the slurm-test overlay."""
    return [str(SNAKEMAKE), *args, "--profile", "slurm", "--configfile", "config.yaml", OVERLAY, *configfiles]


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def _sacct(job_ids) -> dict[str, dict]:
    """JobID -> {State, ExitCode, NodeList, AllocTRES} of whole jobs (no steps)."""
    out = _sh("sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,ExitCode,NodeList,AllocTRES")
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: dict(zip(("State", "ExitCode", "NodeList", "AllocTRES"), r[1:])) for r in rows}


def _submissions(log: str) -> list[tuple[str, str, str]]:
    """(slurm job id, rule_<rule> or group_<group>, wildcards) of every sbatch in a Snakemake log."""
    subs = []
    for job_id, path in SUBMITTED.findall(log):
        parts = Path(path).relative_to(REPO / ".snakemake" / "slurm_logs").parts
        subs.append((job_id, parts[0], parts[1] if len(parts) > 2 else ""))
    return subs


def _record(name: str, text: str) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / name).write_text(text)
    print(text)


@pytest.fixture(scope="session", autouse=True)
def cluster():
    """Fail early, with a hint, when no cluster answers."""
    for cmd in (["scontrol", "ping"], ["sacct", "-n", "-X", "-S", "now"]):
        try:
            subprocess.run(cmd, capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.fail(f"{' '.join(cmd)} failed ({exc}): start the local cluster with "
                        "scripts/slurm/setup-local-cluster.sh, or run `make test-slurm`")


@pytest.fixture(scope="session")
def study_cfg() -> dict:
    raw = load_yaml(REPO / "config.yaml")
    for section, value in load_yaml(REPO / OVERLAY).items():  # Snakemake merges dicts key by key
        raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) else value
    return prepare(raw)


@pytest.fixture(scope="session")
def study_run(study_cfg):
    """The whole study through `snakemake --profile slurm`, from scratch. Returns (log text, submissions)."""
    for d in (RES, LOGS, REPO / "report" / STUDY):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run(_snakemake(), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=WORKFLOW_TIMEOUT)
    log = proc.stdout + proc.stderr
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / "snakemake-slurm.log").write_text(log)
    assert proc.returncode == 0, f"snakemake --profile slurm failed ({proc.returncode}):\n{log[-6000:]}"
    print(f"study through Slurm in {time.time() - t0:.0f}s")
    return log, _submissions(log)


def test_every_training_job_went_through_sbatch(study_cfg, study_run):
    log, subs = study_run
    train = {wc: job_id for job_id, what, wc in subs if what == "rule_train"}
    assert sorted(train) == sorted(study_cfg["runs"]), f"training runs submitted: {sorted(train)}"
    acct = _sacct([job_id for job_id, _, _ in subs])
    lines = [f"{'run/group':<22} {'jobid':>6}  {'state':<10} {'exit':<5} {'nodes':<10} alloc"]
    for job_id, what, wc in subs:
        a = acct.get(job_id)
        assert a is not None, f"sacct does not know job {job_id} ({what} {wc})"
        lines.append(f"{wc or what:<22} {job_id:>6}  {a['State']:<10} {a['ExitCode']:<5} {a['NodeList']:<10} "
                     f"{a['AllocTRES']}")
    _record("sacct.txt", "\n".join(lines) + "\n")
    for job_id, what, wc in subs:
        assert (acct[job_id]["State"], acct[job_id]["ExitCode"]) == ("COMPLETED", "0:0"), (what, wc, acct[job_id])
    # the request follows the run's layout: GPUs (launch.gpus: true), CPUs and memory per node
    launch = study_cfg["launch"]
    for run, job_id in train.items():
        spec, tres = study_cfg["runs"][run], acct[job_id]["AllocTRES"]
        nodes, per_node = spec["nodes"], spec["gpus_per_node"]
        assert f"node={nodes}" in tres, (run, tres)
        assert f"gres/gpu={nodes * per_node}" in tres, (run, tres)
        assert f"cpu={nodes * per_node * launch['cpus_per_gpu']}" in tres, (run, tres)
        assert f"mem={nodes * per_node * launch['mem_mb_per_gpu']}M" in tres, (run, tres)


def test_two_node_run_ran_on_both_nodes(study_cfg, study_run):
    multi = {n: s for n, s in study_cfg["runs"].items() if s["nodes"] > 1}
    assert any(s["strategy"] == "hybrid_parallel" and s["nodes"] == 2 for s in multi.values()), multi
    _, subs = study_run
    train = {wc: job_id for job_id, what, wc in subs if what == "rule_train"}
    seen = []
    for run, spec in multi.items():
        summary = json.loads((RES / "runs" / run / "summary.json").read_text())
        steps = _sh("sacct", "-n", "-P", "-j", train[run], "-o", "JobID,JobName,State,ExitCode,NNodes,NodeList")
        seen.append(f"{run}: summary node_names={summary['node_names']} status={summary['status']} "
                    f"world_size={summary['world_size']}\nsacct (job and steps):\n{steps}")
        assert summary["status"] == "ok", summary.get("message")
        assert len(set(summary["node_names"])) == spec["nodes"], summary["node_names"]
        # one srun step spanning both nodes (one torchrun agent per node)
        assert any(f[0].endswith(".0") and f[2] == "COMPLETED" and f[4] == str(spec["nodes"])
                   for f in (line.split("|") for line in steps.splitlines())), steps
    _record("multinode.txt", "\n".join(seen) + "\n")


def test_study_outputs_complete(study_cfg, study_run):
    for run in study_cfg["runs"]:
        assert json.loads((RES / "runs" / run / "summary.json").read_text())["status"] == "ok", run
    metrics = (RES / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + len(study_cfg["runs"]), metrics[:1]
    figures = sorted(p.name for p in (RES / "figures").iterdir())
    assert {"throughput.png", "memory.png", "loss_vs_time.png"} <= set(figures), figures
    report = REPO / "report" / STUDY / "report.html"
    assert report.is_file() and report.stat().st_size > 1000
    # nothing left to do: the workflow agrees that every output exists and is current
    dry = subprocess.run(_snakemake("--dry-run", "--nolock"), cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    _record("outputs.txt", f"metrics.csv rows: {len(metrics) - 1}\nfigures: {figures}\nreport: {report}\n")


def test_cancelled_training_job_is_rerun(study_run, tmp_path):
    """scancel a training job mid-run: Snakemake reports the failure and `retries:` of the profile
    submits it again, which completes (resuming from the checkpoint the cancelled attempt left)."""
    run, steps, ckpt = "cancel-me", 200, 20
    overlay = tmp_path / "cancel.yaml"
    overlay.write_text(yaml.safe_dump({
        "train": {"steps": steps, "log_every": 5, "eval_every": 100, "checkpoint_every": ckpt},
        "runs": {run: {"strategy": "single"}},
    }))
    out = RES / "runs" / run
    shutil.rmtree(out, ignore_errors=True)
    target = f"results/{STUDY}/runs/{run}/summary.json"
    log_path = LOGS / "snakemake-slurm-cancel.log"
    t0 = time.time()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_snakemake(target, configfiles=(str(overlay),)), cwd=REPO, env=_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, text=True)
        cancelled, at_step = None, None
        try:
            while proc.poll() is None and time.time() - t0 < WORKFLOW_TIMEOUT and cancelled is None:
                queue = _sh("squeue", "-h", "-o", "%i|%T|%k")
                running = [line.split("|")[0] for line in queue.splitlines()
                           if line.endswith(f"rule_train_wildcards_{run}") and "|RUNNING|" in line]
                done = [r["step"] for r in read_appended_jsonl(out / "progress.jsonl") if r.get("kind") == "step"]
                if running and done and ckpt < max(done) < steps:
                    cancelled, at_step = running[0], max(done)
                    subprocess.run(["scancel", cancelled], check=True)
                time.sleep(0.3)
            rc = proc.wait(timeout=max(10, WORKFLOW_TIMEOUT - (time.time() - t0)))
        finally:
            if proc.poll() is None:  # Snakemake cancels its jobs on SIGINT (SIGTERM waits for them)
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    log = log_path.read_text()
    assert cancelled, f"the training job was never caught mid-run (log: {log_path}):\n{log[-3000:]}"
    assert rc == 0, f"snakemake failed ({rc}) after the cancel:\n{log[-6000:]}"
    # Snakemake saw the failure ...
    assert re.search(rf"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED", log), log[-4000:]
    assert "Error in rule train" in log and "Trying to restart job" in log, log[-4000:]
    # ... and the profile's retries submitted the job again, which completed
    jobs = [job_id for job_id, what, wc in _submissions(log) if what == "rule_train" and wc == run]
    assert len(jobs) == 2 and jobs[0] == cancelled, jobs
    acct = _sacct(jobs)
    assert acct[cancelled]["State"].startswith("CANCELLED"), acct
    assert (acct[jobs[1]]["State"], acct[jobs[1]]["ExitCode"]) == ("COMPLETED", "0:0"), acct
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps_completed"] == steps, summary
    train_log = (LOGS / "train" / f"{run}.log").read_text()
    resumed = re.search(r"resumed from checkpoint step_(\d+) \(step (\d+)\), attempt 1", train_log)
    _record("cancel.txt", (
        f"scancel {cancelled} at step {at_step}/{steps}; retried as job {jobs[1]}\n"
        + "\n".join(f"{j}: {a['State']} {a['ExitCode']} {a['NodeList']}" for j, a in acct.items())
        + f"\nsummary: status={summary['status']} steps_completed={summary['steps_completed']} "
        f"attempts={summary.get('attempts')}\nretry: {resumed.group(0) if resumed else 'started from step 0'}\n"
        f"took {time.time() - t0:.0f}s\n"))
    # the retry resumed from a checkpoint the cancelled attempt completed, and redid no step twice in
    # the records
    assert resumed, train_log[-3000:]
    assert int(resumed.group(2)) % ckpt == 0 and ckpt <= int(resumed.group(2)) < steps, (resumed.group(0), at_step)
    assert summary["attempts"] == 2
    records = [json.loads(x)["step"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert records == list(range(1, steps + 1))
