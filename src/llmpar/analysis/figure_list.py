"""The study's figures, named once: the workflow asks for them, ``figures.py`` draws them, the report
titles them here and captions them from ``report/captions/<name>.rst``. No plotting imports: the
Snakefile reads this module."""

from __future__ import annotations

# figure name -> one-line title; the captions say what is plotted and how.
FIGURES = {
    "throughput": "Steady-state throughput per run",
    "memory": "Peak memory per rank per run",
    "memory_breakdown": "Parameter, gradient and optimizer-state memory per rank",
    "loss_vs_time": "Training loss against wall time",
    "loss_vs_tokens": "Training loss against trained tokens",
    "resources_over_time": "Memory and utilization over time per run",
    "noise_scale": "Gradient noise scale and Pollux goodput per run",
    "scaling": "Throughput against process count per strategy",
    "plan_vs_measured": "Predicted before run against measured, per run",
}
# drawn by the plan's own rule (from plan.csv), not from the study's tables
PLAN_FIGURE = "plan_vs_measured"


def study_figures(sweeps: bool) -> list[str]:
    """The figures drawn from a study's tables: all but the plan's, and ``scaling`` only where the config
    sweeps a size (otherwise there is no process-count axis to plot)."""
    return [n for n in FIGURES if n != PLAN_FIGURE and (sweeps or n != "scaling")]
