"""Which per-run levers the plan has checked against recorded runs, and the reason it gives for the others
instead of an unbounded number."""

import pytest

from llmpar.config import load_yaml, prepare, run_config
from llmpar.paths import REPO_ROOT
from llmpar.plan import predict
from llmpar.plan.calibration import format_predictions


def _rc(**lever):
    raw = load_yaml(REPO_ROOT / "configs" / "gpu1-1b-levers.yaml")
    raw["runs"] = {"r": {"strategy": "single", "micro_batch_size": 16, **lever}}
    raw["baseline"] = "r"
    return run_config(prepare(raw), "r")


@pytest.mark.parametrize("lever", [{}, {"activation_checkpointing": "full"}, {"compile": False}])
def test_checked_levers_are_modelled(lever):
    rc = _rc(**lever)
    assert predict(rc["model"], 32000, rc["run"], rc["train"], "h200")["unmodelled"] == []


@pytest.mark.parametrize("lever, why", [
    ({"activation_checkpointing": "selective"}, "selective activation checkpointing"),
    ({"precision": "fp32"}, "precision fp32"),
    ({"precision": "bf16-pure"}, "precision bf16-pure"),
])
def test_unchecked_levers_say_why(lever, why):
    rc = _rc(**lever)
    reasons = predict(rc["model"], 32000, rc["run"], rc["train"], "h200")["unmodelled"]
    assert len(reasons) == 1 and reasons[0].startswith(why)


def test_the_plan_script_prints_the_reason(tmp_path):
    raw = load_yaml(REPO_ROOT / "configs" / "gpu1-1b-levers.yaml")
    raw["runs"]["sel"] = {"strategy": "single", "micro_batch_size": 16, "activation_checkpointing": "selective"}
    text = format_predictions(prepare(raw), "h200", ["sel", "ac-full-mb16"])
    lines = text.splitlines()
    assert "not modelled: selective activation checkpointing" in lines[1] and "not modelled" not in lines[2]
