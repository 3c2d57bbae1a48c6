# Configuration (validated against schemas/config.schema.yaml, runs resolved) and input functions.
import json
import os
import re
import shlex
import sys
from pathlib import Path

from llmpar.analysis.batch_sweep import is_sweep
from llmpar.analysis.figure_list import caption_file, study_figures
from llmpar.config import check_config_files, load_yaml, prepare, run_config
from llmpar.data.corpus import check_source
from llmpar.errors import UserError
from llmpar.interrupts import forward_stop_signals
from llmpar.record import set_aside_damaged_records

try:
    check_config_files(workflow.configfiles)
    CFG = prepare(config)
    if not CFG["recorded"]:
        check_source(
            CFG["data"],
            CFG["model"]["seq_len"],
            CFG["seed"],
            CFG["tokenizer"],
            f"results/{CFG['study']}/data",
        )
except UserError as exc:
    raise WorkflowError(f"invalid configuration: {exc}")


# SIGINT or SIGTERM to the snakemake process alone also stops the running jobs (llmpar.interrupts).
onstart:
    forward_stop_signals()


STUDY = CFG["study"]
RUNS = list(CFG["runs"])
# points of a sweep that their layout cannot train: each a record with the reason (rule refuse), a row of the tables
REFUSED = list(CFG["refused"])
RES = f"results/{STUDY}"
LOGS = f"logs/{STUDY}"
# Entry points relative to the working directory (stable params when a checkout moves).
BASE = Path(os.path.relpath(workflow.basedir))
STUDY_PY = str(BASE / "scripts" / "study.py")
TRAIN_PY = str(BASE / "scripts" / "train.py")
CAPTIONS = str(BASE / "report" / "captions")
# The plan's model (the plan package, the shape and layout it reads) and the card constants: a change to
# any rebuilds plan.csv and what follows from it.
PLAN_MODEL = sorted(
    str(p)
    for pattern in ("plan/*.py", "shape.py", "layout.py", "cards.yaml")
    for p in (BASE / "src" / "llmpar").glob(pattern)
)
ENV = "../envs/llmpar.yaml"
# the scaling figure where the study's runs, with the studies it is compared with, span several GPU counts
GPU_COUNTS = {r["nodes"] * r["gpus_per_node"] for r in CFG["runs"].values()}
FIGURE_NAMES = study_figures(len(GPU_COUNTS) > 1 or bool(CFG["compare_with"]))
# The card the study is planned for: with one, the plan step compares predictions with the recorded runs
# and extrapolates; without (the CPU study) the report says the plan is not calibrated for CPU.
CARD = CFG["train"].get("card")


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def run_json(wildcards):
    """Everything one training job needs; a change to any of it reruns exactly that job."""
    return as_json(run_config(CFG, wildcards.run))


def summaries():
    return expand(f"{RES}/runs/{{run}}/summary.json", run=RUNS + REFUSED)


def run_steps():
    return expand(f"{RES}/runs/{{run}}/steps.jsonl", run=RUNS + REFUSED)


def one_of(names):
    """A wildcard pattern matching exactly these run names."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# A run whose record is damaged (summary.json or a row file unreadable, or inconsistent with each other)
# is no result: its summary is set aside, so the run is trained again (resumed from its newest intact
# checkpoint) and everything made from it is rebuilt. Checked at every start of the workflow.
if workflow.is_main_process and not CFG["recorded"]:
    for run, problem in set_aside_damaged_records(Path(RES) / "runs", RUNS).items():
        print(
            f"run {run}: {problem}; its summary.json is set aside as summary.json.damaged "
            "and the run is trained again",
            file=sys.stderr,
        )


def figures():
    return expand(
        f"{RES}/figures/{{name}}.{{ext}}", name=FIGURE_NAMES, ext=["png", "svg"]
    )


def plan_outputs():
    """plan.csv, extrapolation.csv and their figures (PNG, SVG) where the study names a card."""
    if not CARD:
        return {}
    return {
        "plan": f"{RES}/plan.csv",
        "extrapolation": f"{RES}/extrapolation.csv",
        "plan_figure": f"{RES}/figures/plan_vs_measured.png",
        "plan_figure_svg": f"{RES}/figures/plan_vs_measured.svg",
        "extrapolation_figure": f"{RES}/figures/extrapolation.png",
        "extrapolation_figure_svg": f"{RES}/figures/extrapolation.svg",
    }


def sweep_from_inputs():
    """The recorded runs of the batch-size sweep the plan takes steps to a target from (sweep_from), so a
    change to them rebuilds the plan's tables."""
    if not CFG.get("sweep_from"):
        return []
    sweep = prepare(load_yaml(CFG["sweep_from"]))
    return expand(
        f"results/{sweep['study']}/runs/{{run}}/{{name}}",
        run=list(sweep["runs"]),
        name=["summary.json", "evals.jsonl"],
    )


