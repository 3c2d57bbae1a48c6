"""``scripts/train.py``'s command line: the flags (generated from the config schema), a one-run study
config from ``--config``/``--run`` and the flags, the data a CLI run needs, the fit check
(:func:`llmpar.preflight.check_fits`) before any process starts, then :mod:`llmpar.launch`.

Bad input exits 2 with a message before anything is written; a layout the machine cannot hold exits 2
too, or with ``--record-invalid`` (the workflow) becomes a run summary with status ``invalid``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from llmpar.config import load_schema, load_yaml, prepare, run_config
from llmpar.errors import ConfigError, ExpectedFailure, UserError
from llmpar.launch import failure_record, finish, launch, slurm_nodes
from llmpar.paths import REPO_ROOT
from llmpar.preflight import check_fits, check_kernels, cuda_device_count

# The CLI's flags are the schema's keys (choices, types and help from schemas/config.schema.yaml), but
# for the run keys a one-run CLI has no use for (tests' faults, Slurm time, a lever the default gets right)
CLI_SKIPPED_RUN_KEYS = ("fault", "runtime_min", "reshard_after_forward", "global_batch")
# study settings the CLI can set: flag -> (section, key)
CLI_STUDY_FLAGS = {"model_size": ("model", "size"), "seq_len": ("model", "seq_len"), "steps": ("train", "steps"),
                   "global_batch": ("train", "global_batch"), "lr": ("train", "lr"), "device": ("train", "device")}


def _schema_flag(p: argparse.ArgumentParser, flag: str, prop: dict) -> None:
    """One flag from a schema property: its enum as choices, its type, its description as the help."""
    help_text = prop.get("description")
    if "enum" in prop:
        p.add_argument(f"--{flag}", choices=prop["enum"], help=help_text)
    elif prop.get("type") == "boolean":
        p.add_argument(f"--{flag}", action="store_true", default=None, help=help_text)
    elif prop.get("type") == "number":
        p.add_argument(f"--{flag}", type=float, help=help_text)
    else:  # integers, and sizes a study may sweep ($defs/ints): one integer on the CLI
        p.add_argument(f"--{flag}", type=int, help=help_text)


def cli_run_keys(schema: dict | None = None) -> list[str]:
    """The run keys that are flags, in the schema's order (``schema``: the loaded schema, if at hand)."""
    run = (schema or load_schema())["properties"]["runs"]["additionalProperties"]["properties"]
    return [k for k in run if k not in CLI_SKIPPED_RUN_KEYS]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/train.py",
        description="Train one run of the parallelism study (starts its own torchrun workers).",
    )
    schema = load_schema()
    props = schema["properties"]
    run = props["runs"]["additionalProperties"]["properties"]
    for key in cli_run_keys(schema):
        _schema_flag(p, key, run[key])
    for flag, (section, key) in CLI_STUDY_FLAGS.items():
        _schema_flag(p, flag, props[section]["properties"][key])
    _schema_flag(p, "seed", props["seed"])
    p.add_argument("--config", help="study config to take data/model/train settings (and --run) from")
    p.add_argument("--run", help="name of a run in --config")
    p.add_argument("--run-config", dest="run_config", help="resolved run config as JSON (used by the workflow)")
    p.add_argument("--tokens", help="token-shard directory (default: build the synthetic corpus for the CLI)")
    p.add_argument("--out", help="run directory (default: results/cli/runs/<run>)")
    p.add_argument("--batch", help="JSON file listing runs ({'run_config': ..., 'out': ...}) that share one launch: "
                                    "the workers train them one after another (same process layout; used by the "
                                    "GPU test suite to pay process and NCCL start-up once)")
    p.add_argument("--record-invalid", action="store_true",
                   help="write a summary with status 'invalid' (instead of exiting 2) when the hardware "
                        "cannot hold the layout; the workflow uses this so a study records it as a result")
    return p.parse_args(argv)


def _cli_config(args) -> tuple[dict, str]:
    """A one-run study config from --config and/or the CLI flags. Returns (prepared config, run name)."""
    raw = load_yaml(args.config) if args.config else {}
    if args.run:
        if not args.config:
            raise ConfigError("--run needs --config")
        if args.run not in raw.get("runs", {}):
            raise ConfigError(f"--run: '{args.run}' is not a run in {args.config}")
        entry = dict(raw["runs"][args.run])
    else:
        if not args.strategy:
            raise ConfigError("--strategy is required (or --config with --run)")
        entry = {}
    for key in cli_run_keys():
        if getattr(args, key, None) is not None:
            entry[key] = getattr(args, key)
    name = args.run or entry["strategy"]
    raw["runs"], raw["baseline"] = {name: entry}, name
    raw.setdefault("study", "cli")
    for flag, (section, key) in CLI_STUDY_FLAGS.items():
        if getattr(args, flag, None) is not None:
            raw.setdefault(section, {})[key] = getattr(args, flag)
    if args.seed is not None:
        raw["seed"] = args.seed
    device_pref = raw.get("train", {}).get("device", "auto")
    gpus = cuda_device_count() if device_pref != "cpu" else 0
    cfg = prepare(raw, default_procs=gpus or 2)
    runs = list(cfg["runs"])
    if len(runs) != 1:
        raise ConfigError(f"the CLI trains one run; the flags expand into {len(runs)}: {runs}")
    return cfg, runs[0]


