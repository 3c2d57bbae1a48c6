"""GPU probe for the 1.1B study: ceilings, attention backends, and the training step of ``single`` under a
few settings, timed with CUDA events. Writes JSON lines to --out.

    python benchmarks/gpu_probe.py --out probe.jsonl [--variants base,noce,...]
    python benchmarks/gpu_probe.py --out probe.jsonl --variants ""      # the matmul and attention ceilings only

Each variant builds the 1.1B model afresh, wraps it exactly as the ``single`` strategy does
(``prepare_model`` + ``TorchEngine``: per-layer torch.compile, bf16 autocast with fp32 master
weights, fused AdamW, grad clipping, gradient accumulation over micro-batches), runs warm-up steps
(compilation) and then times steps of the study's global batch (32 x 2048 tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import types

import torch  # noqa: E402

from llmpar.kernels import QUACK_MLPS  # noqa: E402
from llmpar.layout import RunSpec  # noqa: E402
from llmpar.model import attention_backends, build_model  # noqa
from llmpar.shape import flops_per_token  # noqa: E402

MODEL = {"size": "1B", "seq_len": 2048, "vocab_size": 32000}
TOKENIZER_VOCAB = 660
PEAK = 989e12
TRAIN = dict(lr=3e-4, weight_decay=0.0, warmup_steps=10, steps=100, min_lr_ratio=0.1, grad_clip=1.0,
             metrics=False)


def emit(out, row):
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def event_time(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    times.sort()
    return times[len(times) // 2]


def matmul_ceiling(out):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = event_time(lambda: a @ b)
    emit(out, {"kind": "matmul", "n": n, "tflops": 2 * n**3 / t / 1e12})
    # the shapes of the model's GEMMs at 16k tokens (forward)
    for m, k, nn in ((16384, 2048, 2048), (16384, 2048, 256), (16384, 2048, 5632), (16384, 5632, 2048),
                     (16384, 2048, 32000)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(nn, k, device="cuda", dtype=torch.bfloat16)
        t = event_time(lambda x=x, w=w: x @ w.t())
        emit(out, {"kind": "gemm", "mkn": [m, k, nn], "tflops": 2 * m * k * nn / t / 1e12})


def attention_bench(out):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, kvh, s, d = 8, 32, 4, 2048, 64
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kvh, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kvh, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops_fwd = 4 * b * h * s * s * d / 2  # causal
    best = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (True, False):
            kk = k if gqa else k.repeat_interleave(h // kvh, 1)
            vv = v if gqa else v.repeat_interleave(h // kvh, 1)

            def fwd(kk=kk, vv=vv, gqa=gqa):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

            def fwdbwd(fwd=fwd):
                o = fwd()
                o.backward(torch.ones_like(o))

            row = {"kind": "attention", "backend": name, "enable_gqa": gqa}
            try:
                with sdpa_kernel([be]):
                    tf = event_time(fwd)
                    tfb = event_time(fwdbwd)
                row.update(fwd_ms=tf * 1e3, fwdbwd_ms=tfb * 1e3, fwd_tflops=flops_fwd / tf / 1e12,
                           fwdbwd_tflops=3.5 * flops_fwd / tfb / 1e12)
                if gqa:
                    best[name] = tfb
            except Exception as exc:  # backend refuses these inputs
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            emit(out, row)
            q.grad = k.grad = v.grad = None
    return best


def step_bench(out, name, mbs=8, fused_ce=True, backend=None, compile_mode="layers", precision="bf16", steps=6,
               warm=3, mode="default", fused=False, mlp="torch", norm="torch"):
    from llmpar.strategies.engine import TorchEngine
    from llmpar.strategies.levers import prepare_model

    # The attention backend order (train.attention: cudnn | flash | default) holds around the steps.
    # Run with TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 when comparing backends:
    # the caches' keys do not include the SDPA choice, so a cached graph keeps its first backend.
    torch._dynamo.reset()
    import llmpar.strategies.loss as loss_module

    loss_module._FUSED_CE = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gb, seq = 32, MODEL["seq_len"]
    m = gb // mbs
    spec = RunSpec(name=name, strategy="single", micro_batches=m, micro_batch_size=mbs, precision=precision,
                   compile=compile_mode == "layers", compile_mode=mode, fused_projections=fused, mlp=mlp, norm=norm)
    ctx = types.SimpleNamespace(device=torch.device("cuda"), is_main=True, rank=0, world_size=1)
    t0 = time.time()
    model = build_model(MODEL, TOKENIZER_VOCAB, 1234, device="cuda", attention=backend or "default")
    if mlp in QUACK_MLPS:
        emit(out, {"kind": "mlp_check", "name": name,
                   **quack_mlp_check(model.model.layers[0].mlp, autotuned=mlp == "quack-autotuned")})
        torch._dynamo.reset()  # the step compiles its layers afresh
    model = prepare_model(model, spec)
    if compile_mode == "model":
        model = torch.compile(model)
    engine = TorchEngine(model, spec, ctx, {**TRAIN, "fused_loss": fused_ce})
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randint(0, TOKENIZER_VOCAB, (gb, seq + 1), generator=g)
        xs, ys = x[:, :-1].contiguous().cuda(), x[:, 1:].contiguous().cuda()
        batches.append(list(zip(xs.chunk(m), ys.chunk(m))))
    row = {"kind": "step", "name": name, "mbs": mbs, "m": m, "fused_ce": fused_ce, "backend": backend,
           "compile": compile_mode, "compile_mode": mode, "fused_projections": fused, "precision": precision,
           "mlp": mlp, "norm": norm}
    with attention_backends(backend or "default", "cuda"):  # the backend order holds around the steps
        try:
            losses = []
            for i in range(warm):
                losses.append(engine.train_step(batches[i % 4]))
            torch.cuda.synchronize()
            row["warmup_s"] = time.time() - t0
            evs = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            window = [time.time()]
            evs[0].record()
            for i in range(steps):
                losses.append(engine.train_step(batches[i % 4]))
                evs[i + 1].record()
            torch.cuda.synchronize()
            row["timed_window"] = window + [time.time()]  # Unix seconds: match clock and power samples to it
            if PROFILE:
                row["profile"] = profile_steps(engine, batches, 2)
            times = [evs[i].elapsed_time(evs[i + 1]) / 1000 for i in range(steps)]
            t = sum(times)
            tps = steps * gb * seq / t
            fpt = flops_per_token(MODEL, TOKENIZER_VOCAB)
            row.update(step_s=[round(x, 4) for x in times], tokens_per_s=tps, mfu=tps * fpt / PEAK,
                       peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                       loss_first=float(losses[0]), loss_last=float(losses[-1]),
                       losses=[round(float(x), 5) for x in losses])  # same batches in every variant
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    emit(out, row)
    del engine, model, batches
    gc.collect()
    torch.cuda.empty_cache()
    return row


def quack_mlp_check(mlp, tokens=4096, autotuned=False):
    """The errors of torch's and quack's MLP (``train.mlp``, bf16 autocast) against the same MLP in fp32 on one
    batch: the output and the input's and weights' gradients, each as max |err| / max |ref|; and both MLPs'
    time (:func:`mlp_times`)."""
    import copy

    from llmpar.quack_mlp import quack_mlp_class

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, tokens // 2, mlp.gate_proj.in_features, device="cuda", generator=g)
    dy = torch.randn(2, tokens // 2, mlp.down_proj.out_features, device="cuda", generator=g)

    def run(m, autocast):
        m = copy.deepcopy(m)
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = m(xx)
        y.float().backward(dy)
        return [y.float(), xx.grad] + [p.weight.grad for p in (m.gate_proj, m.up_proj, m.down_proj)]

    ref = run(mlp, False)
    std = run(mlp, True)
    q = copy.deepcopy(mlp)
    q.__class__ = quack_mlp_class(autotuned)
    try:
        fused = run(q, True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    names = ("out", "dx", "dgate", "dup", "ddown")

    def err(a):
        return {n: float((t - r).abs().max() / r.abs().max()) for n, t, r in zip(names, a, ref)}

    return {"standard_vs_fp32": err(std), "quack_vs_fp32": err(fused), "fwd_bwd_ms": mlp_times(mlp, q)}


def mlp_times(standard, quack, tokens=16 * 2048):
    """Forward + backward of one micro-batch through the MLP (bf16 autocast, the bf16 input of the bf16
    residual stream), each compiled as the study compiles its layers, and quack's also eager."""
    x = torch.randn(16, tokens // 16, standard.gate_proj.in_features, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    dy = torch.randn(16, tokens // 16, standard.down_proj.out_features, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, m in (("standard_compiled", torch.compile(standard)), ("quack_eager", quack),
                    ("quack_compiled", torch.compile(quack))):
        def step(m=m):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(x)
            y.backward(dy)

        try:
            out[name] = round(event_time(step) * 1e3, 3)
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for m in (standard, quack):
        m.zero_grad(set_to_none=True)
    return out


