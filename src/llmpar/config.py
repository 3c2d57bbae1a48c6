"""Study configuration: JSON-schema validation with defaults, sweep expansion, layout checks.

One function, :func:`prepare`, turns a raw config dict (config.yaml, a preset, or the CLI's
arguments) into a validated config whose ``runs`` are fully resolved :class:`RunSpec` dicts.
Every check that can fail does so here, before any job starts, with a message naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from llmpar.errors import ConfigError
from llmpar.strategies import PRESETS

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "schemas" / "config.schema.yaml"

STRATEGIES = tuple(PRESETS)  # the strategy names: presets of one layout (llmpar.strategies.PRESETS)
# Run keys whose value may be a list: each list expands into one run per value (a sweep).
SWEEPABLE = ("nodes", "gpus_per_node", "tp", "stages", "micro_batches", "micro_batch_size", "zero_stage")
# Short tags used in the deterministic names of expanded runs.
SWEEP_TAGS = {
    "nodes": "n",
    "gpus_per_node": "g",
    "tp": "tp",
    "stages": "pp",
    "micro_batches": "m",
    "micro_batch_size": "mbs",
    "zero_stage": "z",
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run, every parallel size resolved. world = nodes * gpus_per_node = tp * stages * dp."""

    name: str
    strategy: str
    nodes: int = 1
    gpus_per_node: int = 1
    tp: int = 1
    stages: int = 1
    dp: int = 1
    micro_batches: int = 1  # micro-batches per optimizer step on each data-parallel replica
    micro_batch_size: int = 1  # sequences per micro-batch
    schedule: str = "1f1b"
    tp_engine: str = "deepspeed"
    pp_engine: str = "deepspeed"
    zero_stage: int = 0
    offload: str = "none"
    reshard_after_forward: bool = True
    precision: str = "fp32"
    compile: bool = False
    activation_checkpointing: str = "none"
    runtime_min: int = 20
    fault: dict | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)


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
    """The config schema, with the strategy names of ``llmpar.strategies.PRESETS`` as the choices of a
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


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return yaml.safe_load(path.read_text()) or {}


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


def engine_of(run: dict) -> str:
    """Which library's engine runs the layout: 'deepspeed' or 'torch' (its strategy preset says)."""
    return PRESETS[run["strategy"]].engine(run)