def plan_args(wildcards, input):
    """The report's plan and batch-sweep arguments: their files where the study has them, else none."""
    keys = {
        "plan": "--plan",
        "extrapolation": "--extrapolation",
        "plan_figure": "--plan-figure",
        "extrapolation_figure": "--extrapolation-figure",
        "sweep_table": "--sweep-table",
        "sweep_fit": "--sweep-fit",
        "sweep_figure": "--sweep-figure",
    }
    return " ".join(
        f"{flag} {shlex.quote(input[key])}"
        for key, flag in keys.items()
        if key in input.keys()
    )


def sweep_outputs():
    """The batch-size sweep's tables and figure, where the study is one (runs at three or more global batches
    and a target loss)."""
    if not is_sweep(CFG):
        return {}
    return {
        "sweep_table": f"{RES}/batch_sweep.csv",
        "sweep_fit": f"{RES}/batch_sweep_fit.csv",
        "sweep_figure": f"{RES}/figures/batch_sweep.png",
        "sweep_figure_svg": f"{RES}/figures/batch_sweep.svg",
    }


def final_outputs():
    """What the study makes. The run records are targets themselves: Snakemake rebuilds a missing file
    that is not a target only for a job that reruns anyway, so a deleted summary.json under tables that
    are newer than the summaries left would otherwise never be trained again."""
    return [
        *summaries(),
        *run_steps(),
        f"{RES}/metrics.csv",
        f"{RES}/steps.csv",
        *figures(),
        *plan_outputs().values(),
        *sweep_outputs().values(),
        f"report/{STUDY}/report.html",
    ]


def parent(key):
    """Param function: the directory of output (or input) ``key``."""
    return lambda wildcards, output: str(Path(getattr(output, key)).parent)


# --------------------------------------------------------------------------- data.source debian
DEBIAN = f"{RES}/data/debian"


def debian_fetch_settings():
    """What the download depends on: package names and version pins (not globs or text settings)."""
    packages = [
        {"name": p["name"], "version": p["version"]}
        for p in CFG["data"]["debian"]["packages"]
    ]
    return as_json({"packages": packages})


def debian_texts():
    """The per-package text files of the debian_text rule."""
    return [f"{DEBIAN}/text/{p['name']}.txt" for p in CFG["data"]["debian"]["packages"]]


def corpus_input(wildcards):
    """The debian source's extracted text; the other sources read their own input."""
    if CFG["data"]["source"] == "debian":
        return {"debian_text": f"{DEBIAN}/text/meta.json"}
    return {}


def text_dir_arg(wildcards, input):
    """The corpus rule's --text-dir for the debian source, nothing for the others."""
    if "debian_text" in input.keys():
        return f"--text-dir {shlex.quote(str(Path(input.debian_text).parent))}"
    return ""


# --------------------------------------------------------------------------- Slurm request
# Resource names of snakemake-executor-plugin-slurm 2.x; partition and account come from the
# profile (profiles/slurm), never from here. A resource that is None is left out of the job.
TRAIN_RESOURCE_KEYS = (
    "nodes",
    "tasks",
    "mpi",
    "gpu",
    "gpu_model",
    "gres",
    "tasks_per_gpu",
    "cpus_per_task",
    "mem_mb",
    "runtime",
)


def train_request(run, attempt=1):
    """The Slurm request of training run ``run``: one task per node, every CPU, GPU and MB of a node
    for that task. Single node: ``--nodes=1 --gpus=N`` (GPU study). Several nodes: ``--nodes=N
    --ntasks=N`` with ``mpi`` set, so the jobstep runs the launcher in the batch step (not inside
    ``srun -n1``) and scripts/train.py can ``srun`` one torchrun agent per node; GPUs per node as
    ``--gres=gpu:G``. A retried job (cancelled, preempted, timed out) gets ``attempt`` x the
    runtime.
    """
    spec, launch = CFG["runs"][run], CFG["launch"]
    nodes, per_node = spec["nodes"], spec["gpus_per_node"]
    gpu_type = launch.get("gpu_type")
    gpus = f"{gpu_type}:{per_node}" if gpu_type else str(per_node)
    req = dict.fromkeys(TRAIN_RESOURCE_KEYS)
    req.update(
        nodes=nodes,
        cpus_per_task=per_node * launch["cpus_per_gpu"],
        mem_mb=per_node * launch["mem_mb_per_gpu"],
        runtime=spec["runtime_min"] * attempt,
    )
    if nodes > 1:
        req.update(tasks=nodes, mpi="srun")
        if launch["gpus"]:
            req["gres"] = f"gpu:{gpus}"
            # without it the plugin turns ``tasks`` of a GPU job into --ntasks-per-gpu
            req["tasks_per_gpu"] = 0
    elif launch["gpus"]:
        req.update(gpu=per_node, gpu_model=gpu_type)
    return req


def train_resources():
    """The `resources:` of the training rule: one function (of run wildcard and attempt) per key."""

    def resource(key):
        return lambda wildcards, attempt: train_request(wildcards.run, attempt)[key]

    return {key: resource(key) for key in TRAIN_RESOURCE_KEYS}
