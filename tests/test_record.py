"""The run record: every field defined, the reader refusing what is not a record of this version, the
failure record complete enough to aggregate."""

import json

import pytest

from llmpar.io import read_json
from llmpar.layout import RunSpec
from llmpar.metrics.definitions import DEFINITIONS
from llmpar.record import IncompleteRun, RunRecord, read_run, write_run


def test_every_field_has_a_definition():
    """A metric is defined in DEFINITIONS under its own name or the entry its ``defined_by`` names; any other
    field carries its own ``doc``."""
    undefined = []
    for f in RunRecord.fields():
        by = f.metadata.get("defined_by")
        if by is not None:
            ok = by in DEFINITIONS
        else:
            ok = f.name in DEFINITIONS or bool(f.metadata.get("doc"))
        if not ok:
            undefined.append(f.name)
    assert not undefined, f"fields without a definition: {undefined}"


def test_the_committed_summaries_read_as_records(tmp_path):
    """Every committed run's summary is a record of this version (no unknown field, every required one)."""
    from llmpar.paths import REPO_ROOT

    paths = sorted((REPO_ROOT / "results").glob("*/runs/*/summary.json"))
    assert paths
    for path in paths:
        RunRecord.from_json(read_json(path), str(path))


def _record(rc_steps=3, status="ok", **fields) -> RunRecord:
    spec = RunSpec(name="r", strategy="single")
    return RunRecord(run="r", status=status, spec=spec.to_dict(), strategy="single", world_size=1, nodes=1,
                     gpus_per_node=1, steps_completed=rc_steps, steps_planned=rc_steps, wall_time_s=1.0,
                     tokens_per_s=10.0, peak_mem_gib=0.1, **fields)


def test_write_then_read(tmp_path):
    steps = [{"step": i, "loss": 1.0} for i in (1, 2, 3)]
    write_run(tmp_path, _record(), steps, [], [])
    back = read_run(tmp_path)
    assert back["record"] == _record() and back["steps"] == steps


@pytest.mark.parametrize("edit, message", [
    (lambda s: s | {"speed": 1.0}, "unknown fields \\['speed'\\]"),
    (lambda s: s | {"status": "running"}, "status 'running' is not one of"),
    (lambda s: {k: v for k, v in s.items() if k != "peak_mem_gib"}, "missing peak_mem_gib"),
])
def test_reader_refuses_what_is_not_a_record(tmp_path, edit, message):
    write_run(tmp_path, _record(), [{"step": i} for i in (1, 2, 3)], [], [])
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(IncompleteRun, match=message):
        read_run(tmp_path)


def test_a_damaged_steps_file_is_named(tmp_path):
    """A steps.jsonl torn mid-line: the error names the file and the run, not a bare JSONDecodeError."""
    write_run(tmp_path / "ddp", _record(), [{"step": i} for i in (1, 2, 3)], [], [])
    steps = tmp_path / "ddp" / "steps.jsonl"
    steps.write_text(steps.read_text()[:-7])
    with pytest.raises(IncompleteRun, match=r"steps.jsonl of run ddp is damaged"):
        read_run(tmp_path / "ddp")


def test_failure_record_aggregates():
    rc = {"run": RunSpec(name="big", strategy="data_parallel", gpus_per_node=2, dp=2).to_dict(),
          "train": {"steps": 5}}
    rec = RunRecord.failure(rc, "invalid", "does not fit", [])
    data = rec.to_json()
    assert RunRecord.from_json(data) == rec
    assert (rec.status, rec.world_size, rec.steps_completed, rec.steps_planned) == ("invalid", 2, 0, 5)
