"""RESULTS.md's tables quote the committed records: every row that names a run, a probe variant or torchtitan
gives the numbers of one record of that name (a run's ``summary.json``, a probe's ``step`` row, a torchtitan
``torchtitan_single.json``), each to the digits the table prints, its ratios are those records' quotients, and its
loss gaps (the largest relative gap of its per-step losses over the stated steps but one, and that one's) are
those of its run's ``steps.jsonl`` against a committed run of the name the cell compares it with, its SM clock is
its run's median over the steady steps (``samples.jsonl``), its kernel times by category are its probe record's,
and its plan errors are the plan's for the section's preset.
The kernels study's headline holds on its records, as RESULTS.md and the README state it: `single` with every lever
at MFU >= 0.55 on an H100 through the workflow and >= 1.12 x the torchtitan run of its session."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from conftest import load_benchmark

from llmpar.analysis.derive import _commit as short_commit
from llmpar.io import read_json, read_jsonl
from llmpar.paths import REPO_ROOT

steady_clocks = load_benchmark("steady_clocks")
gpu_probe = load_benchmark("gpu_probe")

RESULTS_PAGE = REPO_ROOT / "RESULTS.md"
RECORD_ROOTS = (REPO_ROOT / "results", REPO_ROOT / "benchmarks" / "results")

# table column -> (record field, the digits the table prints after the point)
COLUMNS = {"tokens/s": ("tokens_per_s", 0), "per GPU": ("tokens_per_s_per_gpu", 0), "MFU": ("mfu", 3),
           "peak GiB": ("peak_mem_gib", 1), "final val loss": ("final_val_loss", 4), "final loss": ("final_loss", 4),
           "step s": ("step_s", 3), "batch": ("global_batch", 0), "steps (to target)": ("steps_completed", 0)}
RATIOS = {"× torchtitan": "torchtitan", "× `single`": "single"}
FASTEST = "fa4-op-bf16-master-quack-mlp-autotuned-quack-norm"
# a loss-gap cell's claims, ';'-separated: "[to REFERENCE ]≤ 1.23 %, [except ]−6.82 % at step 13"
GAP = re.compile(r"^(?:to (?P<ref>.+?) )?≤ (?P<max>\d+\.\d\d) %, (?:except )?(?P<exc>[−+]\d+\.\d\d) % "
                 r"at step (?P<step>\d+)$")


@functools.cache
def records() -> dict[str, list[dict]]:
    """Every committed record by the name a table gives it: runs by their directory, probe rows by their
    variant, torchtitan's runs as ``torchtitan`` (read once for all the tests)."""
    out: dict[str, list[dict]] = {}
    for root in RECORD_ROOTS:
        for path in root.rglob("summary.json"):
            rec = read_json(path)
            if "steady_time_s" in rec and rec.get("steady_steps"):
                rec["step_s"] = rec["steady_time_s"] / rec["steady_steps"]
            out.setdefault(path.parent.name, []).append({**rec, "path": path})
        for path in root.rglob("torchtitan_single.json"):
            out.setdefault("torchtitan", []).append({**read_json(path), "path": path})
        for path in root.rglob("*.jsonl"):
            for row in read_jsonl(path):
                if row.get("kind") == "step" and "tokens_per_s" in row:
                    out.setdefault(row["name"], []).append({**row, "path": path})
    return out


def number(cell: str) -> str | None:
    """The number a cell opens with (bold, thousands separators and a trailing note dropped)."""
    m = re.match(r"\**([−-]?[\d,]*\d(?:\.\d+)?)", cell.strip())
    return m.group(1).replace(",", "").replace("−", "-") if m else None


def table_rows(text: str) -> list[tuple[int, str, dict[str, str]]]:
    """(line, name, {column: cell}) of every body row of every table whose first column is a run or variant."""
    return [row for table in tables(text) for row in table]


