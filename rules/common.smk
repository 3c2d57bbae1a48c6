# Configuration (validated against schemas/config.schema.yaml, runs resolved) and input functions.
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from llmpar.config import prepare, run_config  # noqa: E402
from llmpar.data.corpus import check_source  # noqa: E402
from llmpar.errors import UserError  # noqa: E402

try:
    CFG = prepare(config)
    if not CFG["recorded"]:
        check_source(CFG["data"])
except UserError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")

STUDY = CFG["study"]
RUNS = list(CFG["runs"])
RES = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
# Entry points relative to the working directory (stable params when a checkout moves).
BASE = Path(os.path.relpath(workflow.basedir))
STUDY_PY = str(BASE / "scripts" / "study.py")
TRAIN_PY = str(BASE / "scripts" / "train.py")
CAPTIONS = str(BASE / "report" / "captions")
ENV = "../envs/llmpar.yaml"
SWEEPS = any(
    isinstance(v, list) for entry in config["runs"].values() for v in entry.values()
)
FIGURE_NAMES = [
    "throughput",
    "memory",
    "memory_breakdown",
    "loss_vs_time",
    "loss_vs_tokens",
    "resources_over_time",
] + (["scaling"] if SWEEPS else [])


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def run_json(wildcards):
    """Everything one training job needs; a change to any of it reruns exactly that job."""
    return as_json(run_config(CFG, wildcards.run))


def summaries():
    return expand(f"{RES}/runs/{{run}}/summary.json", run=RUNS)


def figures():
    return expand(
        f"{RES}/figures/{{name}}.{{ext}}", name=FIGURE_NAMES, ext=["png", "svg"]
    )


def final_outputs():
    return [
        f"{RES}/metrics.csv",
        f"{RES}/steps.csv",
        *figures(),
        f"report/{STUDY}/report.html",
    ]


def parent(key):
    """Param function: the directory of output (or input) ``key``."""
    return lambda wildcards, output: str(Path(getattr(output, key)).parent)
