"""Study configuration: JSON-schema validation with defaults, sweep expansion, layout checks.

One function, :func:`prepare`, turns a raw config dict (config.yaml, a preset, or the CLI's
arguments) into a validated config whose ``runs`` are fully resolved :class:`llmpar.layout.RunSpec`
dicts (:func:`llmpar.layout.resolve`).
Every check that can fail does so here, before any job starts, with a message naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from llmpar.errors import ConfigError
from llmpar.kernels import FA4, QUACK_MLPS, fa4_config_problem, quack_config_problem
from llmpar.layout import PRESETS, STRATEGIES, resolve, run_train
from llmpar.paths import SCHEMA_PATH
from llmpar.plan import auto_micro_batch
from llmpar.shape import model_dims

# Run keys whose value may be a list: each list expands into one run per value (a sweep).
SWEEPABLE = ("nodes", "gpus_per_node", "tp", "stages", "micro_batches", "micro_batch_size", "zero_stage",
             "global_batch")
# Short tags used in the deterministic names of expanded runs.
SWEEP_TAGS = {
    "nodes": "n",
    "gpus_per_node": "g",
    "tp": "tp",
    "stages": "pp",
    "micro_batches": "m",
    "micro_batch_size": "mbs",
    "zero_stage": "z",
    "global_batch": "gb",
}


# --------------------------------------------------------------------------- schema + defaults


def _validator_with_defaults():
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(prop, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def load_schema() -> dict:
    """The config schema, with the strategy names of ``llmpar.layout.PRESETS`` as the choices of a
    run's ``strategy`` (the schema file lists none, so the names live in one table)."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    schema["properties"]["runs"]["additionalProperties"]["properties"]["strategy"]["enum"] = list(STRATEGIES)
    return schema


