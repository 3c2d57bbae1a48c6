"""The report's header, its batch-size sweep section and its same-model finding, from the committed raw runs: the
corpus named with its kind and size, the training size when runs differ in batch, B_crit beside B_simple, and
final losses compared among the runs of the baseline's batches only."""

from __future__ import annotations

import html
import re

import pandas as pd
import pytest

from llmpar.analysis import findings
from llmpar.analysis.aggregate import aggregate
from llmpar.analysis.batch_sweep import is_sweep, write_tables
from llmpar.analysis.report import (
    batch_line,
    compared_steps,
    headline,
    reached_target,
    sweep_context,
    sweep_source,
)
from llmpar.config import load_yaml, prepare
from llmpar.data.describe import describe_study, repetition
from llmpar.io import read_json, read_jsonl
from llmpar.paths import REPO_ROOT


def test_corpus_line_from_config_and_tokens():
    tokens = {"tokens": {"train": 4_272_800, "val": 87_200}, "vocab_size": 660, "tokenizer_model": "BPE"}
    line = describe_study({"source": "synthetic", "synthetic": {"documents": 20000, "words_per_document": 200}},
                          {"kind": "bpe"}, None, tokens)
    assert line.startswith("synthetic: Markov chain") and "4.3 M train / 87,200 val tokens (BPE 660)" in line
    assert line.endswith(", synthetic")
    debian = describe_study({"source": "debian", "debian": {"packages": [{"name": "a"}, {"name": "b"}]}},
                            {"kind": "bpe"}, None, tokens)
    assert debian.startswith("real text: 2 Debian documentation packages") and debian.endswith("not synthetic")


def test_repetition_says_whether_a_token_is_seen_twice():
    assert "no token is seen twice" in repetition([10, 40], 100) and "40%" in repetition([10, 40], 100)
    assert "goes 2.50 times through" in repetition([250], 100)


def test_batch_line_gives_the_range_when_runs_differ():
    cfg = {"model": {"seq_len": 512}, "train": {"global_batch": 32, "steps": 40, "stop_at_target": True,
                                                "target_loss": 6.15}}
    same = pd.DataFrame({"global_batch": [32, 32], "steps_completed": [40, 40]})
    assert batch_line({**cfg, "train": {**cfg["train"], "stop_at_target": False}}, same) == \
        "one global batch of 32 sequences × 512 tokens per step, 40 steps"
    mixed = pd.DataFrame({"global_batch": [8, 256], "steps_completed": [512, 106]})
    assert batch_line(cfg, mixed) == ("global batches of 8 to 256 sequences × 512 tokens per step, one per run, "
                                      "106 to 512 steps (each run until its validation loss reached 6.15)")


def test_the_recorded_sweep_puts_b_crit_beside_b_simple(tmp_path):
    """The committed H200 sweep: every batch reached the target, and the section reports the fit's B_crit and
    the measured B_simple with their ratio, said to agree within a factor of 2 only if they do."""
    cfg = prepare(load_yaml(REPO_ROOT / "configs" / "batch-sweep.yaml"))
    assert is_sweep(cfg)
    write_tables(cfg, REPO_ROOT / "results" / cfg["study"] / "runs", tmp_path / "t.csv", tmp_path / "f.csv", tmp_path)
    ctx = sweep_context({"table": tmp_path / "t.csv", "fit": tmp_path / "f.csv",
                         "figure": tmp_path / "batch_sweep.png"}, REPO_ROOT / "report" / "captions", 9)
    fit = ctx["fit"]
    assert fit["batches"] == fit["reached"] == len(cfg["runs"]) >= 6
    assert ctx["ratio"] == pytest.approx(fit["b_crit"] / fit["b_simple"], rel=1e-3)  # 4 significant digits
    assert ctx["agree"] == (0.5 <= ctx["ratio"] <= 2)
    assert "gb256" in ctx["table"] and ctx["figure"]["caption"]