def tables(text: str) -> list[list[tuple[int, str, dict[str, str]]]]:
    """The body rows (line, name, {column: cell}) of each table whose first column is a run or variant."""
    out, header = [], None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            out.append([])
        elif header[0] in ("run", "variant") and not set(cells[0]) <= set("- "):
            m = re.match(r"`([^`]+)`", cells[0])
            name = m.group(1) if m else cells[0].split()[0]
            out[-1].append((i, name, dict(zip(header, cells))))
    return [table for table in out if table]


def matches(rec: dict, quoted: dict[str, str]) -> bool:
    for column, value in quoted.items():
        field, digits = COLUMNS[column]
        if rec.get(field) is None or f"{float(rec[field]):.{digits}f}" != f"{float(value):.{digits}f}":
            return False
    return True


def mismatches(text: str, recs: dict[str, list[dict]]) -> list[str]:
    """The rows of ``text``'s tables that no record of their name gives, and the ratios no pair of records gives."""
    bad = []
    for line, name, cells in table_rows(text):
        quoted = {c: number(v) for c, v in cells.items() if c in COLUMNS and number(v) is not None}
        if not quoted:
            continue
        own = record_of(name, cells, recs)
        if own is None:
            bad.append(f"line {line}: {name} {quoted} is no committed record's ({len(recs.get(name, []))} of that "
                       "name)")
            continue
        for column, other in RATIOS.items():
            ratio = number(cells.get(column, ""))
            if ratio is None:
                continue
            ours = float(own["tokens_per_s"])
            if not any(f"{ours / float(r['tokens_per_s']):.3f}" == f"{float(ratio):.3f}" for r in recs.get(other, [])):
                bad.append(f"line {line}: {name} {column} {ratio} is not its tokens/s over a committed {other} run's")
    return bad


def record_of(name: str, cells: dict[str, str], recs: dict[str, list[dict]]) -> dict | None:
    """The committed record of ``name`` whose numbers a row quotes (None: none, or the row quotes no number)."""
    quoted = {c: number(v) for c, v in cells.items() if c in COLUMNS and number(v) is not None}
    return next((r for r in recs.get(name, []) if matches(r, quoted)), None) if quoted else None


@functools.cache
def step_losses(steps_file: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_jsonl(steps_file)}


def gap_holds(own: dict, ref: dict, claim: re.Match, steps: range) -> bool:
    """Whether ``own``'s losses against ``ref``'s over ``steps`` have the claim's largest gap (all steps but the
    claim's) and its gap at its step, relative to ``ref``'s loss, as the cell prints them."""
    a, b = (step_losses(r["path"].parent / "steps.jsonl") for r in (own, ref))
    gap = {s: 100 * (a[s] - b[s]) / b[s] for s in steps}
    step = int(claim["step"])
    if step not in gap:
        return False
    largest = max(abs(g) for s, g in gap.items() if s != step)
    return f"{largest:.2f}" == claim["max"] and f"{gap[step]:+.2f}" == claim["exc"].replace("−", "-")


def loss_gap_mismatches(text: str, recs: dict[str, list[dict]]) -> list[str]:
    """The loss-gap claims of ``text``'s tables that no committed pair of runs gives. The run compared with is
    the table's `single` (or the one the claim names: a run of another name, ``the first`` row's, or ``run of
    it``, another run of the row's name), any committed run of that name: the check holds each number to the
    losses of two records, not to one session's."""
    bad = []
    for table in tables(text):
        first = record_of(table[0][1], table[0][2], recs)
        for line, name, cells in table:
            column = next((c for c in cells if c.startswith("loss gap")), None)
            if column is None or cells[column] == "–":
                continue
            steps = re.search(r"steps (\d+)–(\d+)", column)
            own = record_of(name, cells, recs)
            for part in cells[column].split(";"):
                claim = GAP.match(part.strip())
                if not (claim and steps and own):
                    bad.append(f"line {line}: {name}: '{part.strip()}' is not a loss gap of a committed run's steps")
                    continue
                ref = claim["ref"] or "`single`"
                named = re.search(r"`([^`]+)`", ref)
                refs = ([first] if ref == "the first" else [r for r in recs[name] if r is not own]
                        if ref.endswith("run of it") else recs.get(named.group(1), []) if named else [])
                span = range(int(steps[1]), int(steps[2]) + 1)
                if not any(gap_holds(own, r, claim, span) for r in refs if (r["path"].parent / "steps.jsonl").exists()):
                    bad.append(f"line {line}: {name}: '{part.strip()}' holds against no committed run ({ref})")
    return bad


