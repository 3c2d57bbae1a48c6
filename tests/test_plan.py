"""The plan (llmpar.plan) against the committed GPU runs, and where it is used: the launcher's refusal
before any process starts, and micro_batch_size: auto."""

from __future__ import annotations

import json

import pytest

from llmpar import plan, preflight, run_cli
from llmpar.cli import plan_study
from llmpar.config import ConfigError, load_yaml, prepare, run_config
from llmpar.errors import ExpectedFailure
from llmpar.paths import REPO_ROOT
from llmpar.plan import calibration

STUDIES = [("configs/h200-1b.yaml", "h200"), ("configs/gpu2-1b.yaml", "h100"), ("configs/gpu4-1b.yaml", "h100"),
           ("configs/gpu1-1b.yaml", "h200"), ("configs/gpu1-1b-levers.yaml", "h200"),
           ("configs/gpu1-1b-kernels.yaml", "h100")]
H100_80GB = ("NVIDIA H100 80GB HBM3", 81559 * 2**20)  # nvidia-smi (benchmarks/results/test_gpu_h100x2_versions.txt)


def study_rows(config: str, card: str) -> tuple[str, list[dict]]:
    cfg = prepare(load_yaml(REPO_ROOT / config))
    return cfg["study"], calibration.check_study(cfg, card, REPO_ROOT / "results" / cfg["study"] / "runs")


@pytest.mark.parametrize("config,card", STUDIES)
def test_recorded_runs_meet_the_bounds(config, card):
    """Every modelled run within 10 % (peak memory) and 15 % (step time) of what it measured; the listed
    misses still miss (a fix must take them off the list)."""
    study, rows = study_rows(config, card)
    assert {r["run"] for r in rows} == set(prepare(load_yaml(REPO_ROOT / config))["runs"])  # every run recorded ok
    bad = []
    for row in rows:
        if not row["bounded"]:
            continue
        for quantity, ok in calibration.within_bounds(row).items():
            known = (study, row["run"], quantity) in calibration.KNOWN_MISSES
            if ok == known:
                err = row["peak_error" if quantity == "memory" else "step_error"]
                bad.append(f"{row['run']} {quantity} {err:+.1%} ({'listed as a miss' if known else 'out of bound'})")
    assert not bad, bad


def test_fitted_constants_reproduce_their_runs():
    """The constants fitted on the single-GPU runs give those runs back (cards.yaml says which)."""
    for config, card, runs in (("configs/h200-1b.yaml", "h200", {"single"}),
                               ("configs/gpu2-1b.yaml", "h100", {"single", "single-mb8"})):
        _, rows = study_rows(config, card)
        for row in (r for r in rows if r["run"] in runs):
            assert abs(row["step_error"]) < 0.005 and abs(row["peak_error"]) < 0.02, row


def test_plan_script_writes_the_table(tmp_path):
    out = tmp_path / "plan.csv"
    text = plan_study(str(REPO_ROOT / "configs/h200-1b.yaml"), "h200", str(out))
    _, rows = study_rows("configs/h200-1b.yaml", "h200")
    bounded = sum(r["bounded"] for r in rows)  # single and the torch pipeline; the others not modelled
    assert bounded == 2 and f"{bounded} of {bounded} modelled runs within both bounds" in text
    header = out.read_text().splitlines()[0].split(",")
    assert {"run", "predicted_peak_gib", "measured_peak_gib", "peak_error", "predicted_step_s",
            "measured_step_s", "step_error"} <= set(header)
    from llmpar.metrics.definitions import DEFINITIONS

    assert all(c in DEFINITIONS for c in header if c.startswith(("predicted", "measured")) or "error" in c)


def test_plan_script_defaults_to_the_study_card(tmp_path):
    """Without a card, the study's train.card (h100 for the 2-GPU preset); a study that names none (the CPU
    default) is refused rather than predicted on a GPU card."""
    from llmpar.errors import UserError

    text = plan_study(str(REPO_ROOT / "configs/gpu2-1b.yaml"), out=str(tmp_path / "plan.csv"))
    assert "on NVIDIA H100 80GB HBM3" in text
    with pytest.raises(UserError, match="names no train.card"):
        plan_study(str(REPO_ROOT / "config.yaml"), out=str(tmp_path / "cpu.csv"))
    assert not (tmp_path / "cpu.csv").exists()


