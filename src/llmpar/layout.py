"""The run layout: what a strategy name means, and one resolved, checked layout of a run (:class:`RunSpec`).

Pure Python (no torch). The config (:mod:`llmpar.config`), the plan (:mod:`llmpar.plan`) and the engines
(:mod:`llmpar.strategies`) ask a :class:`RunSpec` for the facts of a layout (its engine, virtual stages,
how it shards model states, its precision's byte widths) instead of matching strategy names, as
torchtitan's ``ParallelDims`` is the one object that knows a job's degrees.

``PRESETS`` is the one table of strategy names: the config schema's ``strategy`` choices, the training
CLI's ``--strategy`` and :func:`resolve` read it. Adding a strategy is an engine module, a row here and
its equivalence test. The loop never branches on the strategy.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmpar.errors import ConfigError
from llmpar.kernels import QUACK_MLPS
from llmpar.shape import model_dims


class Precision(enum.StrEnum):
    """``fp32``; ``bf16``: autocast bf16 over fp32 weights, gradients and optimizer states, the residual stream
    in fp32 (the study's mixed precision, every engine); ``bf16-residual``: the same autocast and fp32 states
    with the residual stream in bf16 (the embedding's output cast, as Megatron-LM's default and FSDP2's usual
    mixed precision carry it; :func:`llmpar.strategies.levers.carry_residual_in_bf16`); ``bf16-master``: the
    model's weights, their gradients and the residual stream in bf16 under the same autocast, with fp32 master
    weights, gradient sums and AdamW states in the optimizer (:class:`llmpar.strategies.master.MasterWeights`;
    strategy single); ``bf16-pure``: bf16 weights and optimizer states, no fp32 master."""

    FP32 = "fp32"
    BF16 = "bf16"
    BF16_RESIDUAL = "bf16-residual"
    BF16_MASTER = "bf16-master"
    BF16_PURE = "bf16-pure"

    @property
    def autocast(self) -> bool:
        return self in (Precision.BF16, Precision.BF16_RESIDUAL, Precision.BF16_MASTER)

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of the weights and gradients the optimizer steps (``bf16-master``'s fp32 masters;
        its model holds bf16 copies beside them, :func:`llmpar.plan.memory.state_bytes`)."""
        return 2 if self is Precision.BF16_PURE else 4

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream (the hidden states between decoder layers) and its
        gradient."""
        return 2 if self in (Precision.BF16_PURE, Precision.BF16_RESIDUAL, Precision.BF16_MASTER) else 4

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of matmul inputs and outputs."""
        return 4 if self is Precision.FP32 else 2


class Engine(enum.StrEnum):
    """The library whose engine runs a layout."""

    TORCH = "torch"
    DEEPSPEED = "deepspeed"


class Schedule(enum.StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved_1f1b"


class Sharding(enum.StrEnum):
    """How a layout divides model states over its data-parallel ranks."""

    NONE = "none"  # every data-parallel rank holds a full replica (single, DDP, TP x DP, PP x DP)
    FSDP = "fsdp"  # FSDP2: parameters, gradients and optimizer states
    ZERO1 = "zero1"  # DeepSpeed ZeRO-1: optimizer states
    ZERO2 = "zero2"  # ... and gradients
    ZERO3 = "zero3"  # ... and parameters


class MeshAxis(enum.StrEnum):
    """Device-mesh dimension names of the torch engines."""

    PP = "pp"
    DP = "dp"
    DP_SHARD = "dp_shard"
    TP = "tp"


@dataclass(frozen=True)
class Preset:
    """What a strategy name means before a run's sizes are known.

    ``gpus_per_node(tp, stages, nodes, default_procs, tp_given)``: processes per node for a run that names
    none; ``accepts(degrees)`` and ``refusal`` (formatted with the same degrees: nodes, gpus_per_node, tp,
    stages, dp, world): the layouts the name stands for. ``tp_fills_world``: a run that names no tp takes
    every process for tensor parallelism. ``zero``: the name takes a ZeRO stage (default 1).
    ``engine_keys``: which of ``tp_engine`` / ``pp_engine`` a run of this name may set; ``engine(spec)``: the
    library whose engine runs it; ``module``: the :mod:`llmpar.strategies` module that parallelizes it."""

    module: str
    gpus_per_node: Callable[[int, int, int, int, bool], int]
    accepts: Callable[[dict], bool]
    refusal: str
    stages: int = 1
    tp_fills_world: bool = False
    zero: bool = False
    engine_keys: tuple[str, ...] = ()
    engine: Callable[[Any], Engine] = lambda spec: Engine.TORCH

    @property
    def pipelined(self) -> bool:
        return self.stages > 1


def _default(tp, stages, nodes, procs, tp_given):
    return procs


def _model_parallel(per_replica: int):
    """One (or ``per_replica`` data-parallel) copy of the tp x stages model per world."""
    return lambda tp, stages, nodes, procs, tp_given: max(1, per_replica * tp * stages // nodes)


def _tensor(tp, stages, nodes, procs, tp_given):
    return max(1, tp * stages // nodes) if tp_given else procs


PRESETS: dict[str, Preset] = {
    "single": Preset("single", lambda *_: 1, lambda d: d["world"] == 1,
                     "strategy single runs one process: nodes and gpus_per_node must be 1"),
    "data_parallel": Preset("ddp", _default, lambda d: d["tp"] == 1 and d["stages"] == 1,
                            "data_parallel takes no tp or stages (use hybrid_parallel)"),
    "tensor_parallel": Preset("tensor", _tensor, lambda d: d["tp"] > 1 and d["stages"] == 1,
                              "tensor_parallel needs tp > 1 and no stages", tp_fills_world=True,
                              engine_keys=("tp_engine",), engine=lambda spec: spec.tp_engine),
    "pipeline_parallel": Preset("pipeline", _model_parallel(1), lambda d: d["tp"] == 1 and d["dp"] == 1,
                                "pipeline_parallel runs one pipeline: world size {world} must equal stages "
                                "{stages} (use hybrid_parallel for pipeline x data parallel)", stages=2,
                                engine_keys=("pp_engine",), engine=lambda spec: spec.pp_engine),
    "hybrid_parallel": Preset("pipeline", _model_parallel(2), lambda d: d["stages"] > 1,
                              "hybrid_parallel needs stages > 1", stages=2, engine_keys=("tp_engine", "pp_engine"),
                              engine=lambda spec: spec.pp_engine),
    "fsdp": Preset("fsdp", _default, lambda d: d["stages"] == 1, "fsdp composes with tp, not with stages",
                   engine_keys=("tp_engine",)),
    "zero": Preset("zero", _default, lambda d: d["tp"] == 1, "zero composes with stages (ZeRO-1), not with tp",
                   zero=True, engine_keys=("pp_engine",), engine=lambda spec: Engine.DEEPSPEED),
}
STRATEGIES = tuple(PRESETS)


def default_micro_batches(stages: int, pipelined: bool) -> int:
    """Micro-batches per step of a run that names neither micro-batches nor their size: enough for a
    pipeline to keep its bubble small (max(4, 2 x stages)), else one."""
    return max(4, 2 * stages) if stages > 1 or pipelined else 1


def virtual_stages(stages: int, schedule: Schedule) -> int:
    """Model chunks per pipeline rank: 2 for interleaved 1F1B across stages, else 1."""
    return 2 if stages > 1 and schedule is Schedule.INTERLEAVED_1F1B else 1


DDP_BUCKET_MB = 25  # DistributedDataParallel's own default bucket_cap_mb


@dataclass(frozen=True)
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
    schedule: Schedule = Schedule.ONE_F_ONE_B
    tp_engine: Engine = Engine.DEEPSPEED
    pp_engine: Engine = Engine.DEEPSPEED
    zero_stage: int = 0
    offload: str = "none"
    reshard_after_forward: bool = True
    ddp_bucket_mb: float = DDP_BUCKET_MB
    pipeline_balance: str = "parameters"
    precision: Precision = Precision.FP32
    compile: bool = False
    compile_mode: str = "default"
    fused_projections: bool = False
    mlp: str = "torch"
    norm: str = "torch"
    activation_checkpointing: str = "none"
    runtime_min: int = 20
    fault: dict | None = None

    def __post_init__(self):
        # the enums from their values (a spec read back from JSON holds strings)
        for key, kind in (("schedule", Schedule), ("tp_engine", Engine), ("pp_engine", Engine),
                          ("precision", Precision)):
            object.__setattr__(self, key, kind(getattr(self, key)))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: dp replicas x micro-batches x micro-batch size."""
        return self.dp * self.micro_batches * self.micro_batch_size

    @property
    def preset(self) -> Preset:
        return PRESETS[self.strategy]

    @property
    def engine(self) -> Engine:
        """Which library's engine runs the layout (its strategy preset says)."""
        return Engine(self.preset.engine(self))

    @property
    def pipelined(self) -> bool:
        """Trains through a pipeline schedule: a pipeline strategy (one stage included) or stages > 1."""
        return self.preset.pipelined or self.stages > 1

    @property
    def virtual_stages(self) -> int:
        return virtual_stages(self.stages, self.schedule)

    @property
    def ddp(self) -> bool:
        """Data parallel through PyTorch DDP (bucketed all-reduce inside backward)."""
        return self.strategy == "data_parallel"

    @property
    def sharding(self) -> Sharding:
        if self.strategy == "fsdp":
            return Sharding.FSDP
        if self.preset.zero:
            return (Sharding.NONE, Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3)[self.zero_stage]
        return Sharding.NONE

    @property
    def tp_splits_head(self) -> bool:
        """Whether tensor parallelism splits the output head over the vocabulary (DeepSpeed AutoTP does;
        torch TP replicates it)."""
        return self.engine is Engine.DEEPSPEED

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)


def _plain(value):
    return str(value) if isinstance(value, enum.Enum) else value


# --------------------------------------------------------------------------- resolving a run entry


def resolve(name: str, entry: dict, model: dict, train: dict, runtime_min: int = 20,
            default_procs: int = 2) -> RunSpec:
    """Fill the sizes a run entry leaves out and check the layout. Raises ConfigError naming the run.

    ``model`` and ``train``: the study's (schema-filled) sections; ``runtime_min``: the study's
    ``launch.runtime_min``. ``default_procs`` is the process count per node of a multi-process run that
    names none: 2 in a study config (so a config resolves the same on every machine), the visible GPUs on
    the CLI. A ``micro_batch_size: auto`` entry is resolved by the plan (``llmpar.plan.auto_micro_batch``).
    """
    strategy = entry["strategy"]
    preset = PRESETS[strategy]
    where = f"runs.{name}"

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
    schedule = Schedule(get("schedule", "1f1b"))
    if schedule is Schedule.INTERLEAVED_1F1B and stages < 2:
        raise ConfigError(f"{where}.schedule: interleaved_1f1b interleaves chunks across stages; it needs "
                          f"stages >= 2, got {stages}")
    chunks = stages * virtual_stages(stages, schedule)
    if dims["num_layers"] < chunks:
        raise ConfigError(
            f"{where}: {dims['num_layers']} layers cannot fill {chunks} pipeline chunks "
            f"(stages {stages}, schedule {schedule}); layers must be >= stages"
        )

    # batch split: the run's own global batch, else batch_per_replica x dp (weak scaling), else the study's
    gb = entry.get("global_batch") or (train["batch_per_replica"] * dp if train.get("batch_per_replica")
                                       else train["global_batch"])
    mbs = entry.get("micro_batch_size")
    m = entry.get("micro_batches")
    if m is None and mbs is None:
        mbs_cfg = train.get("micro_batch_size")
        if mbs_cfg and stages == 1:
            mbs = mbs_cfg
        else:
            m = default_micro_batches(stages, preset.pipelined)
    if m is None:
        if mbs < 1 or gb % (dp * mbs):
            raise ConfigError(
                f"{where}: global batch {gb} is not divisible by dp {dp} x micro_batch_size {mbs}"
            )
        m = gb // (dp * mbs)
    if m < 1 or gb % (dp * m):
        raise ConfigError(
            f"{where}: global batch {gb} is not divisible by dp {dp} x micro-batches {m}"
        )
    mbs = gb // (dp * m)
    if schedule is Schedule.INTERLEAVED_1F1B and m % stages:
        raise ConfigError(f"{where}: interleaved_1f1b needs micro-batches ({m}) divisible by stages ({stages})")

    # What each engine can run: checked here, once (the engines trust the spec)
    pp_engine = Engine(get("pp_engine", "deepspeed"))
    # FSDP x TP and TP inside torch pipeline stages only exist on the torch engine.
    tp_engine = Engine(get("tp_engine", "torch" if strategy == "fsdp" or pp_engine is Engine.TORCH and stages > 1
                           else "deepspeed"))
    spec = RunSpec(
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
        offload=get("offload", "none"),
        reshard_after_forward=get("reshard_after_forward", True),
        ddp_bucket_mb=get("ddp_bucket_mb", DDP_BUCKET_MB),
        pipeline_balance=get("pipeline_balance", "parameters"),
        precision=Precision(get("precision", train["precision"])),
        compile=get("compile", train["compile"]),
        compile_mode=get("compile_mode", train["compile_mode"]),
        fused_projections=get("fused_projections", train["fused_projections"]),
        mlp=get("mlp", train["mlp"]),
        norm=get("norm", train["norm"]),
        activation_checkpointing=get("activation_checkpointing", train["activation_checkpointing"]),
        runtime_min=get("runtime_min", runtime_min),
        fault=entry.get("fault"),
    )
    check_engine(spec, entry, where)
    return spec


def run_train(cfg: dict, name: str) -> dict:
    """The train settings run ``name`` of a prepared config trains with: the study's, with the run's own
    global batch and what follows from it (learning rate, steps, evaluation spacing; ``cfg["run_train"]``)."""
    return {**cfg["train"], **cfg.get("run_train", {}).get(name, {})}


OWN_FORWARD_ENGINES = ". Use it with single, data_parallel, fsdp (tp 1) or a torch pipeline (pp_engine: torch, tp 1)"


def own_forward_conflict(spec: RunSpec) -> str:
    """Why a lever whose forward reads the projections' weights past their modules (fused_projections,
    mlp quack) cannot run on ``spec``'s engine (DeepSpeed's, or torch tensor parallelism)."""
    return ("torch tensor parallelism shards each projection by itself" if spec.engine is not Engine.DEEPSPEED
            else "DeepSpeed's engines (ZeRO-3's gathers, AutoTP's shards, the pipeline's layer specs) work on those "
            "modules")


def check_engine(spec: RunSpec, entry: dict, where: str) -> None:
    """What each engine can run, checked once before any process starts (the engines trust the spec)."""
    strategy, stages, tp, m = spec.strategy, spec.stages, spec.tp, spec.micro_batches
    if spec.preset.zero and spec.zero_stage == 0:
        raise ConfigError(f"{where}.zero_stage: strategy zero needs ZeRO stage 1, 2 or 3, got 0")
    if spec.preset.zero and stages > 1 and spec.pp_engine is not Engine.DEEPSPEED:
        raise ConfigError(f"{where}.pp_engine: ZeRO-1 with pipeline stages runs on DeepSpeed's pipeline engine "
                          "(pp_engine: deepspeed)")
    # DeepSpeed's pipeline engine: a pipeline or hybrid on pp_engine deepspeed (one stage included), ZeRO-1
    # with stages
    if spec.engine is Engine.DEEPSPEED and spec.pipelined:
        if tp > 1:
            raise ConfigError(
                f"{where}: DeepSpeed's pipeline engine cannot run AutoTP inside its stages (tp {tp}): AutoTP "
                "builds its own (data, tensor) mesh over the whole world and replaces the engine's mpu, while "
                "the PipelineEngine takes its groups from the PipelineModule's topology. Use pp_engine: torch "
                "for pipeline x tensor parallelism")
        if spec.schedule is not Schedule.ONE_F_ONE_B:
            raise ConfigError(
                f"{where}: DeepSpeed's PipelineEngine runs only its 1F1B TrainSchedule, not {spec.schedule}; gpipe "
                "and interleaved_1f1b are implemented by the torch engine (pp_engine: torch)")
    if tp > 1 and spec.tp_engine is not Engine.TORCH and (strategy == "fsdp" or stages > 1):
        where_tp = "fsdp x tp" if strategy == "fsdp" else "tensor parallel inside pipeline stages"
        raise ConfigError(f"{where}: {where_tp} runs on the torch tensor-parallel engine only (tp_engine: torch)")
    if stages > 1 and spec.pp_engine is Engine.TORCH and spec.schedule is Schedule.ONE_F_ONE_B and m < stages:
        raise ConfigError(f"{where}: 1f1b needs at least as many micro-batches ({m}) as stages ({stages})")
    if spec.offload != "none" and spec.zero_stage < 1:
        raise ConfigError(f"{where}.offload: offload {spec.offload} needs DeepSpeed ZeRO (strategy zero); "
                          f"{strategy} runs no ZeRO stage")
    if spec.offload == "parameters" and spec.zero_stage != 3:
        raise ConfigError(f"{where}.offload: offload parameters needs ZeRO stage 3 (only stage 3 partitions "
                          f"parameters), got zero_stage {spec.zero_stage}; use offload optimizer")
    if spec.precision is Precision.BF16_PURE and spec.engine is Engine.DEEPSPEED and spec.zero_stage < 1:
        raise ConfigError(
            f"{where}: precision bf16-pure (bf16 weights and optimizer states, no fp32 master) is available in "
            "DeepSpeed only through bf16_master_weights_and_grads, which requires ZeRO stage 1-3; this run's "
            "DeepSpeed engine runs none. Use precision bf16 (fp32 weights under torch autocast) or a torch engine")
    if spec.precision is Precision.BF16_MASTER and strategy != "single":
        raise ConfigError(
            f"{where}: precision bf16-master (bf16 weights, fp32 master weights and gradient sums in the optimizer) "
            f"is implemented for strategy single, not {strategy}; use precision bf16-residual, whose autocast "
            "rounds the same weights to bf16 in every projection")
    if spec.fused_projections and (spec.engine is Engine.DEEPSPEED or tp > 1):
        raise ConfigError(
            f"{where}.fused_projections: the fused query/key/value and gate/up GEMMs read the projections' weights "
            f"in the layer's own forward, past the projection modules; {own_forward_conflict(spec)}"
            + OWN_FORWARD_ENGINES)
    if spec.mlp in QUACK_MLPS and (spec.engine is Engine.DEEPSPEED or tp > 1):
        raise ConfigError(
            f"{where}.mlp: quack's gated MLP reads the gate, up and down weights in the MLP's own forward, past the "
            f"projection modules; {own_forward_conflict(spec)}" + OWN_FORWARD_ENGINES)
    if spec.norm == "quack" and strategy != "single":
        raise ConfigError(
            f"{where}.norm: norm quack (the residual adds fused into quack's RMSNorms, the decoder layers handing "
            f"each other the stream and the branch output unsummed) is implemented for strategy single, not "
            f"{strategy}; use norm torch")
    if spec.compile_mode != "default" and not spec.compile:
        raise ConfigError(f"{where}.compile_mode: compile_mode {spec.compile_mode} applies to compiled layers, and "
                          "this run has compile false")
    if spec.pipeline_balance != "parameters" and not (stages > 1 and spec.pp_engine is Engine.TORCH):
        raise ConfigError(
            f"{where}.pipeline_balance: balancing stages by {spec.pipeline_balance} applies to torch pipelines "
            "(stages > 1, pp_engine: torch); DeepSpeed's PipelineModule partitions by parameters")
    if "ddp_bucket_mb" in entry and strategy != "data_parallel":
        raise ConfigError(f"{where}.ddp_bucket_mb applies to strategy data_parallel (DistributedDataParallel), not "
                          f"{strategy}")
    for key in ("tp_engine", "pp_engine"):
        if key in entry and key not in spec.preset.engine_keys:
            raise ConfigError(f"{where}.{key} does not apply to strategy {strategy}")