def resolve_run(name: str, entry: dict, cfg: dict, default_procs: int = 2) -> RunSpec:
    """Fill the sizes a run leaves out and check the layout. Raises ConfigError naming the run.

    ``default_procs`` is the process count per node of a multi-process run that names none: 2 in a
    study config (so a config resolves the same on every machine), the visible GPUs on the CLI.
    """
    strategy = entry["strategy"]
    preset = PRESETS[strategy]
    train, model = cfg["train"], cfg["model"]
    where = f"runs.{name}"
    if entry.get("micro_batch_size") == "auto" or (
            train.get("micro_batch_size") == "auto" and entry.get("micro_batch_size") is None
            and entry.get("micro_batches") is None and not preset.pipelined
            and entry.get("stages", 1) == 1):  # as a number, train.micro_batch_size applies without stages
        return auto_micro_batch(name, entry, cfg, default_procs)

    def get(key, default):
        v = entry.get(key)
        return default if v is None else v

    tp = get("tp", 1)
    stages = get("stages", preset.stages)
    nodes = get("nodes", 1)
    gpn = entry["gpus_per_node"] if "gpus_per_node" in entry else \
        preset.gpus_per_node(tp, stages, nodes, default_procs, "tp" in entry)
    if preset.tp_fills_world and "tp" not in entry:
        tp = nodes * gpn
    for key, val in (("nodes", nodes), ("gpus_per_node", gpn), ("tp", tp), ("stages", stages)):
        if val < 1:
            raise ConfigError(f"{where}.{key} must be >= 1, got {val}")
    world = nodes * gpn
    if world % (tp * stages):
        raise ConfigError(
            f"{where}: world size {world} (nodes {nodes} x gpus_per_node {gpn}) is not divisible by "
            f"tp {tp} x stages {stages}; world size must equal tp x stages x dp"
        )
    dp = world // (tp * stages)

    # the layouts the strategy name stands for
    degrees = dict(nodes=nodes, gpus_per_node=gpn, tp=tp, stages=stages, dp=dp, world=world)
    if not preset.accepts(degrees):
        raise ConfigError(f"{where}: {preset.refusal.format(**degrees)} (got nodes={nodes}, gpus_per_node={gpn}, "
                          f"tp={tp}, stages={stages})")

    zero_stage = get("zero_stage", 1 if preset.zero else 0)
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if not preset.zero and "zero_stage" in entry:
        raise ConfigError(f"{where}.zero_stage applies to strategy zero only")
    if stages > 1 and zero_stage > 1:
        raise ConfigError(
            f"{where}: ZeRO stage {zero_stage} with pipeline parallelism (stages {stages}) is rejected by "
            "DeepSpeed by design (gradients are partitioned across micro-batches); use zero_stage 1"
        )

    # model shape vs layout
    dims = model_dims(model)
    if dims["num_heads"] % tp or dims["num_kv_heads"] % tp:
        raise ConfigError(
            f"{where}: tp {tp} must divide the attention heads ({dims['num_heads']}) and the KV heads "
            f"({dims['num_kv_heads']})"
        )
    schedule = get("schedule", "1f1b")
    chunks = stages * (2 if schedule == "interleaved_1f1b" else 1)
    if dims["num_layers"] < chunks:
        raise ConfigError(
            f"{where}: {dims['num_layers']} layers cannot fill {chunks} pipeline chunks "
            f"(stages {stages}, schedule {schedule}); layers must be >= stages"
        )

    # batch split
    gb = train["global_batch"]
    mbs = entry.get("micro_batch_size")
    default_m = max(4, 2 * stages) if stages > 1 or preset.pipelined else 1
    m = entry.get("micro_batches")
    if m is None and mbs is None:
        mbs_cfg = train.get("micro_batch_size")
        if mbs_cfg and stages == 1:
            mbs = mbs_cfg
        else:
            m = default_m
    if m is None:
        if mbs < 1 or gb % (dp * mbs):
            raise ConfigError(
                f"{where}: global batch {gb} is not divisible by dp {dp} x micro_batch_size {mbs}"
            )
        m = gb // (dp * mbs)
    if m < 1 or gb % (dp * m):
        raise ConfigError(
            f"{where}: global batch {gb} is not divisible by dp {dp} x micro-batches {m}; "
            "every run of a study must train on the same global batch"
        )
    mbs = gb // (dp * m)
    if schedule == "interleaved_1f1b" and m % stages:
        raise ConfigError(f"{where}: interleaved_1f1b needs micro-batches ({m}) divisible by stages ({stages})")

    # What each engine can run: checked here, once (the engines trust the spec)
    pp_engine = get("pp_engine", "deepspeed")
    # FSDP x TP and TP inside torch pipeline stages only exist on the torch engine.
    tp_engine = get("tp_engine", "torch" if strategy == "fsdp" or pp_engine == "torch" and stages > 1
                    else "deepspeed")
    engine = engine_of({"strategy": strategy, "tp_engine": tp_engine, "pp_engine": pp_engine})
    if strategy == "zero" and zero_stage == 0:
        raise ConfigError(f"{where}.zero_stage: strategy zero needs ZeRO stage 1, 2 or 3, got 0")
    if strategy == "zero" and stages > 1 and pp_engine != "deepspeed":
        raise ConfigError(f"{where}.pp_engine: ZeRO-1 with pipeline stages runs on DeepSpeed's pipeline engine "
                          "(pp_engine: deepspeed)")
    # DeepSpeed's pipeline engine: a pipeline or hybrid on pp_engine deepspeed (one stage included), ZeRO-1
    # with stages
    if engine == "deepspeed" and (preset.pipelined or stages > 1):
        if tp > 1:
            raise ConfigError(
                f"{where}: DeepSpeed's pipeline engine cannot run AutoTP inside its stages (tp {tp}): AutoTP "
                "builds its own (data, tensor) mesh over the whole world and replaces the engine's mpu, while "
                "the PipelineEngine takes its groups from the PipelineModule's topology. Use pp_engine: torch "
                "for pipeline x tensor parallelism")
        if schedule != "1f1b":
            raise ConfigError(
                f"{where}: DeepSpeed's PipelineEngine runs only its 1F1B TrainSchedule, not {schedule}; gpipe "
                "and interleaved_1f1b are implemented by the torch engine (pp_engine: torch)")
    if tp > 1 and tp_engine != "torch" and (strategy == "fsdp" or stages > 1):
        where_tp = "fsdp x tp" if strategy == "fsdp" else "tensor parallel inside pipeline stages"
        raise ConfigError(f"{where}: {where_tp} runs on the torch tensor-parallel engine only (tp_engine: torch)")
    if stages > 1 and pp_engine == "torch" and schedule == "1f1b" and m < stages:
        raise ConfigError(f"{where}: 1f1b needs at least as many micro-batches ({m}) as stages ({stages})")
    offload = get("offload", "none")
    if offload != "none" and zero_stage < 1:
        raise ConfigError(f"{where}.offload: offload {offload} needs DeepSpeed ZeRO (strategy zero); "
                          f"{strategy} runs no ZeRO stage")
    if offload == "parameters" and zero_stage != 3:
        raise ConfigError(f"{where}.offload: offload parameters needs ZeRO stage 3 (only stage 3 partitions "
                          f"parameters), got zero_stage {zero_stage}; use offload optimizer")
    precision = get("precision", train["precision"])
    if precision == "bf16-pure" and engine == "deepspeed" and zero_stage < 1:
        raise ConfigError(
            f"{where}: precision bf16-pure (bf16 weights and optimizer states, no fp32 master) is available in "
            "DeepSpeed only through bf16_master_weights_and_grads, which requires ZeRO stage 1-3; this run's "
            "DeepSpeed engine runs none. Use precision bf16 (fp32 weights under torch autocast) or a torch engine")

    for key in ("tp_engine", "pp_engine"):
        if key in entry and key not in preset.engine_keys:
            raise ConfigError(f"{where}.{key} does not apply to strategy {strategy}")

    return RunSpec(
        name=name,
        strategy=strategy,
        nodes=nodes,
        gpus_per_node=gpn,
        tp=tp,
        stages=stages,
        dp=dp,
        micro_batches=m,
        micro_batch_size=mbs,
        schedule=schedule,
        tp_engine=tp_engine,
        pp_engine=pp_engine,
        zero_stage=zero_stage,
        offload=offload,
        reshard_after_forward=get("reshard_after_forward", True),
        precision=precision,
        compile=get("compile", train["compile"]),
        activation_checkpointing=get("activation_checkpointing", train["activation_checkpointing"]),
        runtime_min=get("runtime_min", cfg["launch"]["runtime_min"]),
        fault=entry.get("fault"),
    )


