"""Aggregation refuses every incomplete or inconsistent run directory with a message naming it, and
writes nothing; a complete study aggregates."""

import json

import pytest

from llmpar.analysis.aggregate import aggregate
from llmpar.errors import UserError
from llmpar.layout import RunSpec
from llmpar.record import IncompleteRun


def write_run(root, name, steps=2, **summary):
    d = root / "runs" / name
    d.mkdir(parents=True)
    s = {"run": name, "status": "ok", "strategy": "single", "world_size": 1, "wall_time_s": 10.0,
         "tokens_per_s": 100.0, "peak_mem_gib": 1.0, "steps_completed": steps, "steps_planned": steps,
         "final_loss": 4.0, "message": "", "tokens_per_s_per_gpu": 100.0,
         "spec": RunSpec(name=name, strategy="single", micro_batch_size=8).to_dict()} | summary
    (d / "summary.json").write_text(json.dumps(s))
    rows = [{"step": i, "loss": 5.0 - i, "tokens": 100 * i, "elapsed_s": float(i)} for i in range(1, steps + 1)]
    (d / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_complete_runs_aggregate(tmp_path):
    write_run(tmp_path, "a")
    write_run(tmp_path, "b", wall_time_s=5.0)
    df = aggregate(tmp_path / "runs", ["a", "b"], "a", tmp_path / "out", 8).set_index("run")
    assert df.loc["b", "time_reduction_x"] == 2.0 and (tmp_path / "out" / "metrics.csv").is_file()


def _no_summary(d):
    (d / "summary.json").unlink()


def _torn_summary(d):
    (d / "summary.json").write_text('{"run": "b", "status": "o')


def _edit(**changes):
    def edit(d):
        s = json.loads((d / "summary.json").read_text())
        for k, v in changes.items():
            if v is None:
                del s[k]
            else:
                s[k] = v
        (d / "summary.json").write_text(json.dumps(s))
    return edit


def _drop_step(d):
    lines = (d / "steps.jsonl").read_text().splitlines(keepends=True)
    (d / "steps.jsonl").write_text("".join(lines[:-1]))


def _torn_steps(d):
    text = (d / "steps.jsonl").read_text()
    (d / "steps.jsonl").write_text(text[: text.index("\n") + 5])  # cut in the second line


def _garbage_summary(d):
    (d / "summary.json").write_bytes(b"\xff\xfe\x00garbage")


def _duplicate_step(d):
    (d / "steps.jsonl").write_text((d / "steps.jsonl").read_text() + json.dumps({"step": 2, "loss": 1.0}) + "\n")
    _edit(steps_completed=3, steps_planned=3)(d)


@pytest.mark.parametrize("damage, message", [
    (_no_summary, "has no summary.json: the run is missing or incomplete"),
    (_torn_summary, "is not valid JSON"),
    (_edit(status="running"), "status 'running' is not one of"),
    (_edit(tokens_per_s=None), "is incomplete: missing tokens_per_s"),
    (_edit(status="oom", message=None), "is incomplete: missing message"),
    (_edit(steps_completed=1), "summary says 1/2 steps but steps.jsonl has 2 rows"),
    (_drop_step, "summary says 2/2 steps but steps.jsonl has 1 rows"),
    (_torn_steps, "runs/b/steps.jsonl of run b is damaged"),
    (_garbage_summary, "runs/b/summary.json is not valid JSON"),
    (_edit(), None),
    (_duplicate_step, "duplicate \\(run, step\\) rows"),
], ids=["no-summary", "torn-summary", "unknown-status", "missing-key", "failed-missing-message",
        "fewer-steps-than-planned", "steps-file-short", "steps-file-torn", "summary-not-text", "intact",
        "duplicate-step"])
def test_incomplete_run_is_refused(tmp_path, damage, message):
    write_run(tmp_path, "a")
    damage(write_run(tmp_path, "b"))
    if message is None:  # the intact control
        aggregate(tmp_path / "runs", ["a", "b"], "a", tmp_path / "out", 8)
        return
    with pytest.raises(IncompleteRun, match=message):
        aggregate(tmp_path / "runs", ["a", "b"], "a", tmp_path / "out", 8)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [_torn_summary, _torn_steps, _drop_step, _garbage_summary, _edit(tokens_per_s=None)],
                         ids=["torn-summary", "torn-steps", "steps-file-short", "summary-not-text", "missing-key"])
def test_a_damaged_record_is_set_aside_so_the_run_is_trained_again(tmp_path, damage):
    """What the workflow does at its start (rules/common.smk): a run whose record cannot be read loses its
    summary (kept as summary.json.damaged), so Snakemake sees the run as not done; intact runs and runs
    without a summary are left alone."""
    from llmpar.record import set_aside_damaged_records

    write_run(tmp_path, "a")
    damage(write_run(tmp_path, "b"))
    (tmp_path / "runs" / "c").mkdir()  # not trained yet
    bad = set_aside_damaged_records(tmp_path / "runs", ["a", "b", "c"])
    assert list(bad) == ["b"] and "runs/b" in bad["b"]
    assert not (tmp_path / "runs" / "b" / "summary.json").exists()
    assert (tmp_path / "runs" / "b" / "summary.json.damaged").is_file()
    assert (tmp_path / "runs" / "a" / "summary.json").is_file()
    assert set_aside_damaged_records(tmp_path / "runs", ["a", "b", "c"]) == {}


def test_baseline_must_be_aggregated(tmp_path):
    write_run(tmp_path, "a")
    with pytest.raises(UserError, match="baseline run 'z' is not among the aggregated runs"):
        aggregate(tmp_path / "runs", ["a"], "z", tmp_path / "out", 8)
