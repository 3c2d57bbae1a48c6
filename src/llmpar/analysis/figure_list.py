"""The study's figures, named once, and the one colour of each strategy: the workflow asks for the figures,
``figures.py`` draws them, the report titles them here and captions them from ``report/captions/<name>.rst``.
No plotting imports: the Snakefile reads this module."""

from __future__ import annotations

# figure name -> one-line title; the captions say what is plotted and what to look at.
FIGURES = {
    "throughput": "Steady-state throughput per run",
    "time_budget": "Where each run's wall time went",
    "memory": "Peak memory per rank per run",
    "memory_breakdown": "Parameter, gradient and optimizer-state memory per rank",
    "loss_vs_time": "Training loss against wall time",
    "loss_vs_tokens": "Training loss against trained tokens",
    "resources_over_time": "Memory and utilization over time, one panel per run",
    "noise_scale": "Gradient noise scale and Pollux goodput per run",
    "scaling": "Throughput against GPU count per strategy",
    "plan_vs_measured": "Predicted before run against measured, per run",
    "extrapolation": "Predicted throughput per GPU beyond one machine (model output)",
    "batch_sweep": "Steps against sequences to the target loss, and the critical batch against the loss",
}
# the caption file of a figure where it is not <name>.rst (extrapolation.rst captions the table)
CAPTION_FILES = {"extrapolation": "extrapolation_figure.rst"}
# drawn by the plan's own rule (from plan.csv and extrapolation.csv) and the batch sweep's, not from the study's
# tables
PLAN_FIGURES = ("plan_vs_measured", "extrapolation", "batch_sweep")

# Strategies in the order the report groups runs by (families: one process, data parallel and its
# sharded forms, model parallel, both), each with one colour in every figure of every report
# (Okabe-Ito, distinguishable with the common colour-vision deficiencies) and a label.
STRATEGIES = {
    "single": ("#000000", "single GPU"),
    "data_parallel": ("#0072B2", "DDP"),
    "fsdp": ("#56B4E9", "FSDP2"),
    "zero": ("#009E73", "ZeRO"),
    "tensor_parallel": ("#D55E00", "tensor parallel"),
    "pipeline_parallel": ("#CC79A7", "pipeline"),
    "hybrid_parallel": ("#E69F00", "pipeline × data"),
}
OTHER_COLOUR = "#999999"  # a strategy the table does not know yet, and the plan's 3-D layout
# the plan's extrapolation names layouts, not strategies: each takes its strategy's colour
EXTRAPOLATION_STRATEGY = {"data_parallel": "data_parallel", "fsdp": "fsdp", "zero1": "zero", "zero2": "zero",
                          "zero3": "zero", "tensor_parallel": "tensor_parallel", "pipeline": "pipeline_parallel",
                          "hybrid_pp_dp": "hybrid_parallel", "3d_pp_tp_dp": "3d"}


def caption_file(name: str) -> str:
    return CAPTION_FILES.get(name, f"{name}.rst")


def colour(strategy: str) -> str:
    return STRATEGIES.get(strategy, (OTHER_COLOUR, strategy))[0]


def strategy_label(strategy: str) -> str:
    return STRATEGIES.get(strategy, (OTHER_COLOUR, strategy))[1]


def family_rank(strategy: str) -> int:
    """Position of a strategy in the report's grouping (unknown strategies last)."""
    order = list(STRATEGIES)
    return order.index(strategy) if strategy in order else len(order)


def study_figures(scaling: bool) -> list[str]:
    """The figures drawn from a study's tables: all but the plan's, and ``scaling`` only where the study, with
    the studies it is compared with, has runs at more than one GPU count."""
    return [n for n in FIGURES if n not in PLAN_FIGURES and (scaling or n != "scaling")]
