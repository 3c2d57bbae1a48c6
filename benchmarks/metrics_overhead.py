#!/usr/bin/env python
"""Benchmark: the cost of metric collection. Trains the same run with and without it and prints the
steady-state throughput of each and the slowdown ratio (goal: under 1% on GPU; printed for CPU too).

"Metric collection" here is everything the study adds beyond the loss log: the background sampler
thread (NVML or psutil, every train.sample_period_s), the forward/backward/optimizer phase timer
(CUDA events or host clocks) and each data-parallel replica's gradient norm for the noise scale (DDP's
communication hook, FSDP2's reduce-scatter, DeepSpeed's gradient hooks). With `train.metrics: false`
all three are off; the step clock the loop needs for its own log stays on in every arm, so the
comparison isolates the added collection. The arm `no-sampler` keeps metrics on but sets the sampler's
period beyond the run (it never samples): on / no-sampler / off separates the sampler thread from the
timer and the noise-scale hooks. `on` measures the noise scale on every step; `every<k>` (e.g. `every4`)
on every k-th (train.noise_scale_every), the other steps without its gradient hooks.

    python benchmarks/metrics_overhead.py                       # tiny model on CPU
    python benchmarks/metrics_overhead.py --config configs/h200-1b.yaml --run single --steps 30 --repeats 2
    python benchmarks/metrics_overhead.py --config configs/gpu2-1b.yaml --run ddp --steps 20 --arms on,no-sampler,off
    python benchmarks/metrics_overhead.py --config configs/gpu2-1b.yaml --run zero2 --steps 18 --arms on,every4,off
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# each arm's train overrides; a period of a day: the sampler thread starts and waits, never sampling;
# `every<k>`: metrics on, the noise scale's gradient hooks on every k-th step only (train.noise_scale_every)
ARMS = {"on": {"metrics": True, "noise_scale_every": 1}, "no-sampler": {"metrics": True, "sample_period_s": 86400.0},
        "off": {"metrics": False}}


def arm_overrides(arm: str) -> dict | None:
    if arm in ARMS:
        return ARMS[arm]
    k = arm.removeprefix("every")
    return {"metrics": True, "noise_scale_every": int(k)} if arm.startswith("every") and k.isdigit() else None

from llmpar.config import load_yaml, prepare, run_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "config.yaml"))
    p.add_argument("--run", default="single")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3, help="runs per arm, interleaved; the median is reported")
    p.add_argument("--tokens", help="token shards (default: the study's results/<study>/data/tokens)")
    p.add_argument("--no-compile", action="store_true", help="train eager (skips compilation in every run)")
    p.add_argument("--micro-batch-size", type=int, help="override train.micro_batch_size")
    p.add_argument("--arms", default="on,off",
                   help=f"comma-separated, from {', '.join(ARMS)}, every<k> (first: the baseline)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    a = p.parse_args()
    arms = a.arms.split(",")
    if len(arms) < 2 or any(arm_overrides(x) is None for x in arms):
        p.error(f"--arms: two or more of {', '.join(ARMS)}, every<k>, comma-separated; got {a.arms!r}")
    raw = load_yaml(a.config)
    raw["recorded"] = False
    raw.setdefault("train", {}).update(steps=a.steps, checkpoint_every=0, eval_every=a.steps, log_every=50)
    if a.no_compile:
        raw["train"]["compile"] = False
    if a.micro_batch_size:
        raw["train"]["micro_batch_size"] = a.micro_batch_size
    cfg = prepare(raw)
    tokens = Path(a.tokens) if a.tokens else REPO / "results" / cfg["study"] / "data" / "tokens"
    if not (tokens / "meta.json").is_file():
        print(f"error: no token shards at {tokens}; run the study's data rules first", file=sys.stderr)
        return 2
    results: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for arm in arms:
                rc = run_config(cfg, a.run)
                rc["train"] = dict(rc["train"], **arm_overrides(arm))
                out = Path(tmp) / f"{arm}{i}"
                subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--run-config", json.dumps(rc),
                                "--tokens", str(tokens), "--out", str(out)], check=True,
                               stdout=subprocess.DEVNULL)
                summary = json.loads((out / "summary.json").read_text())
                if summary["status"] != "ok":
                    print(f"error: run {a.run} ended {summary['status']}: {summary['message']}", file=sys.stderr)
                    return 1
                tps = summary["tokens_per_s"]
                results[arm].append(tps)
                print(f"repeat {i} {arm:<10}  {tps:,.0f} tokens/s", flush=True)
    median = {arm: statistics.median(v) for arm, v in results.items()}
    base = arms[0]
    print(f"\nrun {a.run} of {cfg['study']}, {a.steps} steps, median of {a.repeats} per arm")
    for arm in arms:
        lo, hi = min(results[arm]), max(results[arm])
        print(f"{arm:<10}: {median[arm]:,.0f} tokens/s  (runs {lo:,.0f}-{hi:,.0f}, spread {(hi / lo - 1) * 100:.2f}%)"
              + ("" if arm == base else f"  ratio {arm}/{base}: {median[arm] / median[base]:.4f}"))
    if a.json:
        Path(a.json).write_text(json.dumps({"run": a.run, "study": cfg["study"], "steps": a.steps,
                                            "tokens_per_s": results, "median": median,
                                            "ratio_to_" + base: {x: median[x] / median[base] for x in arms}},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
