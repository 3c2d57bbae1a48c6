"""``train.norm: quack``: the decoder's RMSNorms on quack-kernels' kernel, each fused with the residual add before it
(llmpar.quack_norm), and the runs and hosts that cannot have it refused, naming why, before any process starts.

quack's kernels need a Hopper GPU, so on CPU the norms call a stand-in with the contract of ``quack.rmsnorm.rmsnorm``
(quack's ``rmsnorm_ref``: the sum formed in fp32 and rounded to the residual's dtype, the norm of the fp32 sum scaled
by the weight in fp32): these tests check llmpar's side, which tensors it sums, which weight and epsilon each norm
takes, the pair the layers hand each other and the dtypes. That quack's kernels keep the contract is checked on a
GPU (tests/gpu/test_levers_gpu.py: quack's norms train as torch's)."""

import pytest
import torch
from conftest import assert_config_refused, assert_host_refused, lever_engine, make_config, pretend_host, token_batches

from llmpar import preflight, quack_norm
from llmpar.config import prepare, run_config
from llmpar.strategies.loss import causal_lm_loss

MODEL = {"size": "tiny", "seq_len": 64}
VOCAB = 512
CALLS = []


def rmsnorm_contract(x, weight=None, bias=None, residual=None, out_dtype=None, residual_dtype=None, eps=1e-6,
                     prenorm=False, weight_offset=0.0):
    """quack.rmsnorm.rmsnorm's result for llmpar's calls (quack/rmsnorm.py, rmsnorm_ref)."""
    assert bias is None and residual_dtype is None and weight_offset == 0.0
    CALLS.append({"residual": residual is not None, "prenorm": prenorm, "eps": eps, "x": x.dtype,
                  "out": out_dtype, "weight": weight})
    total = x.float() if residual is None else x.float() + residual.float()
    out = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(out_dtype or x.dtype)
    if residual is None or not prenorm:
        return out
    return out, total.to(residual.dtype)


@pytest.fixture(autouse=True)
def contract(monkeypatch):
    monkeypatch.setattr(quack_norm, "rmsnorm_function", lambda: rmsnorm_contract)
    CALLS.clear()


def engine(norm: str, **levers):
    return lever_engine(MODEL, VOCAB, norm=norm, **levers)


def batches(n: int) -> list:
    return token_batches(n, VOCAB, MODEL["seq_len"])


def test_quack_norm_keeps_the_parameters():
    plain, quack = engine("torch").model, engine("quack").model
    assert {type(layer).__name__ for layer in quack.model.layers} == {"QuackNormDecoderLayer"}
    assert type(quack.model.norm).__name__ == "QuackFinalNorm"
    a, b = dict(plain.named_parameters()), dict(quack.named_parameters())
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quack_norm_trains_as_torchs():
    """After the first backward every parameter's gradient, then per-step losses, within fp32 summation order: a
    norm with another layer's weight, a residual left out of a sum or the final norm on the MLP output alone move
    them by far more."""
    plain, quack = engine("torch"), engine("quack")
    for e in (plain, quack):
        for x, y in batches(1)[0]:
            (causal_lm_loss(e.model, x, y) / 2).backward()
    grads = {n: p.grad for n, p in plain.model.named_parameters()}
    for n, p in quack.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
        p.grad = None
    for p in plain.model.parameters():
        p.grad = None
    for batch in batches(4):
        a, b = plain.train_step(batch), quack.train_step(batch)
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)


def test_each_norm_takes_its_own_weight_and_the_stream_after_the_first():
    """One forward: the first layer's input norm normalises the embedding alone, every other norm a branch output
    plus the stream (the final norm too, without returning the sum), each with its own module's weight and
    LlamaRMSNorm's epsilon."""
    model = engine("quack").model
    x = torch.randint(0, VOCAB, (2, MODEL["seq_len"]))
    with torch.no_grad():
        model(input_ids=x)
    norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    assert [c["weight"] is n.weight for c, n in zip(CALLS, norms)] == [True] * len(norms) == [True] * len(CALLS)
    assert [c["residual"] for c in CALLS] == [False] + [True] * (len(norms) - 1)
    assert all(c["prenorm"] for c in CALLS[1:-1]) and not CALLS[-1]["prenorm"]  # the last sum is not read again
    assert all(c["eps"] == 1e-5 for c in CALLS)


