"""Kernels from outside PyTorch on the 1.1B model's shapes (one micro-batch of 16 x 2048 tokens), each against
what the study runs, timed with CUDA events (gpu_probe's: the median of 10 calls after 3 warm-up calls), with
its error against an fp32 reference.
Writes JSON lines to the file named first:

    python benchmarks/kernel_micro.py kernels.jsonl

* attention (32 query / 4 key-value heads, head size 64, causal, bf16): SDPA's cuDNN and flash backends and
  FlashAttention-4 (flash-attn-4); forward and forward + backward times, TFLOP/s, and each one's largest error
  (over the largest value) of the output and the three input gradients against fp32 attention on 2 sequences;
* the output layer and cross-entropy (hidden 2048, vocabulary 32000, fp32 weight and hidden state as under
  autocast): the study's (bf16 GEMM, compiled cross-entropy) and the eager one, liger-kernel's and
  cut-cross-entropy's fused linear cross-entropy, quack's cross-entropy and chunked linear cross-entropy;
  forward + backward time, the memory it adds, the loss's error and the gradients' relative errors against fp32;
* RMSNorm of the fp32 residual stream after the residual add, output in bf16 for the next GEMM: inductor's (as
  the compiled layers run it) and quack's.

Packages: requirements/gpu-kernels.txt (FA4, quack) and benchmarks/kernel-peers.txt (liger-kernel,
cut-cross-entropy); a kernel whose package is missing or fails is recorded with its error.
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.nn.functional as F
from gpu_probe import emit as emit_to
from gpu_probe import event_time as timed
from torch.nn.attention import SDPBackend, sdpa_kernel

B, S, H, HKV, D = 16, 2048, 32, 4, 64  # the 1.1B preset's micro-batch and attention
N, HIDDEN, VOCAB = B * S, 2048, 32000
OUT = None  # the output file (the command line's)


def emit(row: dict) -> None:
    emit_to(OUT, row)


def failed(row: dict, exc: Exception) -> dict:
    return {**row, "error": f"{type(exc).__name__}: {str(exc)[:400]}", "traceback": traceback.format_exc()[-1200:]}


def imported(name: str, load):
    """``load()``'s result, or None with the import error recorded."""
    try:
        return load()
    except Exception as exc:
        emit(failed({"kind": "import", "name": name}, exc))
        return None


# ---------------------------------------------------------------- attention

def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
        return o.transpose(1, 2)
    return run


def fa4_impl():
    from flash_attn.cute import flash_attn_func

    def run(q, k, v):
        o = flash_attn_func(q, k, v, causal=True)
        return o[0] if isinstance(o, tuple) else o
    return run


def attention_section(g) -> None:
    flops_fwd = 4 * B * S * S * H * D / 2  # causal: half the scores
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    impls = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    fa4 = imported("fa4", fa4_impl)
    if fa4:
        impls["fa4"] = fa4
    # the reference: fp32 attention on the first 2 sequences
    qs, ks, vs = (t[:2].float().requires_grad_() for t in (q, k, v))
    ref_o = sdpa(SDPBackend.MATH)(qs, ks, vs)
    ref_o.backward(do[:2].float())
    ref = (ref_o.detach(), qs.grad, ks.grad, vs.grad)
    for name, fn in impls.items():
        row = {"kind": "attention", "name": name, "shape": [B, S, H, HKV, D]}
        try:
            qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
            o = fn(qq, kk, vv)
            o.backward(do)
            got = (o.detach(), qq.grad, kk.grad, vv.grad)
            row["max_err_over_max"] = {label: float((a[:2].float() - b).abs().max() / b.abs().max())
                                       for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}

            def fwdbwd(fn=fn, qq=qq, kk=kk, vv=vv):
                qq.grad = kk.grad = vv.grad = None
                fn(qq, kk, vv).backward(do)
            tf, tfb = timed(lambda fn=fn: fn(q, k, v)), timed(fwdbwd)
            row.update(fwd_ms=tf * 1e3, fwdbwd_ms=tfb * 1e3, fwd_tflops=flops_fwd / tf / 1e12,
                       bwd_tflops=2.5 * flops_fwd / (tfb - tf) / 1e12, fwdbwd_tflops=3.5 * flops_fwd / tfb / 1e12)
        except Exception as exc:
            row = failed(row, exc)
        emit(row)


# ---------------------------------------------------------------- output layer and cross-entropy