def auto_micro_batch(name: str, entry: dict, cfg: dict, default_procs: int) -> RunSpec:
    """``micro_batch_size: auto``: the largest size that divides the replica's batch and that the plan
    (``llmpar.plan``) predicts to fit ``train.card`` with its margin (peak <= 90 % of the card). A
    pipeline keeps at least the default micro-batches (max(4, 2 x stages)), so its bubble stays small."""
    from llmpar import plan

    where = f"runs.{name}.micro_batch_size"
    card_name = cfg["train"].get("card")
    if not card_name:
        raise ConfigError(f"{where}: auto needs train.card (the card to fit: h100, h200; src/llmpar/cards.yaml)")
    try:
        memory = plan.card(card_name)["memory_gib"]
    except KeyError as exc:
        raise ConfigError(f"config key 'train.card': {exc.args[0]}") from None
    if entry.get("micro_batches") is not None:
        raise ConfigError(f"{where}: auto chooses the micro-batches too; remove runs.{name}.micro_batches")
    base = {k: v for k, v in entry.items() if k != "micro_batch_size"}
    dp = resolve_run(name, {**base, "micro_batch_size": 1}, cfg, default_procs).dp
    per_replica = cfg["train"]["global_batch"] // dp
    tried = {}
    for mbs in sorted((d for d in range(1, per_replica + 1) if per_replica % d == 0), reverse=True):
        try:
            spec = resolve_run(name, {**base, "micro_batch_size": mbs}, cfg, default_procs)
        except ConfigError:  # e.g. interleaved 1F1B needs micro-batches divisible by stages
            continue
        if spec.stages > 1 and spec.micro_batches < max(4, 2 * spec.stages):
            continue
        vocab = cfg["model"].get("vocab_size") or cfg["tokenizer"]["vocab_size"]
        tried[mbs] = plan.predict(cfg["model"], vocab, spec.to_dict(), cfg["train"], card_name)["peak_gib"]
        if plan.fits(tried[mbs], memory):
            return spec
    shown = ", ".join(f"{k}: {v:.1f} GiB" for k, v in tried.items())
    raise ConfigError(f"{where}: no micro-batch size is predicted to fit {1 - plan.FIT_MARGIN:.0%} of the "
                      f"{memory:.1f} GiB of {card_name} ({shown})")


