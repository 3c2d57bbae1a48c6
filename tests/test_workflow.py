"""The whole DAG on a small study: outputs, and only stale outputs rebuild."""

import copy
import json

import pandas as pd
import pytest
from conftest import BASE_CONFIG
from workflow_util import planned_jobs, snakemake, write_config

from llmpar.analysis.aggregate import read_table
from llmpar.analysis.figure_list import FIGURES, PLAN_FIGURES, caption_file, study_figures
from llmpar.analysis.figures import make_figures
from llmpar.analysis.report import _fmt
from llmpar.paths import REPO_ROOT

pytestmark = pytest.mark.slow

STUDY = dict(copy.deepcopy(BASE_CONFIG), study="wf")
STUDY["runs"] = {
    "single": {"strategy": "single"},
    "ddp": {"strategy": "data_parallel", "gpus_per_node": 2},
}
# the figures of a study whose runs span 1 and 2 processes (the workflow's FIGURE_NAMES)
STUDY_FIGURES = study_figures(scaling=True)


def test_every_figure_is_named_once_with_a_caption():
    """One list names the figures: a study at one GPU count draws eight, runs at several GPU counts (or
    compared studies) add scaling, the plan draws its own two; every one has a caption file for the report."""
    assert len(study_figures(scaling=False)) == 8 and "scaling" not in study_figures(scaling=False)
    assert set(STUDY_FIGURES) == {*study_figures(scaling=False), "scaling"}
    assert set(FIGURES) == {*STUDY_FIGURES, *PLAN_FIGURES}
    captions = REPO_ROOT / "report" / "captions"
    assert all((captions / caption_file(name)).is_file() for name in FIGURES)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    write_config(work, STUDY)
    snakemake(work)
    return work


