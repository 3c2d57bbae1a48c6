"""The whole DAG on a small study: outputs, and only stale outputs rebuild."""

import copy
import json

import pandas as pd
import pytest
from conftest import BASE_CONFIG
from workflow_util import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

STUDY = dict(copy.deepcopy(BASE_CONFIG), study="wf")
STUDY["runs"] = {
    "single": {"strategy": "single"},
    "ddp": {"strategy": "data_parallel", "gpus_per_node": 2},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    write_config(work, STUDY)
    snakemake(work)
    return work


def test_study_outputs_are_complete(study):
    res = study / "results" / "wf"
    metrics = pd.read_csv(res / "metrics.csv")
    assert set(metrics["run"]) == {"single", "ddp"}
    for col in ("run", "strategy", "world_size", "nodes", "gpus_per_node", "status", "wall_time_s", "tokens_per_s",
                "peak_mem_gib", "final_val_loss", "time_reduction_x", "throughput_increase_x", "memory_reduction_x"):
        assert col in metrics.columns, col
    assert (metrics["status"] == "ok").all() and (metrics["tokens_per_s"] > 0).all()
    steps = pd.read_csv(res / "steps.csv")
    assert {"run", "step", "loss", "tokens", "elapsed_s"} <= set(steps.columns)
    assert len(steps) == 2 * STUDY["train"]["steps"] and not steps.duplicated(["run", "step"]).any()
    for name in ("throughput", "memory", "loss_vs_time", "loss_vs_tokens", "memory_breakdown",
                 "resources_over_time"):
        for ext in ("png", "svg"):
            assert (res / "figures" / f"{name}.{ext}").stat().st_size > 1000
    html = (study / "report" / "wf" / "report.html").read_text()
    assert "time_reduction_x" in html and "data:image/png;base64," in html and "git_commit" in html
    assert "not calibrated for CPU" in html and not (res / "plan.csv").exists()  # no card, no predictions
    summary = json.loads((res / "runs" / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "ok"


def test_second_run_has_nothing_to_do(study):
    assert planned_jobs(study) == {}


def test_changing_one_run_reruns_only_that_run(study):
    cfg = copy.deepcopy(STUDY)
    cfg["runs"]["ddp"]["micro_batches"] = 2
    write_config(study, cfg)
    try:
        assert planned_jobs(study) == {"train": 1, "aggregate": 1, "figures": 1, "html_report": 1, "all": 1}
    finally:
        write_config(study, STUDY)


def test_changing_lr_reruns_every_training_job_and_no_data_job(study):
    cfg = copy.deepcopy(STUDY)
    cfg["train"]["lr"] = 0.002
    write_config(study, cfg)
    try:
        jobs = planned_jobs(study)
        assert jobs.get("train") == 2
        assert not {"corpus", "tokenizer", "tokenize"} & set(jobs)
    finally:
        write_config(study, STUDY)


def test_changing_data_reruns_everything_downstream(study):
    cfg = copy.deepcopy(STUDY)
    cfg["data"]["synthetic"]["documents"] = 301
    write_config(study, cfg)
    try:
        jobs = planned_jobs(study)
        assert jobs.get("corpus") == 1 and jobs.get("tokenize") == 1 and jobs.get("train") == 2
    finally:
        write_config(study, STUDY)


def test_snakemake_report(study):
    out = study / "report" / "wf" / "snakemake-report.html"
    snakemake(study, "--report", str(out))
    assert out.stat().st_size > 10000