def clock_mismatches(text: str, recs: dict[str, list[dict]]) -> list[str]:
    """The SM clocks ``text``'s tables print that are not their run's median over its steady steps
    (benchmarks/steady_clocks.py on the run's samples)."""
    bad = []
    for line, name, cells in table_rows(text):
        if cells.get("SM clock", "–") == "–":
            continue
        own = record_of(name, cells, recs)
        median = steady_clocks.steady_clocks(own["path"].parent)["sm_clock_mhz_median"] if own else None
        if median is None or f"{median:,.0f} MHz" != cells["SM clock"]:
            bad.append(f"line {line}: {name}: SM clock {cells['SM clock']} is not its run's steady median ({median})")
    return bad


# a profile table's column -> the probe record's kernel categories it sums (its own per_step_s, or gpu_probe.py's
# --categorize of its longest kernels, whose "other" holds the kernels not listed too)
PROFILE_COLUMNS = {"GEMM s": ("gemm",), "attention s": ("attention",),
                   "elementwise, norm, loss s": ("triton (fused elementwise/norm/CE)", gpu_probe.ELEMENTWISE),
                   "optimizer s": ("optimizer",), "other s": ("other", "unlisted")}


def profile_mismatches(text: str, recs: dict[str, list[dict]]) -> list[str]:
    """The profile rows of ``text``'s tables whose seconds a step by kernel category are neither their probe
    record's ``per_step_s`` nor gpu_probe.py's categorisation of its kernels, to the printed digit."""
    bad = []
    for line, name, cells in table_rows(text):
        shown = {c: cells[c] for c in PROFILE_COLUMNS if c in cells}
        if not shown:
            continue
        own = record_of(name, cells, recs)
        readings = [own["profile"]["per_step_s"], gpu_probe.categorize(own["profile"])] if own else []
        def seconds(reading: dict, column: str) -> float:
            return sum(reading.get(k, 0) for k in PROFILE_COLUMNS[column])

        # to the printed digit, from categories recorded to four digits (their sum's own rounding: 0.00005 more)
        if not any(all(abs(seconds(r, c) - float(v)) <= 0.00055 for c, v in shown.items()) for r in readings):
            bad.append(f"line {line}: {name}: {shown} is neither its record's per_step_s nor its categorised kernels")
    return bad


def test_every_profile_row_is_its_probe_records():
    text = RESULTS_PAGE.read_text()
    assert sum(any(c in cells for c in PROFILE_COLUMNS) for _, _, cells in table_rows(text)) >= 10
    assert profile_mismatches(text, records()) == []
    assert len(profile_mismatches(text.replace("| 0.554 | 0.147 |", "| 0.545 | 0.147 |", 1), records())) == 1


def layout_mismatches(text: str, recs: dict[str, list[dict]]) -> list[str]:
    """The micro-batch layouts (``16 × 2``) and code commits (``2b558f3-dirty``) ``text``'s tables print that are
    not their run's record's (its spec; its environment's git commit, shortened as the report shortens it)."""
    bad = []
    for line, name, cells in table_rows(text):
        checks = {c: cells[c] for c in ("micro-batch × count", "code")
                  if c in cells and (cells[c] != "–" or c == "code")}
        own = record_of(name, cells, recs) if checks else None
        if not checks:
            continue
        spec, env = (own.get("spec") or {}, own.get("environment") or {}) if own else ({}, {})
        actual = {"micro-batch × count": f"{spec.get('micro_batch_size')} × {spec.get('micro_batches')}",
                  "code": short_commit(env) or "–"}
        bad += [f"line {line}: {name}: {c} {v} is not its record's ({actual[c]})" for c, v in checks.items()
                if v != actual[c]]
    return bad


