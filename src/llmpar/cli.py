"""Command line of the workflow's non-training steps (``scripts/study.py <step>``).

Each subcommand takes JSON settings (as the workflow passes them, shell-quoted) and paths; bad input
exits 2 with a one-line message naming the problem, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    "aggregate": (_aggregate, "run summaries -> metrics.csv, steps.csv, evals.csv, samples.csv",
                  "runs-dir runs+ baseline out-dir"),
    "figures": (_figures, "tables -> PNG and SVG figures", "metrics steps samples out-dir names+"),
    "plan": (_plan, "recorded runs -> plan.csv (predicted vs measured) and extrapolation.csv, on the study's "
             "train.card", "config:json runs-dir plan extrapolation"),
    "plan-figure": (_plan_figure, "plan.csv -> the predicted-vs-measured figure (PNG and SVG)", "plan out-dir"),
    "report": (_report, "the self-contained HTML report", "config:json metrics figures-dir captions-dir "
               "summaries+ names+ plan? extrapolation? plan-figure? out"),
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
