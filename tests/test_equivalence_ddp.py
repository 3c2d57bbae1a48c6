"""data_parallel (DDP, 2 processes) trains the same model as single: losses within 1e-4 relative."""

import pytest
from conftest import assert_same_losses, make_config, train_run

pytestmark = pytest.mark.slow


def test_ddp_matches_single(tiny_tokens, baseline, tmp_path):
    cfg = make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": 2}})
    summary, steps, _ = train_run(cfg, "ddp", tiny_tokens, tmp_path)
    assert summary["status"] == "ok" and summary["world_size"] == 2
    assert_same_losses(steps, baseline[1], rtol=1e-4, min_steps=6)
    # every rank holds the full replica
    assert all(r["local_params"] == summary["per_rank"][0]["local_params"] for r in summary["per_rank"])


def test_ddp_with_gradient_accumulation_matches_single(tiny_tokens, baseline, tmp_path):
    cfg = make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": 2, "micro_batches": 2}})
    summary, steps, _ = train_run(cfg, "ddp", tiny_tokens, tmp_path)
    assert summary["spec"]["micro_batch_size"] == 2
    assert_same_losses(steps, baseline[1], rtol=1e-4, min_steps=6)