@pytest.mark.parametrize("precision,stream", [("bf16", torch.float32), ("bf16-residual", torch.bfloat16)])
def test_quack_norm_under_autocast_writes_the_autocast_dtype(precision, stream):
    """Under autocast each norm's output is bf16, the dtype the projections read; the stream keeps its dtype (fp32
    in bf16, bf16 in bf16-residual); the gradients reach the fp32 norm weights; the losses are bf16 autocast's."""
    plain, quack = engine("torch", precision=precision), engine("quack", precision=precision)
    for batch in batches(3):
        a, b = plain.train_step(batch), quack.train_step(batch)
        assert abs(a - b) <= 2e-3 * abs(a), (a, b)
    assert CALLS and {c["out"] for c in CALLS} == {torch.bfloat16}
    assert CALLS[0]["x"] == stream  # the embedding's output, the first layer's stream
    norm = quack.model.model.layers[0].input_layernorm.weight
    assert norm.dtype == torch.float32


def test_quack_norm_with_bf16_master_takes_the_bf16_weights():
    """bf16-master: the norms read the model's bf16 weights, and train as bf16-master's torch norms do."""
    plain, quack = engine("torch", precision="bf16-master"), engine("quack", precision="bf16-master")
    for batch in batches(3):
        a, b = plain.train_step(batch), quack.train_step(batch)
        assert abs(a - b) <= 2e-3 * abs(a), (a, b)
    assert CALLS and {c["weight"].dtype for c in CALLS} == {torch.bfloat16}


# -- refused, with the reason, wherever it cannot run

def norm_config(runs=None, **train) -> dict:
    return make_config(runs=runs or {"single": {"strategy": "single", "precision": "bf16"}},
                       train={"norm": "quack", "device": "cuda", "precision": "bf16", **train})


def test_quack_norm_is_in_the_run_config():
    """Part of the run spec, so of the run's hash: the workflow trains it again when it changes."""
    assert run_config(prepare(norm_config()), "single")["run"]["norm"] == "quack"
    assert run_config(prepare(make_config()), "single")["run"]["norm"] == "torch"


@pytest.mark.parametrize("cfg,key,reason", [
    (norm_config(device="cpu"), "train.norm", "norm quack runs on CUDA GPUs, and train.device is cpu"),
    (norm_config({"single": {"strategy": "single", "precision": "fp32"}}), "train.norm",
     "run(s) single train in precision fp32 (use bf16, or norm torch)"),
    (make_config({"b": {"strategy": "single", "norm": "quack"}}, train={"device": "cuda"}), "runs.b.norm",
     "run(s) b train in precision fp32"),
    (norm_config({"ddp": {"strategy": "data_parallel", "precision": "bf16"}}), "runs.ddp.norm",
     "implemented for strategy single, not data_parallel"),
])
def test_quack_norm_config_that_cannot_have_it_is_refused_naming_why(cfg, key, reason):
    assert_config_refused(cfg, f"'?{key}'?", reason)


@pytest.mark.parametrize("capability,installed,reason", [
    (None, "0.6.5", "norm quack needs a CUDA GPU, and this host has none"),
    ((8, 0), "0.6.5", "this one is 8.0"),
    ((9, 0), None, "quack-kernels package, which is not installed"),
])
def test_quack_norm_host_that_cannot_run_it_is_refused_before_any_process(monkeypatch, capability, installed,
                                                                          reason):
    rc = run_config(prepare(norm_config()), "single")
    assert_host_refused(monkeypatch, rc, capability, installed, "run single: ", reason)
    pretend_host(monkeypatch, (9, 0), "0.6.5")
    preflight.check_kernels(rc)
