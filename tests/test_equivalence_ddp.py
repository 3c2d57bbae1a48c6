"""data_parallel (DDP, 2 processes) trains the same model as single: per-step losses and gradient norms,
the first update and the validation loss within 1e-4 relative. The runs share one launch (``--batch``)."""

import pytest
from conftest import assert_matches_single, make_config, train_batch

from llmpar.shape import MODEL_SIZES

pytestmark = pytest.mark.slow

DDP = {"strategy": "data_parallel", "gpus_per_node": 2}
CONFIGS = {"ddp": make_config({"ddp": DDP}),
           "ddp-accumulating": make_config({"ddp-accumulating": DDP | {"micro_batches": 2}}),
           "ddp-unclipped": make_config({"ddp-unclipped": DDP}, train={"grad_clip": 0.0})}


@pytest.fixture(scope="module")
def runs(tiny_tokens, tmp_path_factory):
    return train_batch(CONFIGS, tiny_tokens, tmp_path_factory.mktemp("ddp"))


def test_ddp_matches_single(runs, baseline):
    summary, steps = runs["ddp"]
    assert summary["world_size"] == 2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)
    # every rank holds the full replica: the model's whole parameter count, not just the same count
    assert [r["local_params"] for r in summary["per_rank"]] == [summary["params_total"]] * 2


def test_ddp_with_gradient_accumulation_matches_single(runs, baseline):
    summary, steps = runs["ddp-accumulating"]
    # observed, not the config read back: two forward and two backward passes per step on every rank
    layers = MODEL_SIZES["tiny"]["num_layers"]  # conftest.BASE_CONFIG's model
    assert [(r["layer_probe"]["forwards"], r["layer_probe"]["passes"]) for r in summary["per_rank"]] == \
        [(2 * layers, "FBFB")] * 2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)


def test_no_gradient_norm_without_clipping(runs):
    """grad_clip 0: nothing clips, so the engine computes no norm, and the rows say so (null)."""
    summary, steps = runs["ddp-unclipped"]
    assert summary["status"] == "ok" and len(steps) == 6
    assert all(r["grad_norm"] is None for r in steps)
