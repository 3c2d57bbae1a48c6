"""Command line of the workflow's non-training steps (``scripts/study.py <step>``).

Each subcommand takes JSON settings (as the workflow passes them, shell-quoted) and paths; bad input
exits 2 with a one-line message naming the problem, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmpar.errors import UserError


def _debian_fetch(a):
    from llmpar.data.debian import fetch

    print(json.dumps(fetch(json.loads(a.debian), a.out), indent=2))


def _debian_text(a):
    from llmpar.data.debian import extract

    print(json.dumps(extract(json.loads(a.debian), a.fetch_dir, a.out), indent=2))


def _corpus(a):
    from llmpar.data.corpus import build_corpus

    print(json.dumps(build_corpus(json.loads(a.data), a.seed, a.out, a.text_dir), indent=2))


def _tokenizer(a):
    from llmpar.data.tokenize import build_tokenizer

    print(json.dumps(build_tokenizer(json.loads(a.tokenizer), a.train_txt, a.out)))


def _tokenize(a):
    from llmpar.data.tokenize import build_shards

    print(json.dumps(build_shards(a.tokenizer_json, a.corpus_dir, a.out, a.min_tokens), indent=2))


def _aggregate(a):
    from llmpar.analysis.aggregate import aggregate

    df = aggregate(a.runs_dir, a.runs, a.baseline, a.out_dir, a.reference_batch)
    print(df[["run", "status", "tokens_per_s", "peak_mem_gib", "final_val_loss"]].to_string(index=False))


def _figures(a):
    from llmpar.analysis.figures import make_figures

    make_figures(a.metrics, a.steps, a.samples, a.runs, a.scaling, a.out_dir, a.names)


def _derive(a):
    from llmpar.analysis.derive import derive

    derive(a.study, a.summaries, a.steps, a.metrics, json.loads(a.compare), a.baselines_dir, a.out_dir)


def _report(a):
    from llmpar.analysis.report import build_report

    summaries = [json.loads(open(p).read()) for p in a.summaries]
    build_report(json.loads(a.config), a.metrics, a.figures_dir, a.captions_dir, summaries, a.out, a.names,
                 tables={"runs": a.runs, "scaling": a.scaling, "peers": a.peers}, template=a.template,
                 plan_files={"plan": a.plan, "extrapolation": a.extrapolation, "figure": a.plan_figure,
                             "extrapolation_figure": a.extrapolation_figure},
                 sweep_files={"table": a.sweep_table, "fit": a.sweep_fit, "figure": a.sweep_figure},
                 data_dir=a.data_dir)


def _plan(a):
    from llmpar.plan import calibration
    from llmpar.plan.extrapolate import extrapolate

    cfg = json.loads(a.config)
    card_name = calibration.study_card(cfg)
    efficiency = None
    if cfg.get("sweep_from"):
        from llmpar.analysis.batch_sweep import efficiency_of

        efficiency = efficiency_of(cfg["sweep_from"])
    rows = calibration.check_study(cfg, card_name, Path(a.runs_dir), efficiency)
    calibration.write_csv(rows, Path(a.plan), columns=["run", "card", "predicted_peak_gib", "measured_peak_gib"])
    calibration.write_csv(extrapolate(card_name, efficiency=efficiency), Path(a.extrapolation))
    print(calibration.format_rows(rows) if rows else f"no recorded ok runs under {a.runs_dir}")


def _batch_sweep(a):
    from llmpar.analysis.batch_sweep import write_tables

    print(write_tables(json.loads(a.config), a.runs_dir, a.table, a.fit, a.figure_dir))


def _plan_figure(a):
    from llmpar.analysis.figures import extrapolation, plan_vs_measured

    plan_vs_measured(a.plan, a.out_dir)
    extrapolation(a.extrapolation, a.out_dir)


def _refuse(a):
    import dataclasses

    from llmpar.record import RunRecord, write_run

    point = json.loads(a.record)
    # no spec: the layout was never resolved; the record keeps the batch it asked for
    record = dataclasses.replace(RunRecord.failure(point, "invalid", point["message"], []), spec={},
                                 global_batch=point["run"]["global_batch"])
    write_run(Path(a.out), record, [], [], [])


# subcommand -> (function, help, arguments): ``name`` a required path or value, ``name:json`` settings
# as JSON, ``name:int`` an integer, ``name+`` one or more, ``name?`` optional
COMMANDS = {
    "debian-fetch": (_debian_fetch, "apt-get download the packages of data.debian; write manifest.json",
                     "debian:json out"),
    "debian-text": (_debian_text, "the fetched packages' documents as text, one file per package",
                    "debian:json fetch-dir out"),
    "corpus": (_corpus, "build train/val text from the configured source", "data:json seed:int out text-dir?"),
    "tokenizer": (_tokenizer, "train a BPE or save a pretrained tokenizer", "tokenizer:json train-txt out"),
    "tokenize": (_tokenize, "pack token shards; refuse a split under min-tokens",
                 "tokenizer-json corpus-dir out min-tokens:int?"),
    "refuse": (_refuse, "the record of a sweep's point its layout cannot train (status invalid, the reason)",
               "record:json out"),
    "aggregate": (_aggregate, "run summaries -> metrics.csv, steps.csv, evals.csv, samples.csv",
                  "runs-dir runs+ baseline out-dir reference-batch:int"),
    "derive": (_derive, "summaries and tables -> runs.csv (provenance, time budget), scaling.csv (with the "
               "compared studies), peers.csv (the committed peer frameworks beside ours)",
               "study summaries+ steps metrics compare:json baselines-dir out-dir"),
    "figures": (_figures, "tables -> PNG and SVG figures", "metrics steps samples runs scaling out-dir names+"),
    "plan": (_plan, "recorded runs -> plan.csv (predicted vs measured) and extrapolation.csv, on the study's "
             "train.card", "config:json runs-dir plan extrapolation"),
    "batch-sweep": (_batch_sweep, "runs at several global batches -> steps and sequences to the target, the fit of "
                    "McCandlish et al.'s model, B_crit beside B_simple, the figure", "config:json runs-dir table fit "
                    "figure-dir"),
    "plan-figure": (_plan_figure, "plan.csv, extrapolation.csv -> the predicted-vs-measured and extrapolation "
                    "figures (PNG and SVG)", "plan extrapolation out-dir"),
    "report": (_report, "the self-contained HTML report", "config:json metrics runs scaling peers figures-dir "
               "captions-dir template summaries+ names+ plan? extrapolation? plan-figure? extrapolation-figure? "
               "sweep-table? sweep-fit? sweep-figure? data-dir? out"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/study.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, (fn, help_text, args) in COMMANDS.items():
        s = sub.add_parser(cmd, help=help_text)
        for arg in args.split():
            name, _, kind = arg.rstrip("+?").partition(":")
            s.add_argument(f"--{name}", required=not arg.endswith("?"), nargs="+" if arg.endswith("+") else None,
                           type=int if kind == "int" else str, help="settings (JSON)" if kind == "json" else None)
        s.set_defaults(fn=fn)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        a.fn(a)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def plan_study(config_path: str, card_name: str | None = None, out: str | None = None) -> str:
    """``scripts/plan.py``: predict every run of a study on ``card_name`` (default: its ``train.card``),
    compare with its recorded runs, write the comparison to ``out`` (default results/<study>/plan.csv) and
    return the printed table."""
    from llmpar.config import load_yaml, prepare
    from llmpar.paths import REPO_ROOT
    from llmpar.plan.calibration import (
        MEMORY_BOUND,
        TIME_BOUND,
        check_study,
        format_predictions,
        format_rows,
        study_card,
        within_bounds,
        write_csv,
    )
    from llmpar.plan.cards import card

    cfg = prepare(load_yaml(config_path))
    card_name = study_card(cfg, card_name)  # an unknown or missing card fails before any work
    study_dir = REPO_ROOT / "results" / cfg["study"]
    efficiency = None
    if cfg.get("sweep_from"):  # each run's predicted time to the recorded sweep's target
        from llmpar.analysis.batch_sweep import efficiency_of

        efficiency = efficiency_of(cfg["sweep_from"])
    rows = check_study(cfg, card_name, study_dir / "runs", efficiency)
    parts = []
    if rows:
        path = Path(out) if out else study_dir / "plan.csv"
        write_csv(rows, path)
        bounded = [r for r in rows if r["bounded"]]
        met = [r for r in bounded if all(within_bounds(r).values())]
        parts.append(f"{cfg['study']} on {card(card_name)['name']} (model output vs recorded runs; bounds: peak "
                     f"{MEMORY_BOUND:.0%}, step {TIME_BOUND:.0%})\n{format_rows(rows)}\n"
                     f"{len(met)} of {len(bounded)} modelled runs within both bounds; written {path}")
    pending = [name for name in cfg["runs"] if name not in {r["run"] for r in rows}]
    if pending:  # predicted before they run: what the plan is for
        parts.append(f"{cfg['study']} on {card(card_name)['name']}: runs with no ok run recorded under "
                     f"{study_dir / 'runs'} (model output)\n{format_predictions(cfg, card_name, pending)}")
    return "\n\n".join(parts)
