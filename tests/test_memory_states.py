"""Bytes of parameters + gradients + optimizer state each rank holds, measured from the tensors each
engine keeps, under DDP, ZeRO-1/2/3 and FSDP2: the expected ordering, and the ≈ 1/world share of the
fully sharded ones (compared with the same strategy on one process). The runs of one process layout
share one launch (``--batch``) with those of the other modules that register theirs
(conftest.layout_fixtures)."""

import copy

import pytest
from conftest import BASE_CONFIG, layout_fixtures

pytestmark = pytest.mark.slow

RUNS = {
    "ddp": {"strategy": "data_parallel", "gpus_per_node": 2},
    "zero1": {"strategy": "zero", "zero_stage": 1, "gpus_per_node": 2},
    "zero2": {"strategy": "zero", "zero_stage": 2, "gpus_per_node": 2},
    "zero3": {"strategy": "zero", "zero_stage": 3, "gpus_per_node": 2},
    "zero3-w1": {"strategy": "zero", "zero_stage": 3, "gpus_per_node": 1},
    "fsdp": {"strategy": "fsdp", "gpus_per_node": 2},
    "fsdp-w1": {"strategy": "fsdp", "gpus_per_node": 1},
}
CONFIG = copy.deepcopy(BASE_CONFIG)
CONFIG["train"].update(steps=2, eval_every=2)
# two micro-batches per step: ZeRO-1 then holds full gradients between them, ZeRO-2 only its partition
CONFIG["runs"].update({name: run | {"micro_batches": 2} for name, run in RUNS.items()})

w2, w1 = layout_fixtures(__name__, {f"w{procs}": {name: CONFIG for name, run in RUNS.items()
                                                  if run["gpus_per_node"] == procs} for procs in (2, 1)})


@pytest.fixture(scope="module")
def states(w2, w1):
    out = {}
    for name, (summary, _) in {**w2, **w1}.items():
        assert summary["status"] == "ok", (name, summary["message"])
        per_rank = [r["state_bytes"] for r in summary["per_rank"]]
        out[name] = {
            "total": max(s["params"] + s["grads"] + s["optimizer"] for s in per_rank),
            **{k: max(s[k] for s in per_rank) for k in ("params", "grads", "optimizer")},
        }
        print(name, out[name])
    assert sorted(out) == sorted(RUNS)
    return out


def test_ordering_ddp_zero1_zero2_zero3(states):
    s = states
    assert s["ddp"]["total"] > s["zero1"]["total"] > s["zero2"]["total"] > s["zero3"]["total"]
    # what each stage shards: optimizer state (1), then gradients (2), then parameters (3)
    assert s["zero1"]["optimizer"] < s["ddp"]["optimizer"]
    assert s["zero2"]["grads"] < s["zero1"]["grads"]
    assert s["zero3"]["params"] < s["zero2"]["params"]
    assert s["fsdp"]["total"] < s["ddp"]["total"]


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_fully_sharded_hold_about_one_over_world(states, name):
    share = states[name]["total"] / states[f"{name}-w1"]["total"]
    assert share == pytest.approx(0.5, abs=0.05), share
