"""Runs that differ in global batch: resolved per run (its own batch, or batch per replica for weak scaling),
with the learning rate, steps and evaluation spacing a study derives from it; the validation set the same for
every run; a run that stops at its target; and the batch-size sweep end to end on the CPU."""

import json
import math

import pytest
from conftest import make_config
from launches import job, run_batch

from llmpar.config import prepare, run_config
from llmpar.errors import ConfigError
from llmpar.layout import RunSpec


def test_a_run_sets_its_own_global_batch_and_a_list_sweeps_it():
    cfg = prepare(make_config({"gb": {"strategy": "single", "global_batch": [4, 16]},
                               "ddp": {"strategy": "data_parallel", "gpus_per_node": 2, "global_batch": 12}}))
    runs = cfg["runs"]
    assert {n: RunSpec.from_dict(r).global_batch for n, r in runs.items()} == {"single": 8, "gb-gb4": 4,
                                                                              "gb-gb16": 16, "ddp": 12}
    assert runs["ddp"]["micro_batch_size"] == 6 and run_config(cfg, "ddp")["train"]["global_batch"] == 12
    # the study's references stay the study's: validation batch and Pollux's M0
    for name in runs:
        train = run_config(cfg, name)["train"]
        assert train["eval_batch"] == 8 and train["pollux_reference_batch"] == 8


def test_batch_per_replica_scales_the_batch_with_the_replicas():
    cfg = prepare(make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": [1, 2, 4]}},
                              train={"batch_per_replica": 4}))
    assert {n: RunSpec.from_dict(r).global_batch for n, r in cfg["runs"].items()} == {
        "single": 4, "ddp-g1": 4, "ddp-g2": 8, "ddp-g4": 16}


def test_learning_rate_steps_and_evaluation_follow_the_batch():
    """sqrt scaling against the reference batch; the token budget in steps (rounded up); the evaluation every
    so many tokens (at least every step)."""
    cfg = prepare(make_config({"gb": {"strategy": "single", "global_batch": [2, 8, 32]}},
                              train={"lr": 0.004, "lr_scaling": {"rule": "sqrt"}, "train_tokens": 10_000,
                                     "eval_every_tokens": 1024}))
    seq = cfg["model"]["seq_len"]
    for name, gb in (("gb-gb2", 2), ("gb-gb8", 8), ("gb-gb32", 32)):
        train = run_config(cfg, name)["train"]
        assert train["lr"] == pytest.approx(0.004 * math.sqrt(gb / 8))
        assert train["steps"] == math.ceil(10_000 / (gb * seq))
        assert train["eval_every"] == max(1, round(1024 / (gb * seq)))
    linear = prepare(make_config({"gb": {"strategy": "single", "global_batch": 32}},
                                 train={"lr": 0.004, "lr_scaling": {"rule": "linear", "reference_batch": 16}}))
    assert run_config(linear, "gb")["train"]["lr"] == pytest.approx(0.008)


@pytest.mark.parametrize("run, match", [
    ({"strategy": "data_parallel", "gpus_per_node": 3, "global_batch": 9},
     "train.eval_batch 8 is not divisible by dp 3"),
    ({"strategy": "pipeline_parallel", "stages": 2, "global_batch": 16}, "must equal train.eval_batch"),
    ({"strategy": "data_parallel", "gpus_per_node": 2, "global_batch": 7}, "global batch 7 is not divisible by dp 2"),
])
def test_a_batch_the_layout_cannot_take_is_refused(run, match):
    with pytest.raises(ConfigError, match=match):
        prepare(make_config({"bad": run}))


def test_a_swept_batch_the_layout_cannot_take_is_a_result_row(tmp_path):
    """A sweep's point that its layout cannot train is no configuration error: the other points train, and this
    one is a record (status invalid, the reason, the batch it asked for) and a row of metrics.csv, written by the
    workflow's refuse rule without training."""
    from workflow_util import planned_jobs, write_config

    from llmpar import cli
    from llmpar.analysis.aggregate import metrics_row
    from llmpar.record import read_run

    raw = make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": 2, "global_batch": [7, 8]}})
    cfg = prepare(raw)
    assert list(cfg["runs"]) == ["single", "ddp-gb8"] and list(cfg["refused"]) == ["ddp-gb7"]
    out = tmp_path / "runs" / "ddp-gb7"
    assert cli.main(["refuse", "--record", json.dumps(cfg["refused"]["ddp-gb7"]), "--out", str(out)]) == 0
    row = metrics_row(read_run(out)["record"], reference_batch=8)
    assert row["status"] == "invalid" and "global batch 7 is not divisible by dp 2" in row["message"]
    assert (row["run"], row["global_batch"], row["world_size"], row["tokens_per_s"]) == ("ddp-gb7", 7, 2, None)
    write_config(tmp_path, raw)
    jobs = planned_jobs(tmp_path)
    assert (jobs.get("train"), jobs.get("refuse")) == (2, 1), jobs


@pytest.mark.slow
def test_sweep_on_the_cpu(tiny_tokens, tmp_path):
    """Three batch sizes of one model trained in one launch until the validation loss reaches a target, then
    the sweep's analysis: every run stopped at its first validation at or below the target, recorded its batch
    and the noise scale's small batch, and the sweep's table and fit come out."""
    from llmpar.analysis.batch_sweep import write_tables
    from llmpar.record import read_run

    target = 4.6
    raw = make_config({"gb": {"strategy": "single", "global_batch": [2, 4, 8], "micro_batch_size": 1}},
                      train={"steps": 200, "lr": 0.003, "lr_scaling": {"rule": "sqrt"}, "target_loss": target,
                             "stop_at_target": True, "eval_every_tokens": 256, "eval_batches": 1,
                             "warmup_steps": 2, "log_every": 5})
    raw["runs"].pop("single")
    raw["baseline"] = "gb-gb8"
    cfg = prepare(raw)
    names = list(cfg["runs"])
    run_batch([job(raw, n, tmp_path / "runs" / n) for n in names], tiny_tokens, tmp_path, "sweep", timeout=600)
    for n in names:
        run = read_run(tmp_path / "runs" / n)
        rec, evals = run["record"], run["evals"]
        assert rec.status == "ok" and rec.stopped_at_target and rec.steps_completed < rec.steps_planned
        assert evals[-1]["val_loss"] <= target < min(e["val_loss"] for e in evals[:-1])
        assert rec.steps_completed == evals[-1]["step"] and rec.global_batch == RunSpec.from_dict(rec.spec).global_batch
        assert rec.noise_scale_small_batch == 1  # one sequence per micro-batch
    summary = write_tables(cfg, tmp_path / "runs", tmp_path / "sweep.csv", tmp_path / "fit.csv", tmp_path / "fig")
    assert "3 of 3 batches reached it" in summary
    table = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(table) == 4 and (tmp_path / "fig" / "batch_sweep.png").is_file()
    fit = (tmp_path / "fit.csv").read_text().splitlines()
    assert fit[0].startswith("target_loss") and fit[1].startswith(str(target))
    print(summary, json.dumps(table))
