"""PyTorch-native engines train the same model as ``single``: same seed, initial weights, data and
global batch; per-step training losses within 1e-4 relative for all 6 steps (fp32), and the
parameters really are split the way each strategy says.

Engines: tensor_parallel (``parallelize_module``, TP2), pipeline_parallel (``torch.distributed.
pipelining``: GPipe, 1F1B, interleaved 1F1B, m=4; the interleaved run also checkpoints and resumes),
hybrid_parallel PP2 x DP2 over two local "nodes", PP2 x TP2 (3-D layout with dp 1), FSDP2 (reshard
after forward on and off) and FSDP2 x TP (dp 2 x tp 2). Every run's validation loss (eval_loss) is
compared too.

Measured on the 2-core CPU machine: the largest relative step-loss difference of any engine is 1.7e-7
(only the fp32 summation order differs: sharded matmuls, all-reduces, micro-batch accumulation), so
1e-4 holds with three orders of magnitude to spare.
"""

import pytest
from conftest import assert_same_losses, make_config, train_run

from llmpar.config import MODEL_SIZES

pytestmark = pytest.mark.slow

RTOL = 1e-4
DIMS = MODEL_SIZES["tiny"]


def tp_sharded_params() -> int:
    """Elements of the tensor-parallel weights: q, k, v, o, gate, up, down of every layer."""
    h, f, L = DIMS["hidden_size"], DIMS["intermediate_size"], DIMS["num_layers"]
    kv = DIMS["num_kv_heads"] * h // DIMS["num_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * f)


def max_rel(steps, ref_steps) -> float:
    return max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(steps, ref_steps))


def run(tiny_tokens, tmp_path, entry: dict, baseline, **sections):
    """Train ``entry``; its validation loss (the engine's eval_loss) must match single's too."""
    cfg = make_config({"run": entry}, **sections)
    summary, steps, _ = train_run(cfg, "run", tiny_tokens, tmp_path)
    assert summary["status"] == "ok", summary["message"]
    ref = baseline[0]["final_val_loss"]
    assert abs(summary["final_val_loss"] - ref) / ref <= RTOL, (summary["final_val_loss"], ref)
    return summary, steps


# --------------------------------------------------------------------------- tensor parallel


