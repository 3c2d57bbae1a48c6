"""Strategy names are presets of one layout: what a name fills in, which layouts it accepts, and which
module parallelizes it (``parallelize(model, spec, ctx, train_cfg) -> Engine``).

``PRESETS`` is the one table of strategy names: the config schema's ``strategy`` choices, the training
CLI's ``--strategy`` and ``config.resolve_run`` (which turns a run entry into one checked layout of
degrees: nodes, processes per node, tp, stages, dp, micro-batches, engines) read it. Adding a strategy
is an engine module, a row here and its equivalence test. The loop never branches on the strategy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """What a strategy name means before a run's sizes are known.

    ``gpus_per_node(tp, stages, nodes, default_procs, tp_given)``: processes per node for a run that names
    none; ``accepts(degrees)`` and ``refusal`` (formatted with the same degrees: nodes, gpus_per_node, tp,
    stages, dp, world): the layouts the name stands for. ``tp_fills_world``: a run that names no tp takes
    every process for tensor parallelism. ``zero``: the name takes a ZeRO stage (default 1).
    ``engine_keys``: which of ``tp_engine`` / ``pp_engine`` a run of this name may set; ``engine(run)``: the
    library whose engine runs it, ``"torch"`` or ``"deepspeed"``."""

    module: str
    gpus_per_node: Callable[[int, int, int, int, bool], int]
    accepts: Callable[[dict], bool]
    refusal: str
    stages: int = 1
    tp_fills_world: bool = False
    zero: bool = False
    engine_keys: tuple[str, ...] = ()
    engine: Callable[[dict], str] = lambda run: "torch"

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
                              engine_keys=("tp_engine",), engine=lambda run: run["tp_engine"]),
    "pipeline_parallel": Preset("pipeline", _model_parallel(1), lambda d: d["tp"] == 1 and d["dp"] == 1,
                                "pipeline_parallel runs one pipeline: world size {world} must equal stages "
                                "{stages} (use hybrid_parallel for pipeline x data parallel)", stages=2,
                                engine_keys=("pp_engine",), engine=lambda run: run["pp_engine"]),
    "hybrid_parallel": Preset("pipeline", _model_parallel(2), lambda d: d["stages"] > 1,
                              "hybrid_parallel needs stages > 1", stages=2, engine_keys=("tp_engine", "pp_engine"),
                              engine=lambda run: run["pp_engine"]),
    "fsdp": Preset("fsdp", _default, lambda d: d["stages"] == 1, "fsdp composes with tp, not with stages",
                   engine_keys=("tp_engine",)),
    "zero": Preset("zero", _default, lambda d: d["tp"] == 1, "zero composes with stages (ZeRO-1), not with tp",
                   zero=True, engine_keys=("pp_engine",), engine=lambda run: "deepspeed"),
}


def parallelize(model, spec, ctx, train_cfg):
    """Apply ``spec.strategy`` to ``model``; returns a :class:`llmpar.strategies.base.Engine`."""
    if spec.strategy not in PRESETS:
        raise ValueError(f"unknown strategy {spec.strategy!r}")
    module = importlib.import_module(f"llmpar.strategies.{PRESETS[spec.strategy].module}")
    return module.parallelize(model, spec, ctx, train_cfg)