def test_every_layout_and_commit_is_its_runs():
    text = RESULTS_PAGE.read_text()
    assert sum("code" in cells for _, _, cells in table_rows(text)) >= 30
    assert layout_mismatches(text, records()) == []
    assert len(layout_mismatches(text.replace("| 8 × 2 | 122,689 |", "| 16 × 1 | 122,689 |", 1), records())) == 1


PLAN_COLUMNS = {"plan: peak error": "peak_error", "plan: step error": "step_error"}


def plan_mismatches(text: str) -> list[str]:
    """The plan errors ``text``'s tables print that the plan (llmpar.plan.calibration.check_study) does not give
    for the study of the section they stand in (its heading names the preset), to the printed digit."""
    from llmpar.config import load_yaml, prepare
    from llmpar.plan.calibration import check_study

    lines, bad = text.splitlines(), []
    for table in tables(text):
        if not set(PLAN_COLUMNS) & set(table[0][2]):
            continue
        heading = next(h for h in reversed(lines[:table[0][0]]) if h.startswith("## "))
        cfg = prepare(load_yaml(REPO_ROOT / re.search(r"`(configs/[^`]+\.yaml)`", heading).group(1)))
        runs = REPO_ROOT / "results" / cfg["study"] / "runs"
        rows = {r["run"]: r for r in check_study(cfg, cfg["train"]["card"], runs)}
        for line, name, cells in table:
            for column, field in PLAN_COLUMNS.items():
                printed = cells[column].split(" (")[0].replace("−", "-").replace(" %", "")
                value = 100 * rows[name][field] if name in rows else None
                if value is None or f"{value:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0") != printed:
                    bad.append(f"line {line}: {name}: {column} {cells[column]} is not the plan's ({value})")
    return bad


def test_every_plan_error_is_the_plans():
    text = RESULTS_PAGE.read_text()
    assert plan_mismatches(text) == []
    assert len(plan_mismatches(text.replace("| −0.5 % | +9.0 % |", "| −0.5 % | +9.1 % |", 1))) == 1


def test_every_table_row_quotes_a_committed_record():
    text = RESULTS_PAGE.read_text()
    assert len([r for r in table_rows(text) if set(r[2]) & set(COLUMNS)]) >= 60  # the tables are found
    assert mismatches(text, records()) == []


def test_every_sm_clock_is_its_runs_steady_median():
    text = RESULTS_PAGE.read_text()
    assert sum(cells.get("SM clock", "–") != "–" for _, _, cells in table_rows(text)) >= 5
    assert clock_mismatches(text, records()) == []
    assert clock_mismatches(text.replace("| 1,620 MHz |", "| 1,602 MHz |", 1), records())


def test_every_loss_gap_is_that_of_two_committed_runs():
    text = RESULTS_PAGE.read_text()
    assert len(re.findall(r"% at step \d+", text)) >= 15  # the claims are found
    assert loss_gap_mismatches(text, records()) == []


@pytest.mark.parametrize("old,new", [("≤ 1.23 %, except −6.82 %", "≤ 1.32 %, except −6.82 %"),
                                     ("≤ 1.23 %, except −6.82 %", "≤ 1.23 %, except −6.28 %"),
                                     ("≤ 0.19 %, except +0.71 %", "≤ 0.19 %, except −0.71 %"),
                                     ("to the first ≤ 0.43 %", "to the first ≤ 0.34 %"),
                                     ("| SM clock | loss gap to `single`, steps 6–25 |",
                                      "| SM clock | loss gap to `single`, steps 6–20 |")])
def test_a_changed_loss_gap_is_caught(old, new):
    """A mistyped gap, a flipped sign or a gap over other steps than the header states is named."""
    text = RESULTS_PAGE.read_text()
    assert old in text
    assert loss_gap_mismatches(text.replace(old, new, 1), records())


@pytest.mark.parametrize("old,new", [("| 71,189 |", "| 71,198 |"), ("| 0.497 |", "| 0.479 |"),
                                     ("| **1.179** |", "| **1.197** |"), ("| 68.7 |", "| 68.9 |"),
                                     ("| 1.7252 |", "| 1.7225 |")])
