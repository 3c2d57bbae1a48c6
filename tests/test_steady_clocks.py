"""benchmarks/steady_clocks.py on a synthetic run directory: only the samples of the steady steps count (the
window the summary's utilization uses), and a run without clock samples is refused by name. The committed GPU
runs of the kernels study read at their power cap (RESULTS.md, "Kernel levers")."""

import json
from pathlib import Path

import pytest
from conftest import REPO, load_benchmark

from llmpar.metrics.definitions import steady_window

steady_clocks = load_benchmark("steady_clocks")


def write_run(path: Path, samples: list[dict]) -> Path:
    """Four steps of 1 s ending at 10, 11, 12, 13 s; the first is a warm-up step (steady_steps 3)."""
    path.mkdir()
    steps = [{"step": i + 1, "elapsed_s": 10.0 + i, "step_time_s": 1.0 if i else 5.0} for i in range(4)]
    (path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (path / "samples.jsonl").write_text("".join(json.dumps({"rank": 0, **s}) + "\n" for s in samples))
    summary = {"steady_steps": 3, "tokens_per_s": 1000.0, "environment": {"gpu_name": "card"}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_only_the_steady_steps_samples_count(tmp_path):
    assert steady_window([{"step": 1, "elapsed_s": 10.0, "step_time_s": 5.0},
                          {"step": 2, "elapsed_s": 11.0, "step_time_s": 1.0}], 1) == (10.0, 11.0)
    compile_phase = [{"t_s": t, "sm_clock_mhz": 1980.0, "power_w": 100.0} for t in (6.0, 9.5)]
    steady = [{"t_s": t, "sm_clock_mhz": c, "power_w": 690.0} for t, c in ((10.5, 1600.0), (11.5, 1500.0),
                                                                            (12.5, 1550.0))]
    after = [{"t_s": 14.0, "sm_clock_mhz": 1980.0, "power_w": 80.0}]
    r = steady_clocks.steady_clocks(write_run(tmp_path / "gpu", compile_phase + steady + after))
    assert r["samples"] == 3 and r["sm_clock_mhz_median"] == 1550.0 and r["sm_clock_mhz_range"] == [1500.0, 1600.0]
    assert r["power_w_mean"] == pytest.approx(690.0)


def test_a_run_without_clock_samples_is_refused(tmp_path):
    cpu = write_run(tmp_path / "cpu", [{"t_s": 11.0, "sm_clock_mhz": None, "power_w": None}])
    with pytest.raises(SystemExit, match="cpu: no samples with an SM clock"):
        steady_clocks.steady_clocks(cpu)


def test_the_kernels_study_ran_at_the_power_cap():
    for run_dir in sorted((REPO / "results" / "h100-1b-kernels" / "runs").iterdir()):
        r = steady_clocks.steady_clocks(run_dir)
        assert r["power_w_mean"] > 680 and r["sm_clock_mhz_median"] < 1700, r  # H100 SXM: 700 W, 1,980 MHz
