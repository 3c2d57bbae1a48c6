"""data_parallel (DDP, 2 processes) trains the same model as single: per-step losses and gradient norms,
the first update and the validation loss within 1e-4 relative. Both runs share one launch (``--batch``)."""

import pytest
from conftest import assert_matches_single, make_config, train_batch

pytestmark = pytest.mark.slow

RUNS = {"ddp": {"strategy": "data_parallel", "gpus_per_node": 2},
        "ddp-accumulating": {"strategy": "data_parallel", "gpus_per_node": 2, "micro_batches": 2}}


@pytest.fixture(scope="module")
def runs(tiny_tokens, tmp_path_factory):
    return train_batch({name: make_config({name: run}) for name, run in RUNS.items()}, tiny_tokens,
                       tmp_path_factory.mktemp("ddp"))


def test_ddp_matches_single(runs, baseline):
    summary, steps = runs["ddp"]
    assert summary["world_size"] == 2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)
    # every rank holds the full replica
    assert all(r["local_params"] == summary["per_rank"][0]["local_params"] for r in summary["per_rank"])


def test_ddp_with_gradient_accumulation_matches_single(runs, baseline):
    summary, steps = runs["ddp-accumulating"]
    assert summary["spec"]["micro_batch_size"] == 2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)