def test_study_outputs_are_complete(study):
    res = study / "results" / "wf"
    metrics = pd.read_csv(res / "metrics.csv")
    assert set(metrics["run"]) == {"single", "ddp"}
    for col in ("run", "strategy", "world_size", "nodes", "gpus_per_node", "status", "wall_time_s", "tokens_per_s",
                "peak_mem_gib", "final_val_loss", "time_reduction_x", "throughput_increase_x", "memory_reduction_x"):
        assert col in metrics.columns, col
    assert (metrics["status"] == "ok").all() and (metrics["tokens_per_s"] > 0).all()
    steps = pd.read_csv(res / "steps.csv")
    assert {"run", "step", "loss", "tokens", "elapsed_s"} <= set(steps.columns)
    assert len(steps) == 2 * STUDY["train"]["steps"] and not steps.duplicated(["run", "step"]).any()
    html = (study / "report" / "wf" / "report.html").read_text()
    assert "not calibrated for CPU" in html and not (res / "plan.csv").exists()  # no card, no predictions
    summary = json.loads((res / "runs" / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "ok"


def test_every_run_counts_the_tokens_it_trained(study):
    """Tokens and throughput against a count of our own: every run trains global_batch x seq_len tokens per
    step whatever its layout (DDP's ranks together as many as single), and tokens_per_s is the steady
    steps' tokens over their summed step times in the run's own steps.jsonl."""
    from conftest import assert_counts

    runs = study / "results" / "wf" / "runs"
    for run in ("single", "ddp"):
        summary = json.loads((runs / run / "summary.json").read_text())
        assert_counts(summary, [json.loads(line) for line in (runs / run / "steps.jsonl").read_text().splitlines()],
                      STUDY)
    steps = read_table(study / "results" / "wf" / "steps.csv")
    per_run = steps.groupby("run")["tokens"].max()
    assert per_run["ddp"] == per_run["single"] == STUDY["train"]["steps"] * STUDY["train"]["global_batch"] * \
        STUDY["model"]["seq_len"]


def test_ratios_are_the_defining_quotients(study):
    m = read_table(study / "results" / "wf" / "metrics.csv").set_index("run")
    base, ddp = m.loc["single"], m.loc["ddp"]
    for col in ("time_reduction_x", "throughput_increase_x", "memory_reduction_x", "scaling_efficiency"):
        assert base[col] == 1.0, col
    assert base["final_loss_rel_gap"] == 0.0
    assert ddp["time_reduction_x"] == pytest.approx(base["wall_time_s"] / ddp["wall_time_s"], rel=1e-12)
    assert ddp["throughput_increase_x"] == pytest.approx(ddp["tokens_per_s"] / base["tokens_per_s"], rel=1e-12)
    assert ddp["memory_reduction_x"] == pytest.approx(base["peak_mem_gib"] / ddp["peak_mem_gib"], rel=1e-12)
    gap = abs(ddp["final_loss"] - base["final_loss"]) / base["final_loss"]
    assert ddp["final_loss_rel_gap"] == pytest.approx(gap, rel=1e-9, abs=1e-15) and gap < 1e-4
    # ddp's micro-batches (4 sequences) differ from single's (8): no single-process reference
    assert ddp["micro_batch_size"] != base["micro_batch_size"] and pd.isna(ddp["scaling_efficiency"])


def _bars(fig) -> dict[str, float]:
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    return {labels[round(p.get_y() + p.get_height() / 2)]: p.get_width() for p in ax.patches if p.get_height() > 0}


def _lines(fig) -> dict[str, list[list[float]]]:
    ax = fig.axes[0]
    drawn = [line.get_xydata().tolist() for line in ax.lines if len(line.get_xydata())]
    return dict(zip([t.get_text() for t in ax.get_legend().get_texts()], drawn))


def test_figures_plot_the_tables(study, tmp_path):
    """The figures drawn again from the study's tables: the same PNG files as the workflow wrote, and
    their axes hold the tables' values (bars: tokens/s and peak memory per run; lines: each run's
    loss per step against elapsed time and tokens)."""
    res = study / "results" / "wf"
    figs = make_figures(res / "metrics.csv", res / "steps.csv", res / "samples.csv", res / "runs.csv",
                        res / "scaling.csv", tmp_path, STUDY_FIGURES)
    for name in STUDY_FIGURES:
        assert (tmp_path / f"{name}.png").read_bytes() == (res / "figures" / f"{name}.png").read_bytes(), name
        assert (res / "figures" / f"{name}.svg").read_text().rstrip().endswith("</svg>")
    m = read_table(res / "metrics.csv").set_index("run")
    assert _bars(figs["throughput"]) == m["tokens_per_s"].to_dict()
    assert _bars(figs["memory"]) == m["peak_mem_gib"].to_dict()
    noise = m["gradient_noise_scale_mean"].dropna()  # ddp (2 replicas) measures it, single cannot
    assert list(noise.index) == ["ddp"] and _bars(figs["noise_scale"]) == noise.to_dict()
    steps = read_table(res / "steps.csv")
    for name, x in (("loss_vs_time", "elapsed_s"), ("loss_vs_tokens", "tokens")):
        lines = _lines(figs[name])
        assert set(lines) == {"single", "ddp"}
        for run, xy in lines.items():
            assert xy == steps[steps["run"] == run][[x, "loss"]].values.tolist(), (name, run)


def test_report_shows_the_tables_values(study):
    """The HTML report's seed table shows each run's ratios as metrics.csv has them, and embeds every
    figure the study made."""
    html = (study / "report" / "wf" / "report.html").read_text()
    m = read_table(study / "results" / "wf" / "metrics.csv").set_index("run")
    for run in ("single", "ddp"):
        cells = "".join(f'<td class="num">{_fmt(m.loc[run, c])}</td>' for c in
                        ("time_reduction_x", "throughput_increase_x", "memory_reduction_x"))
        assert f"<td>{run}</td>" in html and cells in html, (run, cells)
    assert html.count("data:image/png;base64,") == len(STUDY_FIGURES) and "git_commit" in html


def test_second_run_has_nothing_to_do(study):
    assert planned_jobs(study) == {}


def test_a_missing_or_damaged_run_record_is_trained_again(study):
    """single's summary deleted and ddp's steps.jsonl torn mid-line: a plain run retrains both (resuming
    where they have checkpoints) and rebuilds everything made from them, though the tables are newer than
    the records left. The damaged record's summary is set aside (summary.json.damaged), never aggregated."""
    import os

    runs = study / "results" / "wf" / "runs"
    kept = {path: (path.read_bytes(), path.stat()) for path in (runs / "single" / "summary.json",
                                                                runs / "ddp" / "steps.jsonl")}
    try:
        (runs / "single" / "summary.json").unlink()
        steps = runs / "ddp" / "steps.jsonl"
        steps.write_text(steps.read_text()[:100])
        assert planned_jobs(study) == {"train": 2, "aggregate": 1, "derive": 1, "figures": 1, "html_report": 1,
                                       "all": 1}
        assert (runs / "ddp" / "summary.json.damaged").is_file() and not (runs / "ddp" / "summary.json").exists()
    finally:
        if (runs / "ddp" / "summary.json.damaged").is_file():
            (runs / "ddp" / "summary.json.damaged").replace(runs / "ddp" / "summary.json")
        for path, (data, stat) in kept.items():
            path.write_bytes(data)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(study) == {}


def test_changing_one_run_reruns_only_that_run(study):
    cfg = copy.deepcopy(STUDY)
    cfg["runs"]["ddp"]["micro_batches"] = 2
    write_config(study, cfg)
    try:
        assert planned_jobs(study) == {"train": 1, "aggregate": 1, "derive": 1, "figures": 1, "html_report": 1,
                                       "all": 1}
    finally:
        write_config(study, STUDY)


def test_changing_lr_reruns_every_training_job_and_no_data_job(study):
    cfg = copy.deepcopy(STUDY)
    cfg["train"]["lr"] = 0.002
    write_config(study, cfg)
    try:
        jobs = planned_jobs(study)
        assert jobs.get("train") == 2
        assert not {"corpus", "tokenizer", "tokenize"} & set(jobs)
    finally:
        write_config(study, STUDY)


def test_changing_data_reruns_everything_downstream(study):
    cfg = copy.deepcopy(STUDY)
    cfg["data"]["synthetic"]["documents"] = 301
    write_config(study, cfg)
    try:
        jobs = planned_jobs(study)
        assert jobs.get("corpus") == 1 and jobs.get("tokenize") == 1 and jobs.get("train") == 2
    finally:
        write_config(study, STUDY)


def test_snakemake_report(study):
    """Snakemake's own report (a zip-free HTML app) embeds the study's figures and their captions."""
    out = study / "report" / "wf" / "snakemake-report.html"
    snakemake(study, "--report", str(out))
    text = out.read_text()
    for name in STUDY_FIGURES:
        assert f"{name}.png" in text, name
    assert "throughput" in text and "metrics.csv" in text
    assert "System Message" not in text  # every caption is valid RST


def test_cpu_report_reads_in_chromium(study, tmp_path):
    """The CPU study's report, as the committed studies' (tests/test_report.py): nothing wider than the page
    at 1280 px, every figure captioned."""
    from report_browser import check, install_chromium

    if install_chromium() is None:
        pytest.skip("no chromium, and apt-get cannot install it here (not root, or no apt-get)")
    result = check(study / "report" / "wf" / "report.html", tmp_path)
    assert result["problems"] == [] and result["images"] == len(STUDY_FIGURES), result