def ddp_rc(micro_batch_size: int) -> dict:
    raw = load_yaml(REPO_ROOT / "configs/gpu2-1b.yaml")
    raw["runs"]["ddp"]["micro_batch_size"] = micro_batch_size
    return run_config(prepare(raw), "ddp")


@pytest.fixture
def on_two_h100s(monkeypatch):
    monkeypatch.setattr(preflight, "uses_cuda", lambda rc: True)
    monkeypatch.setattr(preflight, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(preflight, "gpu_name_and_memory", lambda: H100_80GB)


def test_launcher_refuses_ddp_at_micro_batch_16_on_80gb(on_two_h100s):
    """The 1.1B preset's DDP at micro-batch 16 ran out of memory on 2 x H100 80 GB (configs/gpu2-1b.yaml): the
    plan predicts 74.0 GiB and the launcher refuses it with the predicted and available memory; at 8 it
    measured 52.6 GiB and is let through."""
    with pytest.raises(ExpectedFailure) as exc:
        preflight.check_fits(ddp_rc(16), 660, 2)
    message = exc.value.message
    assert exc.value.status == "invalid"
    assert "predicted peak memory 7" in message and "79.6 GiB of NVIDIA H100 80GB HBM3" in message, message
    preflight.check_fits(ddp_rc(8), 660, 2)


def test_record_invalid_writes_the_prediction(on_two_h100s, tmp_path, tiny_tokens):
    """The workflow's --record-invalid path: a summary with status invalid and the prediction, no process."""
    out = tmp_path / "ddp"
    code = run_cli.main(["--run-config", json.dumps(ddp_rc(16)), "--tokens", str(tiny_tokens), "--out", str(out),
                        "--record-invalid"])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["status"] == "invalid" and "predicted peak memory" in summary["message"]


def test_auto_micro_batch_picks_what_the_study_measured():
    """auto on an 80 GB card: single 16 (65.6 GiB measured), DDP 8 (16 ran out of memory), FSDP2 16."""
    raw = load_yaml(REPO_ROOT / "configs/gpu2-1b.yaml")
    for name in ("single", "ddp", "fsdp"):
        raw["runs"][name]["micro_batch_size"] = "auto"
    runs = prepare(raw)["runs"]
    assert [runs[n]["micro_batch_size"] for n in ("single", "ddp", "fsdp")] == [16, 8, 16]
    raw["train"]["card"] = None
    with pytest.raises(ConfigError, match="auto needs train.card"):
        prepare(raw)


def test_cpu_prediction_needs_no_card():
    """The CPU check: tensors only (fp32, eager), no card constants, no step time."""
    cfg = prepare({"runs": {"ddp": {"strategy": "data_parallel"}}, "baseline": "ddp", "train": {"device": "cpu"}})
    rc = run_config(cfg, "ddp")
    pred = plan.predict(rc["model"], 512, rc["run"], rc["train"], None)
    assert 0 < pred["peak_gib"] < 0.1 and "step_s" not in pred


def test_plan_script_predicts_runs_not_yet_recorded(tmp_path):
    """Before anything ran (a study with no runs under results/), every run is predicted on the card, and
    one predicted beyond the card's memory says it does not fit."""
    raw = load_yaml(REPO_ROOT / "configs/gpu4-1b.yaml")
    raw["study"] = "not-run-yet"
    raw["runs"]["ddp-mb8x2"] = {"strategy": "data_parallel", "gpus_per_node": 2, "micro_batch_size": 16}
    config = tmp_path / "study.yaml"
    config.write_text(json.dumps(raw))
    text = plan_study(str(config), out=str(tmp_path / "plan.csv"))
    assert "no ok run recorded" in text and not (tmp_path / "plan.csv").exists()
    table = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert set(table) == set(raw["runs"])
    assert table["ddp-mb8x2"][2] == "no" and table["fsdp"][2] == "yes"  # DDP at 16 overflowed 80 GB