def test_a_changed_number_is_caught(old, new):
    """A typo in a quoted number, or a ratio that no longer fits its records, is named."""
    text = RESULTS_PAGE.read_text()
    assert old in text
    assert len(mismatches(text.replace(old, new, 1), records())) == 1


def test_the_kernels_headline_holds_on_its_records():
    """The recorded fastest `single` of the kernels study: an H100, through the workflow, MFU >= 0.55 by the
    project's formula, and >= 1.12 x the torchtitan run recorded beside it (the same card, the same session)."""
    study = REPO_ROOT / "results" / "h100-1b-kernels"
    run = read_json(study / "runs" / FASTEST / "summary.json")
    tt = read_json(study / "baselines" / "torchtitan_single.json")
    assert run["status"] == "ok" and run["world_size"] == 1 and "H100" in run["environment"]["gpu_name"]
    assert run["mfu"] == pytest.approx(run["tokens_per_s"] * run["flops_per_token"] / run["peak_flops"])
    assert run["mfu"] >= 0.55
    assert tt["status"] == "ok" and tt["gpu"] == run["environment"]["gpu_name"]
    assert tt["ours_same_call"]["run"] == FASTEST and tt["ours_same_call"]["tokens_per_s"] == run["tokens_per_s"]
    assert run["tokens_per_s"] / tt["tokens_per_s"] >= 1.12
    page = RESULTS_PAGE.read_text()
    assert f"MFU {run['mfu']:.3f}" in page and f"{run['tokens_per_s']:,.0f} tokens/s" in page
    assert f"{run['tokens_per_s'] / tt['tokens_per_s']:.3f} × torchtitan" in page
    assert f"fastest step, MFU {run['mfu']:.2f} on an H100" in " ".join((REPO_ROOT / "README.md").read_text().split())


def test_records_are_found_by_name():
    """The loader sees runs, probe rows and torchtitan runs (a loader that finds nothing passes nothing)."""
    recs = records()
    assert {"single", "torchtitan", "cudnn16", FASTEST} <= set(recs)
    assert all(isinstance(r["path"], Path) for rs in recs.values() for r in rs)


def test_the_strategies_step_gaps_are_their_records():
    """RESULTS.md's per-step loss gaps of the 2- and 4-GPU studies' strategies to `single`: the largest over the
    steady steps but step 13, and step 13's (the spike), from each run's steps.jsonl."""
    rest, spike = {}, {}
    for study in ("h100x2-1b", "h100x4-1b"):
        runs = REPO_ROOT / "results" / study / "runs"
        base = step_losses(runs / "single" / "steps.jsonl")
        for run_dir in sorted(p for p in runs.iterdir() if p.name != "single"):
            summary = read_json(run_dir / "summary.json")
            first = summary["steps_completed"] - summary["steady_steps"] + 1
            gap = {s: abs(v - base[s]) / base[s] for s, v in step_losses(run_dir / "steps.jsonl").items() if s >= first}
            rest[(study, run_dir.name)] = max(g for s, g in gap.items() if s != 13)
            spike[(study, run_dir.name)] = gap[13]
    bf16_stream = ("h100x2-1b", "fsdp")  # recorded with FSDP2's bf16 layer inputs (RESULTS.md, the 2-GPU study)
    (_, worst), largest = max(((k, v) for k, v in spike.items() if k != bf16_stream), key=lambda kv: kv[1])
    within = max(v for k, v in rest.items() if k != bf16_stream)
    page = " ".join(RESULTS_PAGE.read_text().split())
    assert f"within {100 * within:.2f} % over the steady steps of both studies" in page
    assert f"differ by up to {100 * largest:.2f} % (`{worst}` at 4 GPUs)" in page
    assert (f"bf16 residual stream, within {100 * rest[bf16_stream]:.2f} %, and by {100 * spike[bf16_stream]:.2f} % "
            "at the spike") in page
