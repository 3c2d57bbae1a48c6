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
    (_duplicate_step, "duplicate \\(run, step\\) rows"),
], ids=["no-summary", "torn-summary", "unknown-status", "missing-key", "failed-missing-message",
        "fewer-steps-than-planned", "steps-file-short", "duplicate-step"])
def test_incomplete_run_is_refused(tmp_path, damage, message):
    write_run(tmp_path, "a")
    damage(write_run(tmp_path, "b"))
    with pytest.raises(IncompleteRun, match=message):
        aggregate(tmp_path / "runs", ["a", "b"], "a", tmp_path / "out", 8)
    assert not (tmp_path / "out").exists()


def test_baseline_must_be_aggregated(tmp_path):
    write_run(tmp_path, "a")
    with pytest.raises(UserError, match="baseline run 'z' is not among the aggregated runs"):
        aggregate(tmp_path / "runs", ["a"], "z", tmp_path / "out", 8)