# --------------------------------------------------------------------------- model dimensions

MODEL_SIZES: dict[str, dict[str, int]] = {
    # ~0.25M parameters with a 512 vocabulary: the CPU test model.
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=176),
    "125M": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048),
    "350M": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
    # TinyLlama-1.1B shape: hidden 2048, 22 layers, GQA 32/4, SwiGLU 5632.
    "1B": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
}


def model_dims(model_cfg: dict) -> dict[str, int]:
    """The size preset with any explicit dimension in the config taking precedence."""
    dims = dict(MODEL_SIZES[model_cfg.get("size", "tiny")])
    for key in dims:
        if model_cfg.get(key) is not None:
            dims[key] = model_cfg[key]
    if dims["hidden_size"] % dims["num_heads"]:
        raise ConfigError(
            f"model: hidden_size {dims['hidden_size']} is not divisible by num_heads {dims['num_heads']}"
        )
    if dims["num_heads"] % dims["num_kv_heads"]:
        raise ConfigError(
            f"model: num_heads {dims['num_heads']} is not divisible by num_kv_heads {dims['num_kv_heads']}"
        )
    return dims


# --------------------------------------------------------------------------- entry point


def prepare(raw: dict, default_procs: int = 2) -> dict:
    """Validate a raw config and resolve its runs. Returns a new dict; ``runs`` maps name -> RunSpec dict."""
    cfg = validate_schema(copy.deepcopy(raw))
    model_dims(cfg["model"])
    if cfg["data"]["source"] == "text" and not cfg["data"]["files"]:
        raise ConfigError("config key 'data.files': data.source is 'text' but no files are listed")
    if cfg["tokenizer"]["kind"] == "pretrained" and not cfg["tokenizer"]["pretrained"]:
        raise ConfigError("config key 'tokenizer.pretrained': tokenizer.kind is 'pretrained' but no path is given")
    expanded = expand_runs(cfg["runs"])
    for name in expanded:
        check_name(name)
    cfg["runs"] = {name: resolve_run(name, entry, cfg, default_procs).to_dict() for name, entry in expanded.items()}
    if cfg["baseline"] not in cfg["runs"]:
        raise ConfigError(
            f"config key 'baseline': '{cfg['baseline']}' is not a run of this study "
            f"(runs: {', '.join(cfg['runs'])})"
        )
    return cfg


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
        "train": cfg["train"],
        "launch": cfg["launch"],
        "run": cfg["runs"][run],
    }
