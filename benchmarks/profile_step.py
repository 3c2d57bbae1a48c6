#!/usr/bin/env python
"""Where a run's step time goes on each GPU: kernel time on the compute streams, NCCL kernels alone, and
time with no kernel at all (the device waits for the host), from torch.profiler over a few steady steps.

Launch it as the run would be (one process per GPU of the run's layout, one node):

    torchrun --nproc-per-node 4 benchmarks/profile_step.py --config configs/gpu4-1b.yaml \
        --run-name pp4-interleaved --tokens results/h100x4-1b/data/tokens --out $OUT/profile

Each rank builds the run exactly as the training loop does (data, model, strategy engine), trains
``--warmup`` steps (compilation, allocator warm-up), then ``--steps`` steps under the profiler with a
device sync before and after. It writes ``<out>/<run>.json``, per rank: the steps' wall time, and over
the window from the first to the last kernel the shares of (CUDA only; on CPU the wall time alone)

* ``compute``: some kernel other than NCCL's (or a copy) runs;
* ``nccl_only``: only NCCL kernels run (a transfer the compute waits for, or one not overlapped);
* ``idle``: nothing runs on the device (the host has not launched the next work yet).

A pipeline's measured idle share (``bubble_measured``, from the engine's phase timers, also recorded per
rank as ``breakdown`` over the same steps) counts both of the last two; this separates them. Each rank
also records its device timeline (compute spans, NCCL kernels, a pipeline's actions). Rank 0 prints a
table of all ranks.

With ``--memory`` (CUDA) it records the caching allocator's history instead of a profile, from before the
model is built to the end of the profiled steps, replays it, and writes ``<out>/<run>_memory.json``: per
rank the peak of allocated bytes (which ``torch.cuda.max_memory_allocated`` reports, the study's
``peak_mem_gib``) and the blocks live at that moment, grouped by where they were allocated (the innermost
Python frame outside torch itself: the model's code, DeepSpeed's, a compiled graph's wrapper).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llmpar import distributed
from llmpar.config import load_yaml, prepare, run_config
from llmpar.data.loader import TokenData
from llmpar.layout import RunSpec
from llmpar.model import attention_backends, build_model
from llmpar.strategies import parallelize
from llmpar.train import _micro_batches


def merged(intervals: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    """``intervals`` merged where they overlap or are less than ``gap`` apart."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (start, end)."""
    return sum(b - a for a, b in merged(intervals, 0.0))


