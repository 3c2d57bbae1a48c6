"""Command line of the workflow's non-training steps (``scripts/study.py <step>``).

Each subcommand takes JSON settings (as the workflow passes them, shell-quoted) and paths; bad input
exits 2 with a one-line message naming the problem, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmpar.errors import UserError


def _corpus(a):
    from llmpar.data.corpus import build_corpus

    print(json.dumps(build_corpus(json.loads(a.data), a.seed, a.out), indent=2))


def _tokenizer(a):
    from llmpar.data.tokenize import build_tokenizer

    print(json.dumps(build_tokenizer(json.loads(a.tokenizer), a.train_txt, a.out)))


def _tokenize(a):
    from llmpar.data.tokenize import build_shards

    print(json.dumps(build_shards(a.tokenizer_json, a.corpus_dir, a.out), indent=2))


def _aggregate(a):
    from llmpar.analysis.aggregate import aggregate

    df = aggregate(a.runs_dir, a.runs, a.baseline, a.out_dir)
    print(df[["run", "status", "tokens_per_s", "peak_mem_gib", "final_val_loss"]].to_string(index=False))


def _figures(a):
    from llmpar.analysis.figures import make_figures

    make_figures(a.metrics, a.steps, a.samples, a.out_dir, a.names)


def _report(a):
    from llmpar.analysis.report import build_report

    summaries = [json.loads(open(p).read()) for p in a.summaries]
    build_report(json.loads(a.config), a.metrics, a.figures_dir, a.captions_dir, summaries, a.out, a.names,
                 plan_files={"plan": a.plan, "extrapolation": a.extrapolation, "figure": a.plan_figure})


def _plan(a):
    from llmpar.plan import study_card
    from llmpar.plan_extrapolate import write_tables

    cfg = json.loads(a.config)
    print(write_tables(cfg, study_card(cfg), a.runs_dir, a.plan, a.extrapolation))


def _plan_figure(a):
    from llmpar.analysis.figures import plan_vs_measured

    plan_vs_measured(a.plan, a.out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/study.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("corpus", help="build train/val text from the configured source")
    s.add_argument("--data", required=True, help="data settings (JSON)")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_corpus)
    s = sub.add_parser("tokenizer", help="train a BPE or save a pretrained tokenizer")
    s.add_argument("--tokenizer", required=True, help="tokenizer settings (JSON)")
    s.add_argument("--train-txt", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_tokenizer)
    s = sub.add_parser("tokenize", help="pack token shards")
    s.add_argument("--tokenizer-json", required=True)
    s.add_argument("--corpus-dir", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_tokenize)
    s = sub.add_parser("aggregate", help="run summaries -> metrics.csv, steps.csv, evals.csv, samples.csv")
    s.add_argument("--runs-dir", required=True)
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--baseline", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(fn=_aggregate)
    s = sub.add_parser("figures", help="tables -> PNG and SVG figures")
    s.add_argument("--metrics", required=True)
    s.add_argument("--steps", required=True)
    s.add_argument("--samples", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--names", nargs="+", required=True)
    s.set_defaults(fn=_figures)
    s = sub.add_parser("plan", help="recorded runs -> plan.csv (predicted vs measured) and extrapolation.csv, "
                       "on the study's train.card")
    s.add_argument("--config", required=True, help="the resolved study config (JSON)")
    s.add_argument("--runs-dir", required=True)
    s.add_argument("--plan", required=True, help="plan.csv to write")
    s.add_argument("--extrapolation", required=True, help="extrapolation.csv to write")
    s.set_defaults(fn=_plan)
    s = sub.add_parser("plan-figure", help="plan.csv -> the predicted-vs-measured figure (PNG and SVG)")
    s.add_argument("--plan", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(fn=_plan_figure)
    s = sub.add_parser("report", help="the self-contained HTML report")
    s.add_argument("--config", required=True, help="the resolved study config (JSON)")
    s.add_argument("--metrics", required=True)
    s.add_argument("--figures-dir", required=True)
    s.add_argument("--captions-dir", required=True)
    s.add_argument("--summaries", nargs="+", required=True)
    s.add_argument("--names", nargs="+", required=True)
    s.add_argument("--plan", help="plan.csv (GPU studies with a train.card)")
    s.add_argument("--extrapolation", help="extrapolation.csv (with --plan)")
    s.add_argument("--plan-figure", help="the predicted-vs-measured PNG (with --plan)")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_report)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
