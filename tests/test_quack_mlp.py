"""``train.mlp: quack``: each decoder layer's MLP on quack-kernels' gated GEMMs (llmpar.quack_mlp), and the runs
and hosts that cannot have it refused, naming why, before any process starts.

quack's kernels need a Hopper GPU, so on CPU the MLP calls a stand-in with the contract of ``quack.mlp.mlp_func``
as llmpar calls it (SwiGLU, the gate and up weights stacked gate first: ``concat_layout``): these tests check
llmpar's side, the weights it passes, their order and their casts. That quack's kernels keep the contract is
checked on a GPU (tests/gpu/test_levers_gpu.py: quack's MLP trains as torch's; benchmarks/gpu_probe.py, variant
qmlp16: its errors against fp32 beside torch's)."""


import pytest
import torch
import torch.nn.functional as F
from conftest import assert_config_refused, assert_host_refused, lever_engine, make_config, pretend_host, token_batches

from llmpar import preflight, quack_mlp
from llmpar.config import prepare, run_config
from llmpar.strategies.loss import causal_lm_loss

MODEL = {"size": "tiny", "seq_len": 64}
VOCAB = 512
CALLS = []


def mlp_func_contract(x, weight1, weight2, activation, concat_layout=False, **kwargs):
    """quack.mlp.mlp_func's result for llmpar's call: silu(x gateᵀ) * (x upᵀ), then the down projection."""
    assert activation == "swiglu" and concat_layout and set(kwargs) == {"tuned"}
    CALLS.append((x.dtype, weight1.dtype, weight2.dtype, kwargs["tuned"]))
    gate, up = F.linear(x, weight1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight2)


@pytest.fixture(autouse=True)
def contract(monkeypatch):
    monkeypatch.setattr(quack_mlp, "mlp_function", lambda: mlp_func_contract)
    CALLS.clear()


def engine(mlp: str):
    return lever_engine(MODEL, VOCAB, mlp=mlp)


def batches(n: int) -> list:
    return token_batches(n, VOCAB, MODEL["seq_len"])


def test_quack_mlp_keeps_the_parameters():
    plain, quack = engine("torch").model, engine("quack").model
    assert {type(layer.mlp).__name__ for layer in quack.model.layers} == {"QuackLlamaMLP"}
    a, b = dict(plain.named_parameters()), dict(quack.named_parameters())
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quack_mlp_trains_as_torchs():
    """After the first backward every parameter's gradient, then per-step losses and gradient norms, within fp32
    summation order: a gate/up swap or a wrong weight moves them by far more."""
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
    assert CALLS and all(c[:3] == (torch.float32,) * 3 for c in CALLS)


def test_quack_mlp_takes_the_autocast_dtype():
    """Under autocast the input and every weight reach quack in the autocast dtype (its GEMMs take bf16), cast
    from the fp32 parameters as autocast's linear casts them; the gradients reach the fp32 parameters."""
    model = engine("quack").model
    x = torch.randint(0, VOCAB, (2, MODEL["seq_len"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, x, x)
    loss.backward()
    assert CALLS and all(c[:3] == (torch.bfloat16,) * 3 for c in CALLS)
    mlp = model.model.layers[0].mlp
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in mlp.parameters())


@pytest.mark.parametrize("mlp,tuned", [("quack", False), ("quack-autotuned", True)])
def test_quack_autotuned_asks_quack_for_its_autotuner(mlp, tuned):
    """quack-autotuned is quack's MLP on the tiles quack's autotuner picks (``tuned=True``), quack on its
    default tiles; the products, so the training, are the same."""
    plain, quack = engine("torch"), engine(mlp)
    for batch in batches(2):
        a, b = plain.train_step(batch), quack.train_step(batch)
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    assert CALLS and {c[3] for c in CALLS} == {tuned}


def test_fused_projections_with_quack_fuse_only_the_attentions():
    """fused_projections beside quack's MLP: one GEMM for q/k/v, and the MLP stays quack's, which stacks gate and
    up itself; it trains as torch's separate projections do."""
    plain, both = engine("torch"), lever_engine(MODEL, VOCAB, mlp="quack", fused_projections=True)
    layers = both.model.model.layers
    assert {(type(layer.self_attn).__name__, type(layer.mlp).__name__) for layer in layers} == {
        ("FusedLlamaAttention", "QuackLlamaMLP")}
    for batch in batches(3):
        a, b = plain.train_step(batch), both.train_step(batch)
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    assert CALLS


# -- refused, with the reason, wherever it cannot run

def quack_config(runs=None, **train) -> dict:
    return make_config(runs=runs or {"ddp": {"strategy": "data_parallel", "precision": "bf16"}},
                       train={"mlp": "quack", "device": "cuda", "precision": "bf16", **train})


def test_quack_mlp_is_in_the_run_config():
    """Part of the run spec, so of the run's hash: the workflow trains it again when it changes."""
    assert run_config(prepare(quack_config()), "ddp")["run"]["mlp"] == "quack"
    assert run_config(prepare(make_config()), "single")["run"]["mlp"] == "torch"


@pytest.mark.parametrize("cfg,key,reason", [
    (quack_config(device="cpu"), "train.mlp", "mlp quack runs on CUDA GPUs, and train.device is cpu"),
    (quack_config(device="cpu", mlp="quack-autotuned"), "train.mlp",
     "mlp quack-autotuned runs on CUDA GPUs, and train.device is cpu"),
    (quack_config({"z": {"strategy": "zero", "zero_stage": 2, "gpus_per_node": 2, "mlp": "quack-autotuned"}}),
     "runs.z.mlp", "DeepSpeed's engines"),
    (quack_config({"ddp": {"strategy": "data_parallel", "precision": "fp32"}}), "train.mlp",
     "run(s) ddp train in precision fp32"),
    (make_config({"b": {"strategy": "single", "mlp": "quack"}}, train={"device": "cuda"}), "runs.b.mlp",
     "run(s) b train in precision fp32"),
    (quack_config({"z": {"strategy": "zero", "zero_stage": 3, "gpus_per_node": 2}}), "runs.z.mlp",
     "DeepSpeed's engines"),
    (quack_config({"t": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch"}}), "runs.t.mlp",
     "torch tensor parallelism shards each projection"),
])
def test_quack_mlp_config_that_cannot_have_it_is_refused_naming_why(cfg, key, reason):
    assert_config_refused(cfg, f"'?{key}'?", reason)


@pytest.mark.parametrize("capability,installed,reason", [
    (None, "0.6.5", "mlp quack needs a CUDA GPU, and this host has none"),
    ((8, 0), "0.6.5", "this one is 8.0"),
    ((9, 0), None, "quack-kernels package, which is not installed"),
])
def test_quack_mlp_host_that_cannot_run_it_is_refused_before_any_process(monkeypatch, capability, installed,
                                                                          reason):
    rc = run_config(prepare(quack_config()), "ddp")
    assert_host_refused(monkeypatch, rc, capability, installed, "run ddp: ", reason)
    pretend_host(monkeypatch, (9, 0), "0.6.5")
    preflight.check_kernels(rc)
