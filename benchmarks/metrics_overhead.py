#!/usr/bin/env python
"""Benchmark: the cost of metric collection. Trains the same run with and without it and prints the
steady-state throughput of each and the slowdown ratio (goal: under 1% on GPU; printed for CPU too).

"Metric collection" here is everything the study adds beyond the loss log: the background sampler
thread (NVML or psutil, every train.sample_period_s), the forward/backward/optimizer phase timer
(CUDA events or host clocks) and each data-parallel replica's gradient norm for the noise scale (DDP's
communication hook). With `train.metrics: false` all three are off; the step clock the loop needs
for its own log stays on in both arms, so the comparison isolates the added collection.

    python benchmarks/metrics_overhead.py                       # tiny model on CPU
    python benchmarks/metrics_overhead.py --config configs/h200-1b.yaml --run single --steps 30 --repeats 2
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
    p.add_argument("--json", help="also write the figures to this JSON file")
    a = p.parse_args()
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
    results: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for metrics in (True, False):
                rc = run_config(cfg, a.run)
                rc["train"] = dict(rc["train"], metrics=metrics)
                out = Path(tmp) / f"{'on' if metrics else 'off'}{i}"
                subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--run-config", json.dumps(rc),
                                "--tokens", str(tokens), "--out", str(out)], check=True,
                               stdout=subprocess.DEVNULL)
                summary = json.loads((out / "summary.json").read_text())
                if summary["status"] != "ok":
                    print(f"error: run {a.run} ended {summary['status']}: {summary['message']}", file=sys.stderr)
                    return 1
                tps = summary["tokens_per_s"]
                results[metrics].append(tps)
                print(f"repeat {i} metrics={'on ' if metrics else 'off'}  {tps:,.0f} tokens/s", flush=True)
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"\nrun {a.run} of {cfg['study']}, {a.steps} steps, median of {a.repeats} per arm")
    print(f"metrics on : {on:,.0f} tokens/s")
    print(f"metrics off: {off:,.0f} tokens/s")
    print(f"slowdown ratio off/on: {off / on:.4f}  ({(off / on - 1) * 100:+.2f}% time added by metric collection)")
    if a.json:
        Path(a.json).write_text(json.dumps({"run": a.run, "study": cfg["study"], "steps": a.steps,
                                            "tokens_per_s_on": results[True], "tokens_per_s_off": results[False],
                                            "median_on": on, "median_off": off, "ratio_off_on": off / on},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