PROFILE = False
ELEMENTWISE = "elementwise, norm, loss"
# Kernel-name substrings -> category, first match wins. quack's RMSNorm kernels are CuTe DSL kernels named
# kernel_cutlass_..., so they are matched before the GEMMs' "cutlass"; inductor's foreach kernels (triton_for_*)
# come from the compiled optimizer step (precision bf16-master), the only foreach code the step compiles.
CATEGORIES = (
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attn")),
    (ELEMENTWISE, ("rmsnorm",)),
    ("optimizer", ("adam", "multi_tensor", "foreach", "triton_for_")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul")),
    (ELEMENTWISE, ("triton",)),
)


def kernel_category(name: str) -> str:
    return next((c for c, subs in CATEGORIES if any(x in name.lower() for x in subs)), "other")


def categorize(profile: dict) -> dict:
    """Seconds a step by category of a recorded profile, from its kernel list (``kernels``: every kernel; a
    record with only its longest kernels, ``top``, puts the rest under ``unlisted``)."""
    kernels = profile.get("kernels") or profile["top"]
    cats = {}
    for name, t in kernels:
        cat = kernel_category(name)
        cats[cat] = cats.get(cat, 0) + t
    rest = profile["kernel_total_s"] - sum(t for _, t in kernels)
    if "kernels" not in profile and rest > 0:
        cats["unlisted"] = rest
    return {k: round(v, 4) for k, v in cats.items()}


def profile_steps(engine, batches, n):
    """Kernel time of ``n`` steps by category (torch.profiler, CUDA activity), and every kernel's, longest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            engine.train_step(batches[i % 4])
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.key != "ProfilerStep*":
            kernels[e.key] = kernels.get(e.key, 0) + t / 1e6 / n
    listed = {"kernel_total_s": round(sum(kernels.values()), 4),
              "kernels": [[k[:90], round(v, 6)] for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])]}
    return {"per_step_s": categorize(listed), **listed}


VARIANTS = {
    "flash16": dict(mbs=16, backend="flash"),
    "cudnn16": dict(mbs=16, backend="cudnn"),
    "base": dict(mbs=8),
    "noce": dict(mbs=8, fused_ce=False),
    "cudnn": dict(mbs=8, backend="cudnn"),
    "mbs16": dict(mbs=16, backend="best"),
    "mbs4": dict(mbs=4, backend="best"),
    "eager": dict(mbs=8, compile_mode="none", backend="best"),
    "wholemodel": dict(mbs=8, compile_mode="model", backend="best"),
    # single-GPU MFU levers at the preset's micro-batch 16 (cudnn16 is the preset's own setting)
    "noce16": dict(mbs=16, backend="cudnn", fused_ce=False),
    "whole16": dict(mbs=16, backend="cudnn", compile_mode="model"),
    "autotune16": dict(mbs=16, backend="cudnn", mode="max-autotune-no-cudagraphs"),
    # train.fused_projections; CUDA graphs for the compiled layers (compile mode reduce-overhead, which the
    # config does not offer: this variant records why)
    "fused16": dict(mbs=16, backend="cudnn", fused=True),
    "graphs16": dict(mbs=16, backend="cudnn", mode="reduce-overhead"),
    # train.attention: fa4 (FlashAttention-4 through transformers' flash_attention_4, instead of SDPA)
    "fa4_16": dict(mbs=16, backend="fa4"),
    "fa4op16": dict(mbs=16, backend="fa4-op"),
    # not a lever the study may take (bf16 weights and residual stream: another numerics class), the bound
    # of what the fp32 master weights and the fp32 residual stream cost
    "bf16pure16": dict(mbs=16, backend="cudnn", precision="bf16-pure"),
    # precision bf16-residual: the residual stream in bf16, fp32 master weights and states
    "res16": dict(mbs=16, backend="cudnn", precision="bf16-residual"),
    "fa4opres16": dict(mbs=16, backend="fa4-op", precision="bf16-residual"),
    "fusedfa4opres16": dict(mbs=16, backend="fa4-op", precision="bf16-residual", fused=True),
    # train.mlp quack: quack-kernels' gated MLP, SwiGLU and its gradient in the GEMMs' epilogues
    "qmlp16": dict(mbs=16, backend="cudnn", mlp="quack"),
    "qmlpfa4opres16": dict(mbs=16, backend="fa4-op", precision="bf16-residual", mlp="quack"),
    # train.mlp quack-autotuned: the same on the tiles quack's autotuner picks at the first step
    "qmlptunedfa4opres16": dict(mbs=16, backend="fa4-op", precision="bf16-residual", mlp="quack-autotuned"),
    # fused_projections beside quack's MLP: one GEMM for q/k/v (quack's gated GEMM already joins gate and up)
    "qmlpfusedfa4opres16": dict(mbs=16, backend="fa4-op", precision="bf16-residual", mlp="quack", fused=True),
    # precision bf16-master: bf16 weights in the model, fp32 masters in the optimizer (no per-micro-batch casts)
    "qmlpfa4opmaster16": dict(mbs=16, backend="fa4-op", precision="bf16-master", mlp="quack"),
    "qmlptunedfa4opmaster16": dict(mbs=16, backend="fa4-op", precision="bf16-master", mlp="quack-autotuned"),
    "qmlpfusedfa4opmaster16": dict(mbs=16, backend="fa4-op", precision="bf16-master", mlp="quack", fused=True),
    "qmlptunedfusedfa4opmaster16": dict(mbs=16, backend="fa4-op", precision="bf16-master", mlp="quack-autotuned",
                                        fused=True),
    # train.norm quack: quack's RMSNorms, each fused with the residual add before it
    "qnormqmlpfa4opmaster16": dict(mbs=16, backend="fa4-op", precision="bf16-master", mlp="quack", norm="quack"),
    "qnormqmlptunedfa4opmaster16": dict(mbs=16, backend="fa4-op", precision="bf16-master", mlp="quack-autotuned",
                                        norm="quack"),
}


def print_categories(path: str) -> None:
    """Each profiled step of a probe file: tokens/s and seconds a step by category (:func:`categorize`)."""
    for line in open(path):
        row = json.loads(line)
        if row.get("kind") == "step" and row.get("profile"):
            print(row["name"], round(row["tokens_per_s"]), round(row["mfu"], 4), categorize(row["profile"]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", help="the JSON lines file to append to (required unless --categorize)")
    p.add_argument("--categorize", metavar="FILE", help="print a probe file's profiles by kernel category and exit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--deadline", type=float, default=1e9, help="seconds from start: skip variants after it")
    p.add_argument("--no-micro", action="store_true", help="skip the matmul and attention micro-benchmarks")
    p.add_argument("--profile", action="store_true", help="also profile 2 steps per variant (kernel time)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 3 warm-up steps)")
    a = p.parse_args()
    if a.categorize:
        return print_categories(a.categorize)
    if not a.out:
        p.error("--out is required")
    global PROFILE
    PROFILE = a.profile
    t_start = time.time()
    props = torch.cuda.get_device_properties(0)
    emit(a.out, {"kind": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "gpu": props.name, "sms": props.multi_processor_count,
                 "mem_gib": props.total_memory / 2**30})
    if not a.no_micro:
        matmul_ceiling(a.out)
    best_backend = "cudnn"
    if not a.no_micro:
        best = attention_bench(a.out)
        best_backend = "cudnn" if best.get("cudnn", 1e9) < best.get("flash", 1e9) else "flash"
        emit(a.out, {"kind": "choice", "best_backend": best_backend, "attn_fwdbwd_s": best})
    for v in filter(None, a.variants.split(",")):
        if time.time() - t_start > a.deadline:
            emit(a.out, {"kind": "skipped", "name": v})
            continue
        kw = dict(VARIANTS[v])
        if kw.get("backend") == "best":
            kw["backend"] = best_backend
        step_bench(a.out, v, steps=a.steps, **kw)


if __name__ == "__main__":
    main()
