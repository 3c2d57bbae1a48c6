"""The SM clock and board power of recorded GPU runs over their steady steps, from the NVML samples every run
writes (``samples.jsonl``: ``sm_clock_mhz``, ``power_w``, all ranks) in the window the summary's utilization
uses (``llmpar.metrics.definitions.steady_window``). Prints a row per run directory:

    python benchmarks/steady_clocks.py results/h100-1b-kernels/runs/*
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from llmpar.io import read_json, read_jsonl
from llmpar.metrics.definitions import steady_window


def steady_clocks(run_dir: Path) -> dict:
    summary, steps = read_json(run_dir / "summary.json"), read_jsonl(run_dir / "steps.jsonl")
    warm = steps[-1]["step"] - summary["steady_steps"]  # the steady steps are those after the first `warm`
    t_lo, t_hi = steady_window(steps, warm)
    window = [s for s in read_jsonl(run_dir / "samples.jsonl")
              if t_lo <= s["t_s"] <= t_hi and s.get("sm_clock_mhz") is not None and s.get("power_w") is not None]
    if not window:
        raise SystemExit(f"{run_dir}: no samples with an SM clock and power in the steady steps (a CPU run, or "
                         "recorded without NVML)")
    clocks = [s["sm_clock_mhz"] for s in window]
    return {"run": run_dir.name, "gpu": summary["environment"]["gpu_name"], "samples": len(window),
            "sm_clock_mhz_median": statistics.median(clocks), "sm_clock_mhz_range": [min(clocks), max(clocks)],
            "power_w_mean": statistics.fmean(s["power_w"] for s in window), "tokens_per_s": summary["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (results/<study>/runs/<run>)")
    for run_dir in p.parse_args().runs:
        r = steady_clocks(run_dir)
        low, high = r["sm_clock_mhz_range"]
        print(f"{r['run']:<24} {r['gpu']}: {r['tokens_per_s']:,.0f} tokens/s, SM clock median "
              f"{r['sm_clock_mhz_median']:.0f} MHz ({low:.0f}-{high:.0f}), power {r['power_w_mean']:.0f} W, "
              f"{r['samples']} samples")


if __name__ == "__main__":
    main()
