"""The torchtitan log parser on a log in torchtitan 0.2.2's format (sample_log.txt: FSDP over 2 ranks,
torchrun --tee prefixes, colours on, logged at steps 1, 5, 15, 25, 35, 45 as tt_launch.py aligns them).

    .venv/bin/python -m pytest benchmarks/torchtitan
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parse  # noqa: E402

SAMPLE = (HERE / "sample_log.txt").read_text()
MODEL = {"size": "1B", "seq_len": 2048, "vocab_size": 32000}
FPT_OURS = 6 * 1_034_512_384 + 6 * 22 * 2048 * 2048
FPT_TT = 6 * 1_034_512_384 + 12 * 22 * 2048 * 2048


def summarize(text, mode="fsdp", gpus=2, warmup=5, steps=45):
    return parse.summarize(parse.parse_log(text), mode=mode, gpus=gpus, warmup=warmup, steps=steps,
                           model_cfg=MODEL, global_batch=32)


def single_rank_plain(text: str) -> str:
    """The sample as a 1-GPU run without torchrun prefixes and colours (rank 0's lines only)."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if line.startswith("[rank1]:"):
            continue
        out.append(line.removeprefix("[rank0]:"))
    return "\n".join(out).replace("gradient accumulation steps 1", "gradient accumulation steps 2")


def test_step_lines_parsed_per_rank_with_ansi_and_prefix():
    p = parse.parse_log(SAMPLE)
    assert sorted(p["ranks"]) == [0, 1]
    assert [r["step"] for r in p["ranks"][0]] == [1, 5, 15, 25, 35, 45]
    r = p["ranks"][0][2]
    assert r == {"step": 15, "loss": 5.90113, "grad_norm": 2.0436, "max_reserved_gib": 52.31, "max_reserved_pct": 66.06,
                 "tps": 69876.0, "tflops": 511.10, "mfu_pct": 51.68}
    assert p["params"] == 1_100_048_384 and p["flavor"] == "llmpar_1b"
    assert p["peak_flops"] == 989e12
    assert p["card"] == "NVIDIA H100 80GB HBM3" and p["capacity_gib"] == 79.19
    assert p["torchtitan"] == "0.2.2"
    assert p["trainer"] == {"local": 16, "global": 32, "accum": 1, "seq": 2048, "steps": 45}
    assert p["completed"] and p["fsdp"]
    assert p["memory"][0]["max_allocated_gib"] == 46.918 and p["memory"][1]["rank"] == 1
    assert p["errors"] == []


def test_steady_windows_are_our_steady_steps():
    row = summarize(SAMPLE)
    assert row["status"] == "ok", row["message"]
    assert row["steady_windows"] == ["6-15", "16-25", "26-35", "36-45"]
    assert (row["steady_first_step"], row["steady_last_step"], row["steady_steps"]) == (6, 45, 40)
    assert row["unlogged_steps_after_last_window"] == 0


def test_tokens_per_s_is_tokens_over_summed_window_times():
    row = summarize(SAMPLE)
    per_rank_step = 32 * 2048 / 2
    for rank, tps in ((0, [69876, 70102, 69954, 70031]), (1, [69873, 70099, 69951, 70028])):
        time = sum(10 * per_rank_step / t for t in tps)
        assert row["tokens_per_s_per_rank"][str(rank)] == pytest.approx(40 * per_rank_step / time, rel=1e-12)
    assert row["tokens_per_s"] == pytest.approx(sum(row["tokens_per_s_per_rank"].values()))
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
    assert row["step_time_s"] == pytest.approx(65536 / row["tokens_per_s"])


def test_mfu_both_ways():
    row = summarize(SAMPLE)
    assert row["flops_per_token_ours"] == FPT_OURS == 6_760_722_432
    assert row["flops_per_token_torchtitan"] == FPT_TT == 7_314_370_560
    # its logged tflops / tps agree with the formula (rounding of the printed values only)
    assert row["flops_per_token_torchtitan_logged"] == pytest.approx(FPT_TT, rel=1e-5)
    tps = row["tokens_per_s_per_gpu"]
    assert row["mfu"] == pytest.approx(tps * FPT_OURS / 989e12)
    assert row["mfu_torchtitan"] == pytest.approx(tps * FPT_TT / 989e12)
    assert row["mfu_torchtitan"] / row["mfu"] == pytest.approx(FPT_TT / FPT_OURS) == pytest.approx(1.0819, abs=1e-4)
    # its own per-window mfu (percent) brackets the aggregate
    logged = row["mfu_torchtitan_logged_pct"]
    assert min(logged) / 100 - 1e-4 <= row["mfu_torchtitan"] <= max(logged) / 100 + 1e-4


def test_params_and_memory():
    row = summarize(SAMPLE)
    assert row["params"] == row["params_ours"] == 1_100_048_384 and row["params_match"] is True
    assert row["peak_mem_gib"] == 46.918  # max over ranks of max_memory_allocated
    assert row["peak_reserved_gib"] == 52.33
    assert row["tt_logged_max_reserved_gib"] == 52.33


def test_single_gpu_plain_log():
    row = summarize(single_rank_plain(SAMPLE), mode="single", gpus=1)
    assert row["status"] == "ok"
    assert row["tokens_per_s_source"] == "rank 0's steady tokens/s"
    time = sum(10 * 65536 / t for t in (69876, 70102, 69954, 70031))
    assert row["tokens_per_s"] == pytest.approx(40 * 65536 / time, rel=1e-12)
    assert row["tokens_per_s_per_gpu"] == row["tokens_per_s"]
    assert row["trainer_logged"]["accum"] == 2
    assert row["parallelism"].startswith("1 GPU")


def test_default_log_freq_windows_start_after_the_warmup():
    """Unaligned logging (torchtitan's own: 1, 10, 20, ..., 40; step 45 not logged): the windows that start
    after the warm-up are 11-40, and the unlogged tail is reported."""
    text = single_rank_plain(SAMPLE)
    for old, new in (("step:  5 ", "step: 10 "), ("step: 15 ", "step: 20 "), ("step: 25 ", "step: 30 "),
                     ("step: 35 ", "step: 40 ")):
        text = text.replace(old, new)
    text = "\n".join(line for line in text.splitlines() if "step: 45 " not in line)
    row = summarize(text, mode="single", gpus=1)
    assert row["steady_windows"] == ["11-20", "21-30", "31-40"]
    assert row["steady_steps"] == 30
    assert row["unlogged_steps_after_last_window"] == 5
    assert row["status"] == "incomplete"


def test_failed_run_still_gives_a_row():
    text = "\n".join(SAMPLE.splitlines()[:40]) + (
        "\n[rank0]:Traceback (most recent call last):\n"
        "[rank0]:torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.91 GiB\n")
    text = "\n".join(line for line in text.splitlines() if " step: " not in parse.ANSI.sub("", line))
    row = summarize(text)
    assert row["status"] == "failed"
    assert "Traceback" in row["message"] or "OutOfMemoryError" in row["message"]
    assert "tokens_per_s" not in row and row["gpu"] == "NVIDIA H100 80GB HBM3"


def test_cli_writes_the_json_beside_ours(tmp_path):
    ours = tmp_path / "summary.json"
    ours.write_text(json.dumps({"run": "fsdp", "status": "ok", "world_size": 2, "tokens_per_s": 139093.0,
                                "tokens_per_s_per_gpu": 69546.5, "mfu": 0.4754, "peak_flops": 989e12,
                                "peak_mem_gib": 50.59, "spec": {"micro_batch_size": 16},
                                "environment": {"gpu_name": "NVIDIA H100 80GB HBM3"}}))
    versions = tmp_path / "versions.json"
    versions.write_text(json.dumps({"torch": "2.11.0+cu130", "torchtitan": "0.2.2", "gpus": ["NVIDIA H100 80GB HBM3"]}))
    out = tmp_path / "baselines" / "torchtitan_fsdp.json"
    res = subprocess.run([sys.executable, str(HERE / "parse.py"), "--log", str(HERE / "sample_log.txt"),
                          "--mode", "fsdp", "--gpus", "2", "--out", str(out), "--ours", str(ours),
                          "--versions", str(versions), "--command", "torchrun --nproc_per_node 2 ...",
                          "--wall", "91.5"], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["status"] == "ok"
    row = json.loads(out.read_text())
    # the HF Trainer baseline's keys (benchmarks/hf_trainer.py), and the peer's own
    for key in ("kind", "compile", "optim", "steps", "steady_steps", "tokens_per_s", "mfu", "peak_mem_gib",
                "train_loss", "wall_s", "gpu", "torch", "torchtitan", "mfu_torchtitan", "tokens_per_s_per_gpu",
                "command", "versions", "mfu_formulas"):
        assert key in row, key
    assert row["kind"] == "torchtitan" and row["torch"] == "2.11.0+cu130" and row["wall_s"] == 91.5
    o = row["ours_same_call"]
    assert o["micro_batch_size"] == 16 and o["gpu"] == "NVIDIA H100 80GB HBM3"
    assert o["torchtitan_over_ours_tokens_per_s"] == pytest.approx(row["tokens_per_s"] / 139093.0)
    assert o["mfu_torchtitan_formula"] == pytest.approx(69546.5 * FPT_TT / 989e12)


def test_missing_log_gives_a_failed_row(tmp_path):
    out = tmp_path / "tt.json"
    subprocess.run([sys.executable, str(HERE / "parse.py"), "--log", str(tmp_path / "none.log"), "--mode", "single",
                    "--gpus", "1", "--out", str(out), "--ours", str(tmp_path / "missing.json")], check=True,
                   capture_output=True)
    row = json.loads(out.read_text())
    assert row["status"] == "failed" and "no log" in row["message"]
    assert row["ours_same_call"]["status"] == "missing"


def ours_summary(path: Path, finished_at: float, gpu: str = "NVIDIA H100 80GB HBM3") -> Path:
    path.write_text(json.dumps({"run": "single", "status": "ok", "world_size": 1, "tokens_per_s": 72000.0,
                                "tokens_per_s_per_gpu": 72000.0, "peak_flops": 989e12, "peak_mem_gib": 65.6,
                                "finished_at": finished_at, "spec": {"micro_batch_size": 16},
                                "environment": {"gpu_name": gpu}}))
    return path


@pytest.mark.parametrize("finished_before,gpu,why", [
    (40.0, "NVIDIA H100 80GB HBM3", None),
    (7200.0, "NVIDIA H100 80GB HBM3", "finished 7,200 s before torchtitan started"),
    (-30.0, "NVIDIA H100 80GB HBM3", "finished -30 s before torchtitan started"),
    (40.0, "NVIDIA H200", "our run trained on NVIDIA H200, torchtitan on NVIDIA H100 80GB HBM3"),
])
def test_ours_is_kept_only_from_torchtitans_session(tmp_path, finished_before, gpu, why):
    """A run of ours is set beside torchtitan's only where it trained in the same session: on the same card
    model, finished at most the report's session gap before torchtitan started (a run left in OURS_RUNS by an
    earlier session is named, with the reason, and its numbers left out)."""
    started = 1796658928.4
    ours = ours_summary(tmp_path / "summary.json", started - finished_before, gpu)
    out = tmp_path / "tt.json"
    subprocess.run([sys.executable, str(HERE / "parse.py"), "--log", str(HERE / "sample_log.txt"), "--mode", "fsdp",
                    "--gpus", "2", "--out", str(out), "--ours", str(ours), "--started", str(started)],
                   check=True, capture_output=True)
    o = json.loads(out.read_text())["ours_same_call"]
    assert o["run"] == "single"
    if why is None:
        assert o["status"] == "ok" and o["tokens_per_s"] == 72000.0
    else:
        assert o["status"] == "other session" and why in o["message"] and "tokens_per_s" not in o


def test_the_report_sets_torchtitan_beside_ours_of_its_session_only(tmp_path):
    """peers.csv takes the run in the torchtitan file only where it trained in torchtitan's session; else this
    study's run of the same strategy, saying so."""
    import pandas as pd

    from llmpar.analysis.derive import peers_table

    metrics = pd.DataFrame([{"run": "single", "strategy": "single", "world_size": 1, "status": "ok",
                             "tokens_per_s_per_gpu": 72000.0, "peak_mem_gib": 65.6},
                            {"run": "fast", "strategy": "single", "world_size": 1, "status": "ok",
                             "tokens_per_s_per_gpu": 79000.0, "peak_mem_gib": 55.2}])
    summaries = [{"flops_per_token": 6.76e9, "peak_flops": 989e12}]
    tt = {"kind": "torchtitan", "mode": "single", "status": "ok", "gpus": 1, "tokens_per_s": 70000.0,
          "tokens_per_s_per_gpu": 70000.0}
    for same_call, run, where in (
            ({"run": "fast", "status": "ok", "tokens_per_s_per_gpu": 79000.0, "peak_mem_gib": 55.2}, "fast",
             "ours in the same session"),
            ({"run": "fast", "status": "other session", "message": "..."}, "single", "this study's run"),
            ({"summary": "runs/fast/summary.json", "status": "missing"}, "single", "this study's run")):
        (tmp_path / "torchtitan_single.json").write_text(json.dumps({**tt, "ours_same_call": same_call}))
        row = peers_table(tmp_path, metrics, summaries).iloc[0]
        assert (row["ours_run"], row["ours_from"]) == (run, where)
        assert row["ours_over_peer"] == pytest.approx(metrics.set_index("run").loc[run, "tokens_per_s_per_gpu"]
                                                      / 70000.0)