def test_tp_torch_matches_single(tiny_tokens, baseline, tmp_path):
    entry = {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch"}
    summary, steps = run(tiny_tokens, tmp_path, entry, baseline)
    assert summary["world_size"] == 2 and summary["spec"]["dp"] == 1
    print("max rel loss diff", max_rel(steps, baseline[1]))
    assert_same_losses(steps, baseline[1], rtol=RTOL, min_steps=6)
    # replicated on both ranks: embedding, lm_head, every RMSNorm; the projections are halved
    total, sharded = summary["params_total"], tp_sharded_params()
    local = [r["local_params"] for r in summary["per_rank"]]
    print("per-rank params", local, "of", total)
    assert local == [total - sharded + sharded // 2] * 2


# --------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "no-reshard"])
def test_fsdp_matches_single(tiny_tokens, baseline, tmp_path, reshard):
    summary, steps = run(tiny_tokens, tmp_path, {"strategy": "fsdp", "gpus_per_node": 2,
                                                 "reshard_after_forward": reshard}, baseline)
    assert summary["world_size"] == 2 and summary["spec"]["reshard_after_forward"] is reshard
    print("max rel loss diff", max_rel(steps, baseline[1]))
    assert_same_losses(steps, baseline[1], rtol=RTOL, min_steps=6)
    # every parameter sharded on dim 0 over the 2 ranks: each holds half (up to odd row counts)
    total = summary["params_total"]
    local = [r["local_params"] for r in summary["per_rank"]]
    print("per-rank params", local, "of", total)
    assert sum(local) == total
    assert all(abs(n - total / 2) <= 0.01 * total for n in local)


def test_fsdp_x_tp_matches_single(tiny_tokens, baseline, tmp_path):
    summary, steps = run(tiny_tokens, tmp_path, {"strategy": "fsdp", "tp": 2, "gpus_per_node": 4}, baseline)
    assert summary["world_size"] == 4 and summary["spec"]["dp"] == 2 and summary["spec"]["tp"] == 2
    print("max rel loss diff", max_rel(steps, baseline[1]))
    assert_same_losses(steps, baseline[1], rtol=RTOL, min_steps=6)
    # projections sharded over all 4 ranks (tp x dp); embedding, norms, lm_head over dp only
    total, sharded = summary["params_total"], tp_sharded_params()
    local = [r["local_params"] for r in summary["per_rank"]]
    print("per-rank params", local, "of", total)
    assert sum(local) == (total - sharded) * 2 + sharded
    expect = (total - sharded) / 2 + sharded / 4
    assert all(abs(n - expect) <= 0.01 * total for n in local)


# --------------------------------------------------------------------------- pipelines


def assert_stage_split(summary, n_ranks: int):
    """Each pipeline rank holds a strict, non-empty share; the shares add up to the model."""
    total = summary["params_total"]
    local = [r["local_params"] for r in summary["per_rank"]][:n_ranks]
    print("per-rank params", local, "of", total)
    assert all(0 < n < total for n in local)
    assert sum(local) == total


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pp_torch_matches_single(tiny_tokens, baseline, tmp_path, schedule):
    entry = {"strategy": "pipeline_parallel", "stages": 2, "micro_batches": 4, "schedule": schedule,
             "pp_engine": "torch"}
    # the interleaved run also checkpoints at step 3 and is then resumed from it (pipeline checkpoints
    # are this engine's own: each rank saves its stages' parameters under the full model's names)
    resume = schedule == "interleaved_1f1b"
    train = {"checkpoint_every": 3} if resume else {}
    summary, steps = run(tiny_tokens, tmp_path, entry, baseline, train=train)
    assert summary["world_size"] == 2 and summary["spec"]["micro_batches"] == 4
    print("max rel loss diff", max_rel(steps, baseline[1]))
    assert_same_losses(steps, baseline[1], rtol=RTOL, min_steps=6)
    assert_stage_split(summary, 2)
    # each rank's schedule time splits into its compute (the stage calls, timed one by one) and its
    # idle time between them: both positive on every rank, the idle share below 1
    print("bubble measured", summary["bubble_measured"], "theoretical", summary["bubble_theoretical"],
          [r["breakdown"] for r in summary["per_rank"]])
    assert 0 < summary["bubble_measured"] < 1
    assert all(r["breakdown"]["pipeline_idle"] > 0 and r["breakdown"]["forward"] > 0 and r["breakdown"]["backward"] > 0
               for r in summary["per_rank"])
    if resume:
        (tmp_path / "summary.json").unlink()
        cfg = make_config({"run": entry}, train=train)
        summary2, steps2, proc = train_run(cfg, "run", tiny_tokens, tmp_path)
        assert "resumed from checkpoint step_00000003" in proc.stdout
        first = {r["step"]: r["loss"] for r in steps}
        after = {r["step"]: r["loss"] for r in steps2 if r["step"] > 3}
        assert sorted(after) == [4, 5, 6] and all(after[k] == first[k] for k in after), (after, first)
        assert summary2["final_val_loss"] == summary["final_val_loss"]


def test_hybrid_pp2_dp2_two_nodes_matches_single(tiny_tokens, baseline, tmp_path):
    entry = {"strategy": "hybrid_parallel", "stages": 2, "nodes": 2, "gpus_per_node": 2, "schedule": "1f1b",
             "pp_engine": "torch"}
    summary, steps = run(tiny_tokens, tmp_path, entry, baseline)
    spec = summary["spec"]
    assert summary["world_size"] == 4 and spec["dp"] == 2 and spec["stages"] == 2
    assert len({r["node_rank"] for r in summary["per_rank"]}) == 2  # two local torchrun agents
    print("max rel loss diff", max_rel(steps, baseline[1]))
    assert_same_losses(steps, baseline[1], rtol=RTOL, min_steps=6)
    # mesh (pp, dp): ranks 0, 1 hold stage 0 (dp replicas), ranks 2, 3 stage 1
    local = [r["local_params"] for r in sorted(summary["per_rank"], key=lambda r: r["rank"])]
    assert local[0] == local[1] and local[2] == local[3]
    assert_stage_split({"params_total": summary["params_total"],
                        "per_rank": [{"local_params": local[0]}, {"local_params": local[2]}]}, 2)


def test_3d_pp2_tp2_matches_single(tiny_tokens, baseline, tmp_path):
    """hybrid_parallel with tp inside the stages (torch TP in each pipeline stage), 4 processes."""
    entry = {"strategy": "hybrid_parallel", "stages": 2, "tp": 2, "gpus_per_node": 4, "tp_engine": "torch",
             "pp_engine": "torch"}
    summary, steps = run(tiny_tokens, tmp_path, entry, baseline)
    spec = summary["spec"]
    assert summary["world_size"] == 4 and (spec["stages"], spec["tp"], spec["dp"]) == (2, 2, 1)
    print("max rel loss diff", max_rel(steps, baseline[1]))
    assert_same_losses(steps, baseline[1], rtol=RTOL, min_steps=6)
    # mesh (pp, dp, tp): ranks 0, 1 = stage 0's tp pair, ranks 2, 3 = stage 1's; within a stage the
    # projections are halved and embedding / norms / lm_head replicated
    total, sharded = summary["params_total"], tp_sharded_params()
    local = [r["local_params"] for r in sorted(summary["per_rank"], key=lambda r: r["rank"])]
    print("per-rank params", local, "of", total)
    assert local[0] == local[1] and local[2] == local[3]
    assert sum(local) == 2 * total - sharded
    assert all(n < total / 2 for n in local)