def loss_section(g) -> None:
    hid = torch.randn(N, HIDDEN, device="cuda", generator=g)
    wt = torch.randn(VOCAB, HIDDEN, device="cuda", generator=g) * 0.02
    y = torch.randint(0, VOCAB, (N,), device="cuda", generator=g)
    compiled_ce = torch.compile(lambda logits, y: F.cross_entropy(logits.float(), y), dynamic=False)

    def study(h, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return compiled_ce(F.linear(h, w), y)

    def eager(h, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(h, w).float(), y)

    def bf16(t):
        return t.to(torch.bfloat16)

    losses = {"compiled": study, "eager": eager}
    liger = imported("liger", lambda: __import__("liger_kernel.transformers", fromlist=["x"]))
    if liger:
        flce = liger.LigerFusedLinearCrossEntropyLoss()
        losses["liger_flce"] = lambda h, w: flce(bf16(w), bf16(h), y)
    cce = imported("cce", lambda: __import__("cut_cross_entropy", fromlist=["x"]))
    if cce:
        losses["cce"] = lambda h, w: cce.linear_cross_entropy(bf16(h), bf16(w), y)
    quack_ce = imported("quack_ce", lambda: __import__("quack.cross_entropy", fromlist=["x"]))
    if quack_ce:
        def quack(h, w):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = F.linear(h, w)
            return quack_ce.cross_entropy(logits, y)
        losses["quack_ce"] = quack
    quack_lce = imported("quack_lce", lambda: __import__("quack.linear_cross_entropy", fromlist=["x"]))
    if quack_lce:
        losses["quack_chunked_lce"] = lambda h, w: quack_lce.ChunkedLinearCrossEntropyFunction.apply(
            bf16(h), bf16(w), y, -100, "mean", 4096, False)
    hr, wr = hid.clone().requires_grad_(), wt.clone().requires_grad_()
    ref_loss = F.cross_entropy(F.linear(hr, wr), y)
    ref_loss.backward()
    ref = (float(ref_loss), hr.grad, wr.grad)
    del ref_loss
    for name, fn in losses.items():
        row = {"kind": "loss", "name": name, "tokens": N, "hidden": HIDDEN, "vocab": VOCAB}
        try:
            hh, ww = hid.clone().requires_grad_(), wt.clone().requires_grad_()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = fn(hh, ww)
            loss.backward()
            torch.cuda.synchronize()
            row.update(peak_extra_gib=(torch.cuda.max_memory_allocated() - base) / 2**30,
                       loss_err=float(loss) - ref[0],
                       dh_rel=float((hh.grad - ref[1]).norm() / ref[1].norm()),
                       dw_rel=float((ww.grad - ref[2]).norm() / ref[2].norm()))

            def fwdbwd(fn=fn, hh=hh, ww=ww):
                hh.grad = ww.grad = None
                fn(hh, ww).backward()
            row["fwdbwd_ms"] = timed(fwdbwd) * 1e3
        except Exception as exc:
            row = failed(row, exc)
        emit(row)


# ---------------------------------------------------------------- RMSNorm

def torch_norm(x, r, w):
    h = x + r
    return (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))).to(torch.bfloat16), h


def norm_section(g) -> None:
    xa, ra = (torch.randn(N, HIDDEN, device="cuda", generator=g) for _ in range(2))
    wn = 1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=g)
    dn = torch.randn(N, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
    norms = {"inductor": torch.compile(torch_norm, dynamic=False)}
    quack = imported("quack_rmsnorm", lambda: __import__("quack.rmsnorm", fromlist=["x"]))
    if quack:
        norms["quack"] = lambda x, r, w: quack.rmsnorm(x, w, residual=r, out_dtype=torch.bfloat16,
                                                       residual_dtype=torch.float32, eps=1e-5, prenorm=True)
    ref_o, _ = torch_norm(xa.double(), ra.double(), wn.double())
    for name, fn in norms.items():
        row = {"kind": "rmsnorm", "name": name, "tokens": N, "hidden": HIDDEN}
        try:
            x, r, w = (t.clone().requires_grad_() for t in (xa, ra, wn))

            def fwdbwd(fn=fn, x=x, r=r, w=w):
                x.grad = r.grad = w.grad = None
                o, h = fn(x, r, w)
                torch.autograd.backward([o, h], [dn, torch.zeros_like(h)])
            fwdbwd()
            o, _ = fn(xa, ra, wn)
            row.update(out_max_err=float((o.double() - ref_o.double()).abs().max()),
                       fwdbwd_ms=timed(fwdbwd) * 1e3, fwd_ms=timed(lambda fn=fn: fn(xa, ra, wn)) * 1e3)
        except Exception as exc:
            row = failed(row, exc)
        emit(row)


def main() -> None:
    global OUT
    OUT = sys.argv[1]
    emit({"kind": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda})
    g = torch.Generator(device="cuda").manual_seed(0)
    for section in (attention_section, loss_section, norm_section):
        section(g)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
