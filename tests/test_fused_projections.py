"""``train.fused_projections``: one GEMM for q/k/v and one for gate/up trains the same model as the separate
projections (same parameters and initial values, losses, gradients), and runs that cannot take it are
refused before any process starts."""


import pytest
import torch
from conftest import lever_engine, make_config, token_batches

from llmpar.config import prepare
from llmpar.errors import ConfigError

MODEL = {"size": "tiny", "seq_len": 64, "num_kv_heads": 2}  # grouped-query attention: k, v narrower than q
VOCAB = 512


def engine(fused: bool):
    return lever_engine(MODEL, VOCAB, fused_projections=fused)


def batches(n: int) -> list:
    return token_batches(n, VOCAB, MODEL["seq_len"])


def test_fused_layers_keep_the_parameters():
    plain, fused = engine(False).model, engine(True).model
    assert type(fused.model.layers[0].self_attn).__name__ == "FusedLlamaAttention"
    assert type(fused.model.layers[0].mlp).__name__ == "FusedLlamaMLP"
    a, b = dict(plain.named_parameters()), dict(fused.named_parameters())
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_projections_train_as_the_separate_ones():
    """Per-step losses and gradient norms within fp32 summation order, and after the first backward every
    parameter's gradient: a q/k/v split in the wrong order or a gate/up swap moves them by far more."""
    plain, fused = engine(False), engine(True)
    first = batches(1)[0]
    for e in (plain, fused):
        for x, y in first:
            from llmpar.strategies.loss import causal_lm_loss

            (causal_lm_loss(e.model, x, y) / 2).backward()
    grads = {n: p.grad for n, p in plain.model.named_parameters()}
    for n, p in fused.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    for e in (plain, fused):
        e.optimizer.zero_grad(set_to_none=True)
    steps = batches(4)
    for mb in steps:
        a, b = float(plain.train_step(mb)), float(fused.train_step(mb))
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
        assert abs(float(plain.grad_norm()) - float(fused.grad_norm())) <= 1e-4 * float(plain.grad_norm())


@pytest.mark.parametrize("run, match", [
    ({"strategy": "zero", "zero_stage": 3, "gpus_per_node": 2, "fused_projections": True},
     "fused_projections: .*DeepSpeed"),
    ({"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch", "gpus_per_node": 2, "fused_projections": True},
     "fused_projections: .*tensor parallelism"),
    ({"strategy": "single", "compile_mode": "max-autotune-no-cudagraphs"}, "compile_mode: .*compile false"),
])
def test_runs_that_cannot_take_a_lever_are_refused(run, match):
    with pytest.raises(ConfigError, match=match):
        prepare(make_config(runs={"lever": run}))


def test_levers_reach_the_run_spec_and_its_hash():
    cfg = prepare(make_config(runs={"fused": {"strategy": "data_parallel", "gpus_per_node": 2,
                                              "fused_projections": True},
                                    "tuned": {"strategy": "single", "compile": True,
                                              "compile_mode": "max-autotune-no-cudagraphs"}}))
    from llmpar.config import run_config

    fused, tuned, single = (run_config(cfg, n)["run"] for n in ("fused", "tuned", "single"))
    assert fused["fused_projections"] and not single["fused_projections"]
    assert tuned["compile_mode"] == "max-autotune-no-cudagraphs" and single["compile_mode"] == "default"


def test_under_autocast_the_weights_are_joined_in_bf16(monkeypatch):
    """Under bf16 autocast the joined q/k/v and gate/up weights reach the GEMM in bf16 (each cast before the
    concatenation, not the fp32 concatenation cast after), and the layer still trains as the separate
    projections do within bf16 rounding."""
    plain, fused = engine(False), engine(True)
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append((weight.shape[0], weight.dtype))
        return linear(x, weight, bias)

    x, y = batches(1)[0][0]
    from llmpar.strategies.loss import causal_lm_loss

    losses = {}
    for name, e in (("plain", plain), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "fused":
                monkeypatch.setattr(torch.nn.functional, "linear", spy)
            losses[name] = causal_lm_loss(e.model, x, y)
            monkeypatch.undo()
        losses[name].backward()
    attn, mlp = fused.model.model.layers[0].self_attn, fused.model.model.layers[0].mlp
    joined = {attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features,
              2 * mlp.up_proj.out_features}
    dtypes = {dtype for rows, dtype in seen if rows in joined}
    assert dtypes == {torch.bfloat16}, seen
    assert abs(losses["plain"].item() - losses["fused"].item()) <= 1e-2 * losses["plain"].item()
    grads = dict(plain.model.named_parameters())
    for n, p in fused.model.named_parameters():
        assert p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=0.05, atol=2e-3, msg=n)
