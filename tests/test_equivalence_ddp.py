"""data_parallel (DDP, 2 processes) trains the same model as single: per-step losses and gradient norms,
the first update and the validation loss within 1e-4 relative. The runs share one launch (``--batch``) with the
2-process runs of the other modules that register theirs (conftest.layout_fixtures)."""

import pytest
from conftest import assert_matches_single, layout_fixtures, make_config

from llmpar.shape import MODEL_SIZES

pytestmark = pytest.mark.slow

DDP = {"strategy": "data_parallel", "gpus_per_node": 2}
CONFIGS = {"ddp": make_config({"ddp": DDP}),
           "ddp-accumulating": make_config({"ddp-accumulating": DDP | {"micro_batches": 2}}),
           "ddp-unclipped": make_config({"ddp-unclipped": DDP}, train={"grad_clip": 0.0}),
           # buckets of 0.2 MiB: the tiny model's 0.85 MiB of gradients reduce in several
           "ddp-small-buckets": make_config({"ddp-small-buckets": DDP | {"ddp_bucket_mb": 0.2}})}

(w2,) = layout_fixtures(__name__, {"w2": CONFIGS})


def test_ddp_matches_single(w2, baseline):
    summary, steps = w2["ddp"]
    assert summary["world_size"] == 2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)
    # every rank holds the full replica: the model's whole parameter count, not just the same count
    assert [r["local_params"] for r in summary["per_rank"]] == [summary["params_total"]] * 2


def test_ddp_with_small_buckets_matches_single(w2, baseline):
    summary, steps = w2["ddp-small-buckets"]
    assert summary["spec"]["ddp_bucket_mb"] == 0.2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)


def test_ddp_with_gradient_accumulation_matches_single(w2, baseline):
    summary, steps = w2["ddp-accumulating"]
    # observed, not the config read back: two forward and two backward passes per step on every rank
    layers = MODEL_SIZES["tiny"]["num_layers"]  # conftest.BASE_CONFIG's model
    assert [(r["layer_probe"]["forwards"], r["layer_probe"]["passes"]) for r in summary["per_rank"]] == \
        [(2 * layers, "FBFB")] * 2
    assert_matches_single(summary, steps, baseline, rtol=1e-4)


def test_no_gradient_norm_without_clipping(w2):
    """grad_clip 0: nothing clips, so the engine computes no norm, and the rows say so (null)."""
    summary, steps = w2["ddp-unclipped"]
    assert summary["status"] == "ok" and len(steps) == 6
    assert all(r["grad_norm"] is None for r in steps)