def validate_schema(cfg: dict) -> dict:
    """Validate against the JSON schema, filling defaults in place. Raises ConfigError naming the key."""
    validator = _validator_with_defaults()(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        key = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        raise ConfigError(f"config key '{key}': {e.message}")
    return cfg


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"line {line}: key '{key}' is given twice in the same mapping (first on line {first}); "
                         "YAML would silently keep only the last one")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a mapping that names a key twice (plain PyYAML keeps the last one: a
    second ``lr:`` or ``runs:`` section would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML's own construct_mapping refuses an unhashable key
            if key in seen:
                raise DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """A config file (YAML or JSON), every mapping's keys unique. Raises ConfigError naming the file, and
    for a key given twice the key and both lines."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except DuplicateKey as exc:
        raise ConfigError(f"config file {path}, {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def check_config_files(paths) -> None:
    """Read each of ``paths`` strictly (:func:`load_yaml`): the workflow's config files, which Snakemake has
    already loaded with a loader that lets a repeated key silently replace the first."""
    for path in paths:
        load_yaml(path)


# --------------------------------------------------------------------------- run expansion


def expand_runs(runs: dict[str, dict]) -> dict[str, dict]:
    """Expand list-valued sizes into one run per combination, named ``{name}-{tag}{value}...``."""
    out: dict[str, dict] = {}
    for name, entry in runs.items():
        swept = [k for k in SWEEPABLE if isinstance(entry.get(k), list)]
        if not swept:
            out[name] = dict(entry)
            continue
        for combo in itertools.product(*(entry[k] for k in swept)):
            run = dict(entry)
            run.update(zip(swept, combo))
            suffix = "-".join(f"{SWEEP_TAGS[k]}{v}" for k, v in zip(swept, combo))
            new = f"{name}-{suffix}"
            if new in out or new in runs:
                raise ConfigError(f"runs: expanded run name '{new}' collides with another run")
            out[new] = run
    return out


def resolve_run(name: str, entry: dict, cfg: dict, default_procs: int = 2):
    """A run entry of a validated config as one checked :class:`llmpar.layout.RunSpec` (``micro_batch_size:
    auto``, in the entry or study-wide, through the plan). Raises ConfigError naming the run."""
    train, model = cfg["train"], cfg["model"]
    runtime = cfg["launch"]["runtime_min"]
    if entry.get("micro_batch_size") == "auto" or (
            train.get("micro_batch_size") == "auto" and entry.get("micro_batch_size") is None
            and entry.get("micro_batches") is None and not PRESETS[entry["strategy"]].pipelined
            and entry.get("stages", 1) == 1):  # as a number, train.micro_batch_size applies without stages
        vocab = model.get("vocab_size") or cfg["tokenizer"]["vocab_size"]
        return auto_micro_batch(name, entry, model, train, vocab, runtime, default_procs)
    return resolve(name, entry, model, train, runtime, default_procs)


# --------------------------------------------------------------------------- entry point


def prepare(raw: dict, default_procs: int = 2) -> dict:
    """Validate a raw config and resolve its runs. Returns a new dict; ``runs`` maps name -> RunSpec dict."""
    cfg = validate_schema(copy.deepcopy(raw))
    model_dims(cfg["model"])
    if cfg["data"]["source"] == "text" and not cfg["data"]["files"]:
        raise ConfigError("config key 'data.files': data.source is 'text' but no files are listed")
    if cfg["tokenizer"]["kind"] == "pretrained" and not cfg["tokenizer"]["pretrained"]:
        raise ConfigError("config key 'tokenizer.pretrained': tokenizer.kind is 'pretrained' but no path is given")
    train = cfg["train"]
    for key in ("eval_batch", "pollux_reference_batch"):  # study-wide references: the study's global batch
        train[key] = train[key] or train["global_batch"]
    train["lr_scaling"]["reference_batch"] = train["lr_scaling"]["reference_batch"] or train["global_batch"]
    expanded = expand_runs(cfg["runs"])
    for name in expanded:
        check_name(name)
    specs, run_train, refused = {}, {}, {}
    for name, entry in expanded.items():
        try:
            specs[name] = resolve_run(name, entry, cfg, default_procs)
            run_train[name] = train_for_batch(cfg, name, specs[name])
            run_train[name]["attention"] = entry.get("attention", train["attention"])
        except ConfigError as exc:
            if name in cfg["runs"]:  # a run as configured: the config is wrong
                raise
            refused[name] = refused_point(name, entry, cfg, str(exc))  # a sweep's point: a result
            specs.pop(name, None)
    def asking(field: str, values: dict[str, str], wanted) -> dict:
        """The config key that asks for a wanted ``field`` value -> (the value, {run: precision})."""
        out = {}
        for name, value in values.items():
            if wanted(value):
                key = f"runs.{name}.{field}" if field in expanded[name] else f"train.{field}"
                out.setdefault(key, (value, {}))[1][name] = specs[name].precision
        return out

    problems = [(key, fa4_config_problem(cfg["model"], {**train, "attention": attention}, precisions))
                for key, (attention, precisions) in asking(
                    "attention", {n: run_train[n]["attention"] for n in specs}, lambda v: v in FA4).items()]
    problems += [(key, quack_config_problem(f"mlp {mlp}", train, precisions)) for key, (mlp, precisions) in asking(
        "mlp", {n: spec.mlp for n, spec in specs.items()}, lambda v: v in QUACK_MLPS).items()]
    problems += [(key, quack_config_problem(f"norm {norm}", train, precisions)) for key, (norm, precisions) in asking(
        "norm", {n: spec.norm for n, spec in specs.items()}, lambda v: v == "quack").items()]
    for key, problem in problems:
        if problem:
            raise ConfigError(f"config key '{key}': {problem}")
    cfg["runs"] = {name: spec.to_dict() for name, spec in specs.items()}
    cfg["run_train"] = run_train
    cfg["refused"] = refused
    if cfg["baseline"] not in cfg["runs"]:
        raise ConfigError(
            f"config key 'baseline': '{cfg['baseline']}' is not a run of this study "
            f"(runs: {', '.join(cfg['runs'])})"
        )
    return cfg


def refused_point(name: str, entry: dict, cfg: dict, message: str) -> dict:
    """A point of a sweep that its layout cannot train (e.g. a global batch that dp x micro-batches do not
    divide): what its record says (status invalid, the reason, no steps; ``scripts/study.py refuse`` writes
    it), so the sweep's other points train and the tables show this one with the reason."""
    return {"run": {"name": name, "strategy": entry["strategy"], "nodes": entry.get("nodes", 1),
                    "gpus_per_node": entry.get("gpus_per_node", 1),
                    "global_batch": entry.get("global_batch", cfg["train"]["global_batch"])},
            "train": {"steps": cfg["train"]["steps"]}, "message": message}


LR_POWER = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def train_for_batch(cfg: dict, name: str, spec) -> dict:
    """What a run's global batch changes in its train settings: the batch itself, the learning rate
    (``train.lr_scaling``), the steps (``train.train_tokens``) and the evaluation spacing
    (``train.eval_every_tokens``); checked against the study's validation batch."""
    train, seq = cfg["train"], cfg["model"]["seq_len"]
    gb = spec.global_batch
    where = f"runs.{name}"
    if train["eval_batch"] % spec.dp:
        raise ConfigError(f"{where}: the validation batch train.eval_batch {train['eval_batch']} is not divisible "
                          f"by dp {spec.dp}")
    if spec.pipelined and gb != train["eval_batch"]:
        raise ConfigError(f"{where}: a pipeline evaluates on its training micro-batches, so its global batch "
                          f"({gb}) must equal train.eval_batch ({train['eval_batch']})")
    scaling = train["lr_scaling"]
    out = {"global_batch": gb,
           "lr": train["lr"] * (gb / scaling["reference_batch"]) ** LR_POWER[scaling["rule"]]}
    tokens_per_step = gb * seq
    if train["train_tokens"]:
        out["steps"] = math.ceil(train["train_tokens"] / tokens_per_step)
    if train["eval_every_tokens"]:
        out["eval_every"] = max(1, round(train["eval_every_tokens"] / tokens_per_step))
    return out


NAME = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]+")


def check_name(run: str) -> None:
    """A run name becomes a directory (results/<study>/runs/<run>/) and a word in shell commands: only
    letters, digits, '_', '.' and '-', and not only dots (which would leave results/<study>/runs/)."""
    if not NAME.fullmatch(run):
        raise ConfigError(f"runs: the run name {run!r} is not allowed: use letters, digits, '_', '.' and '-' "
                          "(not only dots); it names the run's directory and is passed to shell commands")


def stable_hash(obj: Any) -> str:
    """Short hash of a JSON-able object, stable across processes and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config(cfg: dict, run: str) -> dict:
    """What one training job needs: the run spec plus the study-wide model/train/seed settings."""
    return {
        "study": cfg["study"],
        "seed": cfg["seed"],
        "model": cfg["model"],
        "train": run_train(cfg, run),
        "launch": cfg["launch"],
        "run": cfg["runs"][run],
    }
