"""``train.attention: fa4-op``'s glue on the CPU: FlashAttention-4's kernels replaced by plain attention (the
CUDA kernels themselves run in tests/gpu/test_levers_gpu.py), the custom op, its fake implementation and its
autograd wiring must give a model that trains as SDPA's does, and a compiled decoder layer of one graph that
does too."""

from __future__ import annotations

import pytest
import torch

from llmpar import fa4_op
from llmpar.model import build_model

MODEL = {"size": "tiny", "seq_len": 32}
VOCAB = 300


def attention(q, k, v, scale):
    """Causal attention of (batch, seq, heads, head dim) tensors, key/value heads repeated: output, lse."""
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale
    s = q.shape[1]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhst,bthd->bshd", (scores - lse[..., None]).exp(), v.float())
    return out.to(q.dtype), lse


def forward(q, k, v, softmax_scale, causal, return_lse):
    """FA4's forward entry point, as plain attention (its output in another layout than the fake's)."""
    assert causal and return_lse
    out, lse = attention(q, k, v, softmax_scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse, None, None, None


def backward(q, k, v, out, dout, lse, scale, causal):
    """FA4's backward entry point: the gradients of softmax attention written out (a kernel runs below autograd)."""
    rep = q.shape[2] // k.shape[2]
    kr, vr = (t.repeat_interleave(rep, dim=2).float() for t in (k, v))
    s = q.shape[1]
    scores = torch.einsum("bshd,bthd->bhst", q.float(), kr) * scale
    p = (scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")) - lse[..., None]).exp()
    do = dout.float()
    dv = torch.einsum("bhst,bshd->bthd", p, do)
    dp = torch.einsum("bshd,bthd->bhst", do, vr)
    ds = p * (dp - (do * out.float()).sum(-1).transpose(1, 2)[..., None])
    dq = torch.einsum("bhst,bthd->bshd", ds, kr) * scale
    dk = torch.einsum("bhst,bshd->bthd", ds, q.float()) * scale
    fold = lambda t: t.unflatten(2, (k.shape[2], rep)).sum(3)  # noqa: E731 (sum over a key/value head's queries)
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.fixture
def cpu_kernels(monkeypatch):
    monkeypatch.setattr(fa4_op, "flash_kernels", lambda: (forward, backward))


def loss_and_grads(attention_impl: str):
    model = build_model(MODEL, VOCAB, seed=3, attention=attention_impl)
    x = torch.randint(0, VOCAB, (2, MODEL["seq_len"] + 1), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_fa4_op_trains_as_sdpa_does(cpu_kernels):
    ref_loss, ref_grads = loss_and_grads("default")
    loss, grads = loss_and_grads("fa4-op")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def layer_run(attention_impl: str, compiled: bool):
    """Decoder layer 0's output and gradients (input and parameters) on one batch of hidden states."""
    model = build_model(MODEL, VOCAB, seed=3, attention=attention_impl)
    layer = model.model.layers[0]
    hidden = torch.randn(2, MODEL["seq_len"], model.config.hidden_size, generator=torch.Generator().manual_seed(2),
                         requires_grad=True)
    pos = torch.arange(MODEL["seq_len"])[None]
    kwargs = {"attention_mask": None, "position_ids": pos,
              "position_embeddings": model.model.rotary_emb(hidden, position_ids=pos)}
    # fullgraph: a graph break raises. aot_eager traces the op's fake and autograd formula as inductor would, without
    # generating code (and without inductor's caches, whose keys miss the op's Python autograd formula)
    run = torch.compile(layer, fullgraph=True, backend="aot_eager") if compiled else layer
    out = run(hidden, **kwargs)
    out.backward(torch.ones_like(out))
    return out.detach(), hidden.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_fa4_op_compiled_layer_is_one_graph_that_trains_as_sdpa_does(cpu_kernels):
    ref_out, ref_dx, ref_grads = layer_run("default", compiled=False)
    out, dx, grads = layer_run("fa4-op", compiled=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fa4_ops_fakes_and_autograd_agree_with_their_kernels(cpu_kernels):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    torch.library.opcheck(fa4_op.fa4_forward, (q, k, v, 0.25))
    out, lse = fa4_op.fa4_forward(q, k, v, 0.25)
    torch.library.opcheck(fa4_op.fa4_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                 out.detach(), lse.detach(), 0.25))


def test_fa4_op_refuses_a_mask():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="without a mask"):
        fa4_op.fa4_attention(None, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