def planned_vocab(cfg: dict) -> int | None:
    """The vocabulary the CLI's data will have at most, before it is built: the BPE tokenizer's target size
    (it learns no more; model.vocab_size, if larger, is applied by the fit check); None for a pretrained
    tokenizer (its size is known once it is loaded)."""
    return cfg["tokenizer"]["vocab_size"] if cfg["tokenizer"]["kind"] == "bpe" else None


def cli_data_root(cfg: dict) -> Path:
    """Where a CLI run's corpus, tokenizer and token shards live (a hash of the data settings)."""
    from llmpar.config import stable_hash

    key = stable_hash({"data": cfg["data"], "tokenizer": cfg["tokenizer"], "seed": cfg["seed"]})
    return REPO_ROOT / "results" / "cli" / "data" / key


def _ensure_cli_data(cfg: dict) -> Path:
    """Build corpus, tokenizer and token shards for a CLI run (cached by a hash of the data settings)."""
    from llmpar.data.corpus import build_corpus
    from llmpar.data.tokenize import build_shards, build_tokenizer

    root = cli_data_root(cfg)
    tokens = root / "tokens"
    if not (tokens / "meta.json").is_file():
        print(f"building CLI data in {root}", flush=True)
        build_corpus(cfg["data"], cfg["seed"], root / "corpus")
        build_tokenizer(cfg["tokenizer"], root / "corpus" / "train.txt", root / "tokenizer" / "tokenizer.json")
        build_shards(root / "tokenizer" / "tokenizer.json", root / "corpus", tokens)
    return tokens


def main_batch(args, argv: list[str], t0: float) -> int:
    """``--batch``: several runs of one process layout in one launch (see ``llmpar.train.worker_main``)."""
    from llmpar.data.tokenize import read_meta

    jobs = json.loads(Path(args.batch).read_text())
    if not jobs or not args.tokens:
        raise ConfigError("--batch needs a non-empty list of runs and --tokens")
    tokens = Path(args.tokens)
    vocab = read_meta(tokens)["vocab_size"]
    first = jobs[0]["run_config"]
    layout = ("nodes", "gpus_per_node")
    for job in jobs:
        rc = job["run_config"]
        if [rc["run"][k] for k in layout] != [first["run"][k] for k in layout] or \
                rc["train"]["device"] != first["train"]["device"]:
            raise ConfigError(f"--batch: run {rc['run']['name']} has another process layout or device than "
                              f"{first['run']['name']}; a batch shares one launch")
        check_kernels(rc)
        check_fits(rc, vocab, rc["run"]["gpus_per_node"] * rc["run"]["nodes"])
    for job in jobs:
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        (Path(job["out"]) / "summary.json").unlink(missing_ok=True)
    code = launch(jobs, tokens, [str(REPO_ROOT / "scripts" / "train.py"), *argv], t0)
    results = [finish(job["run_config"], Path(job["out"]), code) for job in jobs]
    return max(results, key=abs)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.time()  # process start: the run's wall time counts from here
    if "LOCAL_RANK" in os.environ:  # started by torchrun: be the worker
        from llmpar.train import worker_main

        return worker_main()
    args = parse_args(argv)
    if args.batch:
        try:
            return main_batch(args, argv, t0)
        except (UserError, ExpectedFailure) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
    script = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0].endswith(".py") else None
    try:
        if args.run_config:
            rc = json.loads(args.run_config)
            cfg = None
        else:
            cfg, name = _cli_config(args)
            rc = run_config(cfg, name)
        if not args.out and cfg is None:
            raise ConfigError("--out is required with --run-config")
        out = Path(args.out) if args.out else REPO_ROOT / "results" / "cli" / "runs" / rc["run"]["name"]
        if not args.tokens and cfg is None:
            raise ConfigError("--tokens is required with --run-config")
        from llmpar.data.tokenize import read_meta

        check_kernels(rc)
        local_procs = run_gpn = rc["run"]["gpus_per_node"]
        if not os.environ.get("LLMPAR_SRUN_TASK") and slurm_nodes() < rc["run"]["nodes"]:
            local_procs = run_gpn * rc["run"]["nodes"]  # all "nodes" share this machine
        # the fit check before anything is written: with the token shards' vocabulary, or, for data the CLI
        # has yet to build, the vocabulary it will have at most; then again once the data is built
        tokens = Path(args.tokens) if args.tokens else None
        vocab = read_meta(tokens)["vocab_size"] if tokens else planned_vocab(cfg)
        try:
            if vocab is not None:
                check_fits(rc, vocab, local_procs)
            if tokens is None:
                tokens = _ensure_cli_data(cfg)
                check_fits(rc, read_meta(tokens)["vocab_size"], local_procs)
        except ExpectedFailure as exc:
            if not args.record_invalid:
                raise
            failure_record(rc, out, exc.status, exc.message)
            print(f"[{rc['run']['name']}] invalid: {exc.message}", flush=True)
            return 0
    except (UserError, ExpectedFailure) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    self_argv = [script or str(REPO_ROOT / "scripts" / "train.py"), *argv]
    code = launch([{"run_config": rc, "out": str(out)}], tokens, self_argv, t0)
    if os.environ.get("LLMPAR_SRUN_TASK"):
        return code  # the batch step collects failures
    return finish(rc, out, code)
