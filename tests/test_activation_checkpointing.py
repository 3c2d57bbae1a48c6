"""Activation checkpointing (``apply_activation_checkpointing``) lowers activation memory on CPU and
leaves the training losses unchanged.

Memory is measured, not estimated: the PyTorch profiler's memory timeline (``profile_memory``) records
every CPU tensor allocation and free, so the live bytes above the model's own parameters can be
summed over time. Two quantities, on a model large enough that the decoder layers dominate
(hidden 128, 4 layers, 128 tokens x 4 sequences):

* bytes still held when the forward pass ends = the activations saved for backward;
* the peak during forward + backward (activations, recomputed activations, gradients, temporaries).
"""

import pytest
import torch
from conftest import assert_same_first_update, assert_same_steps, layout_fixtures, make_config
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from llmpar.model import build_model
from llmpar.shape import MODEL_SIZES
from llmpar.strategies.levers import apply_activation_checkpointing
from llmpar.strategies.loss import causal_lm_loss

MODEL = {"size": "tiny", "seq_len": 128, "hidden_size": 128, "num_layers": 4, "intermediate_size": 352}
VOCAB, BATCH = 300, 4


def live_bytes(prof) -> tuple[int, int]:
    """(peak, final) bytes allocated inside the profiled region and alive, from the memory timeline."""
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak, cur


def measure(mode: str):
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, MODEL["seq_len"]))
    y = torch.randint(0, VOCAB, (BATCH, MODEL["seq_len"]))
    model = build_model(MODEL, VOCAB, seed=0)
    apply_activation_checkpointing(model, mode)
    kwargs = dict(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
    with profile(**kwargs) as fwd:
        loss = causal_lm_loss(model, x, y)
    _, held = live_bytes(fwd)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with profile(**kwargs) as step:
        loss2 = causal_lm_loss(model, x, y)
        loss2.backward()
    peak, _ = live_bytes(step)
    return {"held_after_forward": held, "peak": peak, "loss": loss.item(), "grads": grads}


def test_checkpointing_lowers_activation_memory_same_gradients():
    none, full, sel = measure("none"), measure("full"), measure("selective")
    for name, r in (("none", none), ("full", full), ("selective", sel)):
        print(f"{name}: held after forward {r['held_after_forward'] / 2**20:.2f} MiB, "
              f"peak fwd+bwd {r['peak'] / 2**20:.2f} MiB")
    # full checkpointing keeps only each layer's input; selective (every 2nd layer) is in between
    assert full["held_after_forward"] < 0.5 * none["held_after_forward"]
    assert full["held_after_forward"] < sel["held_after_forward"] < none["held_after_forward"]
    assert full["peak"] < 0.75 * none["peak"]
    assert sel["peak"] < none["peak"]
    # recomputation gives the same loss and gradients
    for r in (full, sel):
        assert r["loss"] == pytest.approx(none["loss"], rel=1e-6)
        for a, b in zip(r["grads"], none["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# trained in the 1-process launch of the modules that register their runs (conftest.layout_fixtures)
(w1,) = layout_fixtures(__name__, {"w1": {"single_ac": make_config({"single_ac": {
    "strategy": "single", "activation_checkpointing": "full"}})}})


@pytest.mark.slow
def test_checkpointing_same_losses_through_the_harness(w1, baseline):
    summary, steps = w1["single_ac"]
    assert summary["status"] == "ok"
    # recomputation observed: every layer's forward runs again in backward (R), the baseline's once
    layers = MODEL_SIZES["tiny"]["num_layers"]
    for run, expect in ((summary, (2 * layers, "FBR")), (baseline[0], (layers, "FB"))):
        probe = run["per_rank"][0]["layer_probe"]
        assert (probe["forwards"], probe["passes"]) == expect, probe
    rel = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(steps, baseline[1]))
    print("max rel loss diff (full AC vs none)", rel)
    assert_same_steps(steps, baseline[1], rtol=1e-5, min_steps=6)
    assert_same_first_update(summary, baseline[0], rtol=1e-5)
