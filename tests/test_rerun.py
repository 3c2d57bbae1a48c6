"""The documented way to train a committed preset again (docs/cluster.md, RESULTS.md): a dry run of it
schedules every training job of the preset, although the committed summaries are up to date."""

import subprocess

import pytest
from workflow_util import REPO, SNAKEMAKE, env, job_stats

from llmpar.config import load_yaml, prepare

PRESET = "configs/gpu2-1b.yaml"


def rerun_command(preset: str, study: str) -> list[str]:
    """docs/cluster.md's rerun: the preset with recorded=False, into a study name of its own."""
    return [SNAKEMAKE, "--cores", "1", "--configfile", preset, "--config", "recorded=False", f"study={study}"]


def test_cluster_doc_names_the_rerun_command():
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert "--config recorded=False study=" in doc


@pytest.mark.parametrize("preset", [PRESET])
def test_rerun_into_a_new_study_schedules_every_training_job(preset):
    runs = prepare(load_yaml(REPO / preset))["runs"]
    proc = subprocess.run([*rerun_command(preset, "h100x2-1b-rerun"), "--dry-run", "--nolock"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = job_stats(out)
    assert jobs.get("train") == len(runs) == 16, jobs
    assert {"corpus", "tokenizer", "tokenize"} <= set(jobs)  # the new study's own token shards
    assert "results/h100x2-1b-rerun/runs/hybrid-deepspeed/summary.json" in out