def study_of(config_name: str, tmp_path) -> findings.Study:
    """A committed study's findings context, its metrics aggregated afresh from its raw runs."""
    config = prepare(load_yaml(REPO_ROOT / "configs" / config_name))
    runs_dir = REPO_ROOT / "results" / config["study"] / "runs"
    metrics = aggregate(runs_dir, list(config["runs"]), config["baseline"], tmp_path,
                        config["train"]["pollux_reference_batch"])
    return findings.Study(config, metrics, pd.DataFrame(), pd.DataFrame(), pd.DataFrame())


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_same_model_compares_only_the_runs_of_the_baselines_batches(tmp_path):
    """A batch-size sweep's runs train other batches than its baseline by design: the finding names them and
    compares none of their losses. A run given the baseline's batch and steps is compared again, and a run that
    trains another model at those batches is called so."""
    sweep = study_of("batch-sweep.yaml", tmp_path)
    found = text(findings.same_model(sweep).html)
    assert "not compared" in found and "do not train the same model" not in found and "lie within" not in found
    assert all(run in found for run in sweep.ok.index if run != "gb32")
    metrics = sweep.metrics.copy()
    base = metrics[metrics["run"] == "gb32"].iloc[0]
    at_base = metrics["run"] == "gb12"
    metrics.loc[at_base, ["global_batch", "steps_completed"]] = base["global_batch"], base["steps_completed"]
    compared = text(findings.same_model(findings.Study(sweep.config, metrics, *[pd.DataFrame()] * 3)).html)
    gap = metrics.loc[at_base, "final_loss_rel_gap"].item()
    assert gap > findings.LOSS_GAP_FLAG and "gb12 differ by more than 1 %" in compared
    assert "not compared" in compared and "gb12," not in compared.split(";")[-1]


@pytest.mark.parametrize("config_name, column", [("gpu1-1b-kernels.yaml", True), ("batch-sweep.yaml", False)])
def test_the_step_gap_is_a_column_only_where_a_run_besides_the_baseline_has_one(tmp_path, config_name, column):
    """A batch sweep's runs train other batches than its baseline: no step-gap column, where only the baseline's
    0 would fill it; a study of one training shows it."""
    st = study_of(config_name, tmp_path)
    assert ("step gap" in headline(st)) is column and compared_steps(st) is column


@pytest.mark.parametrize("config_name, column, reason", [
    ("gpu1-1b-kernels.yaml", False, "every run: the study sets no target loss (train.target_loss)"),
    ("gpu1-1b.yaml", False, "single: its validation loss stayed above the target 5 (last 5.7)"),
    ("h200-1b.yaml", True, None),
])
def test_time_to_target_is_a_column_only_where_a_run_reached_it(tmp_path, config_name, column, reason):
    """The at-a-glance table has no column that is empty for every run: time to target shows where some run
    reached the study's target, and the runs without it are listed with why (no target, or not reached)."""
    st = study_of(config_name, tmp_path)
    assert ("s to target" in headline(st)) is column and reached_target(st) is column
    why = dict(findings.lacking(st, []))
    assert ([text(w) for w in why["time to target"]] == [reason]) if reason else "time to target" not in why


def test_the_time_to_target_names_the_sweep_it_comes_from_and_whether_its_model_is_the_studys():
    """The plan's time to a target comes from a sweep's fit; the report names that sweep's model, corpus and target
    from its config, and the transfer assumption only where the model or corpus is not the study's own."""
    kernels = prepare(load_yaml(REPO_ROOT / "configs" / "gpu1-1b-kernels.yaml"))
    sweep = prepare(load_yaml(REPO_ROOT / "configs" / "batch-sweep.yaml"))
    source = sweep_source(kernels)
    assert source == {"study": sweep["study"], "params_m": 134, "seq_len": 512, "corpus": "debian",
                      "target_loss": sweep["train"]["target_loss"], "own": False}
    assert sweep_source({**sweep, "sweep_from": "configs/batch-sweep.yaml"})["own"] is True


def test_same_model_names_the_largest_step_gap_of_the_steps_records(tmp_path):
    """The finding's per-step gap is the largest over the runs' steady steps of their steps.jsonl losses against
    the baseline's, computed here from the records directly."""
    st = study_of("gpu1-1b-kernels.yaml", tmp_path)
    runs = REPO_ROOT / "results" / "h100-1b-kernels" / "runs"
    base = {r["step"]: r["loss"] for r in read_jsonl(runs / "single" / "steps.jsonl")}
    gaps = {}
    for run in st.ok.index.drop("single"):
        summary = read_json(runs / run / "summary.json")
        first = summary["steps_completed"] - summary["steady_steps"] + 1
        for r in read_jsonl(runs / run / "steps.jsonl"):
            if r["step"] >= first:
                gaps[(run, r["step"])] = abs(r["loss"] - base[r["step"]]) / base[r["step"]]
    (run, step), largest = max(gaps.items(), key=lambda kv: kv[1])
    found = text(findings.same_model(st).html)
    assert f"by up to {100 * largest:.2f} % ({run}, step {step})" in found


@pytest.mark.parametrize("value, shown", [(0.0123, "1.23 %"), (5e-5, "0.01 %"), (1.9e-8, "1.9 × 10⁻⁶ %"),
                                          (4.94e-5, "4.9 × 10⁻³ %"), (0.0, "0.00 %"), (None, "–")])
def test_a_loss_gap_below_two_decimals_keeps_its_size(value, shown):
    """An fp32 run's gap to the baseline (10⁻⁷ relative) is printed with its power of ten, not as 0.00 %."""
    assert findings.rel_gap(value) == shown