def device_shares(trace_path: Path) -> dict:
    """Compute / NCCL-only / idle shares of the window covered by the trace's device activity, and the
    timeline (ms from the window's start): compute busy spans (merged across gaps under 50 us), every
    NCCL kernel with its name and CUDA stream (point-to-point kernels of different communicators run on
    different streams) and a pipeline's actions on the host and on the device. Each rank's times start at
    its own first kernel, ``t0_us`` on the profiler's clock, which the ranks of one node share."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not device:
        return {}
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in device]
    nccl = [e for e in device if "nccl" in e["name"].lower()]
    other = [(e["ts"], e["ts"] + e["dur"]) for e in device if "nccl" not in e["name"].lower()]
    t0 = min(a for a, _ in spans)
    window = max(b for _, b in spans) - t0
    busy, compute = union(spans), union(other)
    ms = lambda t: round((t - t0) / 1e3, 3)  # noqa: E731
    # torch's pipeline runtime names each action ("PP:4F0", "PP:0SEND_F1", ...): when the host ran it, and
    # the device span of the kernels it launched
    actions = {side: [(e["name"][3:], ms(e["ts"]), ms(e["ts"] + e["dur"])) for e in events
                      if e.get("ph") == "X" and e.get("cat") == cat and e.get("name", "").startswith("PP:")]
               for side, cat in (("host_ms", "user_annotation"), ("device_ms", "gpu_user_annotation"))}
    return {"window_s": window / 1e6, "compute": compute / window, "nccl_only": (busy - compute) / window,
            "idle": 1 - busy / window, "nccl_kernel_s": union([(e["ts"], e["ts"] + e["dur"]) for e in nccl]) / 1e6,
            "kernels": len(device),
            # t0_us: the profiler's clock (the host's, shared by the ranks of one node) at the first kernel
            "timeline": {"t0_us": t0,
                         "compute_ms": [(ms(a), ms(b)) for a, b in merged(other, 50.0)],
                         "nccl_ms": [(ms(e["ts"]), ms(e["ts"] + e["dur"]), e["name"][:40],
                                      e.get("args", {}).get("stream")) for e in nccl],
                         "actions": actions}}


TORCH_DIR = str(Path(torch.__file__).parent) + os.sep  # torch's own modules (not a path merely naming torch)


def site(frames: list[dict], torch_dir: str = TORCH_DIR) -> str:
    """Where a block was allocated: the innermost frame outside torch's own modules (the caller that
    asked for it), e.g. ``deepspeed/runtime/zero/stage3.py:412 (_partition)``; a compiled graph's
    wrapper (Inductor's generated module) counts as one site per graph."""
    for f in frames:
        name = f["filename"]
        if "torchinductor" in name:
            return f"compiled graph {Path(name).name}"
        if name.startswith(torch_dir):
            continue
        if name.endswith(".py"):
            tail = "/".join(Path(name).parts[-3:])
            return f"{tail}:{f['line']} ({f['name']})"
    return "torch (no frame outside torch)" if frames else "unknown (allocated before recording)"


def live_at_peak(trace: list[dict], top: int = 25) -> dict:
    """Replay one device's allocator trace (``torch.cuda.memory._snapshot()["device_traces"][d]``):
    the peak of allocated bytes and the blocks live at its first occurrence, grouped by ``site``."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
        if cur > peak:
            peak, at = cur, i
    live.clear()
    for e in trace[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in live.values():
        g = groups.setdefault(site(e.get("frames", [])), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"peak_bytes": peak, "peak_event": at, "events": len(trace), "blocks_live": len(live),
            "sites": [{"site": k, "bytes": b, "blocks": n} for k, (b, n) in ranked[:top]],
            "other_bytes": sum(b for _, (b, _n) in ranked[top:])}


def profiled_row(a, step, engine, cuda: bool, sync) -> dict:
    """Steps ``--warmup`` .. under torch.profiler: wall time per step, device shares and timeline."""
    engine.reset_time_breakdown()  # the engine's own phase timers over the profiled steps only
    sync()
    dist.barrier()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for i in range(a.warmup, a.warmup + a.steps):
            step(i)
        sync()
        wall = (time.perf_counter() - t0) / a.steps
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        shares = device_shares(trace)
    return {"step_s": wall, "steps": a.steps, **shares, "breakdown": engine.time_breakdown(),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def memory_row(a, step, sync) -> dict:
    """Steps ``--warmup`` .. with the allocator's history (recording since before the model was built),
    replayed: the peak and the blocks live at it."""
    for i in range(a.warmup, a.warmup + a.steps):
        step(i)
    sync()
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    return {"max_memory_allocated": torch.cuda.max_memory_allocated(), "truncated": len(trace) >= a.max_entries,
            **live_at_peak(trace), "device": torch.cuda.get_device_name()}


def print_profiles(a, rows: list[dict]) -> None:
    print(f"{a.run_name}: {a.steps} profiled steps after {a.warmup}, {os.environ.get('WORLD_SIZE')} ranks")
    print("rank  step_s  window_s  compute  nccl_only  idle  nccl_kernel_s")
    for r in rows:
        print(f"{r['rank']:>4}  {r['step_s']:.3f}  {r.get('window_s', 0):.3f}  {r.get('compute', 0):.3f}  "
              f"{r.get('nccl_only', 0):.3f}  {r.get('idle', 0):.3f}  {r.get('nccl_kernel_s', 0):.3f}")


def print_memory(rows: list[dict]) -> None:
    for r in rows:
        print(f"rank {r['rank']}: peak {r['peak_bytes'] / 2**30:.2f} GiB replayed, "
              f"max_memory_allocated {r['max_memory_allocated'] / 2**30:.2f} GiB, {r['events']} events"
              + (" (TRUNCATED)" if r["truncated"] else ""))
        for g in r["sites"][:12]:
            print(f"  {g['bytes'] / 2**30:7.2f} GiB {g['blocks']:6d}  {g['site']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--run-name", required=True, help="the run of the config")
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="record the allocator's history instead (CUDA)")
    p.add_argument("--max-entries", type=int, default=3_000_000, help="allocator events kept (--memory)")
    a = p.parse_args()
    cfg = prepare(load_yaml(a.config))
    rc = run_config(cfg, a.run_name)
    spec, tc = RunSpec.from_dict(rc["run"]), rc["train"]
    ctx = distributed.init(tc["device"])
    cuda = ctx.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.memory:
        if not cuda:
            raise SystemExit("--memory records the CUDA caching allocator: run it on a GPU")
        torch.cuda.memory._record_memory_history(max_entries=a.max_entries, stacks="python")
        torch.cuda.reset_peak_memory_stats()
    with attention_backends(tc["attention"], ctx.device.type):
        data = TokenData(a.tokens, rc["model"]["seq_len"], rc["seed"])
        model = build_model(rc["model"], data.vocab_size, rc["seed"], device=ctx.device, attention=tc["attention"])
        engine = parallelize(model, spec, ctx, tc)
        gb = tc["global_batch"]

        def step(i):
            x, y = data.train_batch(i, gb, engine.dp_rank, engine.dp_size)
            engine.begin_step(i + 1)
            return engine.train_step(_micro_batches(x, y, spec.micro_batches, ctx.device, False))

        for i in range(a.warmup):
            step(i)
        measured = memory_row(a, step, sync) if a.memory else profiled_row(a, step, engine, cuda, sync)
    rows = distributed.all_gather_object({"run": a.run_name, "rank": ctx.rank, **measured, "torch": torch.__version__})
    if ctx.is_main:
        if a.memory:
            (out / f"{a.run_name}_memory.json").write_text(json.dumps(rows, indent=1))
            print_memory(rows)
        else:
            (out / f"{a.run_name}.json").write_text(json.dumps(rows))
            print_profiles(a, rows)
    engine.close()
    distributed.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
