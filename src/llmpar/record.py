"""A run's record: its summary (:class:`RunRecord`) and rows, written by the training loop or the launcher
and read by the aggregation, the plan's calibration and the report — one shape, one writer, one reader.

A run directory holds ``steps.jsonl``, ``evals.jsonl``, ``samples.jsonl`` and, written last and atomically,
``summary.json``: its presence means the run is complete (:func:`write_run`). An expected failure (out of
memory, divergence, a layout the machine cannot hold) is a record too, with that status and the steps run
so far (:meth:`RunRecord.failure`). Every field is defined: a metric in
:data:`llmpar.metrics.definitions.DEFINITIONS` (by its name, or the entry named in its ``defined_by``), any
other field by its ``doc`` (tests/test_record.py checks that each one is).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmpar.errors import UserError
from llmpar.io import read_json, read_jsonl, write_json, write_jsonl

STATUSES = ("ok", "oom", "diverged", "invalid")
FAILURE_FILE = ".failure-rank{rank}.json"  # an expected failure, left by a worker for the launcher


class IncompleteRun(UserError):
    """A run directory whose record is missing, unreadable or inconsistent: never taken as a result."""


def doc(text: str, default: Any = None):
    return field(default=default, metadata={"doc": text})


def defined_by(metric: str, default: Any = None):
    return field(default=default, metadata={"defined_by": metric})


def metric(default: Any = None):
    """A field named as its definition in DEFINITIONS."""
    return field(default=default)


@dataclass
class RunRecord:
    """``summary.json`` of one run. The first block is present in every record, failures included; the
    rest is None where the run did not get that far (or, for summaries written before a field existed,
    where it was not yet recorded)."""

    run: str = doc("The run's name in the study (its directory under results/<study>/runs/).")
    status: str = doc("ok, or the expected failure the run ended in: oom, diverged, invalid.")
    message: str = doc("Why a failed run failed (empty for ok).", "")
    spec: dict = doc("The resolved run layout (llmpar.layout.RunSpec) the run trained with.", None)
    strategy: str = doc("The strategy name (a row of llmpar.layout.PRESETS).", None)
    world_size: int = doc("Processes (GPUs) of the run: nodes x gpus_per_node.", None)
    nodes: int = doc("Nodes the run spanned.", None)
    gpus_per_node: int = doc("Processes per node.", None)
    steps_completed: int = doc("Optimizer steps in steps.jsonl (one row per step, the newest attempt's).", 0)
    steps_planned: int = doc("The steps the run was to train (train.steps, or from train.train_tokens).", None)
    stopped_at_target: bool | None = doc("Whether the run ended early at its first validation at or below "
                                         "train.target_loss (train.stop_at_target).")
    global_batch: int | None = doc("Sequences per optimizer step of this run.")

    node_names: list | None = doc("Host names of the run's nodes.")
    device: str | None = doc("cuda or cpu.")
    backend: str | None = doc("torch.distributed backend: nccl or gloo.")
    tokens_trained: int | None = doc("Tokens trained in the completed steps (global batch x sequence x steps).")
    attempts: int | None = doc("Launches of the run: 1, plus one per resume from a checkpoint.")
    redone_steps: int | None = doc("Step rows of earlier attempts that a resume trained again (dropped).")
    state_bytes_at: str | None = defined_by("state_gib_per_rank")
    wall_time_s: float | None = metric()
    started_at: float | None = doc("Unix time the run's first attempt started.")
    finished_at: float | None = doc("Unix time the summary was written.")
    tokens_per_s: float | None = metric()
    samples_per_s: float | None = metric()
    tokens_per_s_per_gpu: float | None = metric()
    samples_per_s_per_gpu: float | None = defined_by("tokens_per_s_per_gpu")
    tokens_per_s_overall: float | None = metric()
    samples_per_s_overall: float | None = defined_by("tokens_per_s_overall")
    steady_steps: int | None = defined_by("tokens_per_s")
    steady_time_s: float | None = defined_by("tokens_per_s")
    goodput_steps_per_s: float | None = metric()
    gradient_noise_scale: float | None = metric()
    gradient_noise_scale_mean: float | None = defined_by("gradient_noise_scale")
    gradient_noise_scale_se: float | None = defined_by("gradient_noise_scale")
    noise_scale_small_batch: int | None = defined_by("gradient_noise_scale")
    noise_scale_reason: str | None = defined_by("gradient_noise_scale")
    final_loss: float | None = defined_by("loss")
    final_val_loss: float | None = defined_by("val_loss")
    final_val_ppl: float | None = defined_by("val_loss")
    first_update_norm: dict | None = metric()
    target_loss: float | None = defined_by("tokens_to_target")
    target_reached: bool | None = defined_by("tokens_to_target")
    tokens_to_target: int | None = metric()
    seconds_to_target: float | None = metric()
    step_to_target: int | None = defined_by("tokens_to_target")
    val_loss_at_tokens: dict | None = metric()
    memory_kind: str | None = defined_by("peak_mem_gib")
    peak_mem_gib: float | None = metric()
    peak_reserved_gib: float | None = defined_by("peak_mem_gib")
    device_mem_used_gib: float | None = defined_by("peak_mem_gib")
    per_rank: list | None = doc("Per rank: node, peak memory, model-state bytes, local parameters, phase times, "
                                "the noise scale's replica norms and what the run observably compiled.")
    util_mean_pct: float | None = metric()
    util_median_pct: float | None = defined_by("util_mean_pct")
    util_per_rank: dict | None = defined_by("util_mean_pct")
    utilization_kind: str | None = defined_by("util_mean_pct")
    utilization_note: str | None = doc("Why utilization was not sampled (no NVML), else None.")
    flops_per_token: float | None = defined_by("mfu")
    peak_flops: float | None = defined_by("mfu")
    mfu: float | None = metric()
    params_total: int | None = doc("Parameters of the model (embedding, layers, final norm and output head).")
    time_breakdown: dict | None = metric()
    bubble_measured: float | None = defined_by("time_breakdown")
    bubble_theoretical: float | None = defined_by("time_breakdown")
    environment: dict | None = doc("Package versions, hardware, host and git commit the run ran with.")
    config_hash: str | None = doc("Hash of everything that changes the training (seed, model, train, run, data): "
                                  "a checkpoint resumes only a run of the same hash.")
    data: dict | None = doc("The token shards' metadata (vocabulary, token counts, corpus) the run trained on.")

    # the fields a complete (ok or diverged) record must hold, and a failed one
    REQUIRED_OK = ("run", "status", "strategy", "world_size", "wall_time_s", "tokens_per_s", "peak_mem_gib",
                   "steps_completed", "steps_planned")
    REQUIRED_FAILED = ("run", "status", "message", "strategy", "world_size")

    # fields that records of earlier versions carry and this version derives elsewhere: read and dropped
    # (Pollux's efficiency and goodput depend on the study's reference batch: the aggregation computes them)
    RETIRED = ("pollux_efficiency", "pollux_goodput", "pollux_goodput_reason")

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def failure(cls, rc: dict, status: str, message: str, steps: list[dict]) -> RunRecord:
        """The record of a run that ended in an expected failure (no steps, or the steps so far)."""
        run = rc["run"]
        return cls(run=run["name"], status=status, message=message, spec=run, strategy=run["strategy"],
                   world_size=run["nodes"] * run["gpus_per_node"], nodes=run["nodes"],
                   gpus_per_node=run["gpus_per_node"], steps_completed=len(steps), steps_planned=rc["train"]["steps"])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "summary") -> RunRecord:
        """A record from its JSON, checked: a known status and the fields that status requires."""
        status = data.get("status")
        if status not in STATUSES:
            raise IncompleteRun(f"{where}: status {status!r} is not one of {STATUSES}")
        required = cls.REQUIRED_OK if status in ("ok", "diverged") else cls.REQUIRED_FAILED
        missing = [k for k in required if k not in data]
        if missing:
            raise IncompleteRun(f"{where} is incomplete: missing {', '.join(missing)}")
        names = {f.name for f in cls.fields()}
        unknown = sorted(set(data) - names - set(cls.RETIRED))
        if unknown:
            raise IncompleteRun(f"{where}: unknown fields {unknown} (not a run record of this version)")
        return cls(**{k: v for k, v in data.items() if k in names})


def write_run(out: Path, record: RunRecord, steps: list[dict], evals: list[dict], samples: list[dict]) -> None:
    """The run directory's files, the summary last (each file atomically)."""
    write_jsonl(out / "steps.jsonl", steps)
    write_jsonl(out / "evals.jsonl", evals)
    write_jsonl(out / "samples.jsonl", samples)
    write_json(out / "summary.json", record.to_json())


def read_run(run_dir: Path) -> dict:
    """A run's record and rows; raises IncompleteRun naming the file and what is wrong with it."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise IncompleteRun(f"run directory {run_dir} has no summary.json: the run is missing or incomplete")
    try:
        data = read_json(summary_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompleteRun(f"{summary_path} is not valid JSON ({exc}): incomplete run") from exc
    if not isinstance(data, dict):
        raise IncompleteRun(f"{summary_path} holds a JSON {type(data).__name__}, not a run record: incomplete run")
    record = RunRecord.from_json(data, str(summary_path))
    rows = {}
    for name in ("steps", "evals", "samples"):
        path = run_dir / f"{name}.jsonl"
        try:
            rows[name] = read_jsonl(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IncompleteRun(f"{path} of run {run_dir.name} is damaged ({exc}): rerun or resume the run") from exc
    finished = record.steps_completed == record.steps_planned or record.stopped_at_target
    if record.status == "ok" and (len(rows["steps"]) != record.steps_completed or not finished):
        raise IncompleteRun(
            f"{run_dir}: summary says {record.steps_completed}/{record.steps_planned} steps but "
            f"steps.jsonl has {len(rows['steps'])} rows: incomplete run"
        )
    return {"record": record, **rows}


DAMAGED_SUFFIX = ".damaged"  # summary.json of a damaged record, set aside (set_aside_damaged_records)


def set_aside_damaged_records(runs_dir: Path, runs: list[str]) -> dict[str, str]:
    """Each run of ``runs`` whose directory holds a summary.json that is not a complete record (the summary
    or a row file unreadable, damaged or inconsistent with it: :func:`read_run`) loses its summary: renamed
    to ``summary.json.damaged``, so the run is incomplete and is trained again (resumed from its newest
    intact checkpoint). Returns run -> what was wrong. A run without a summary is left as it is."""
    bad = {}
    for run in runs:
        run_dir = Path(runs_dir) / run
        summary = run_dir / "summary.json"
        if summary.is_file():
            try:
                read_run(run_dir)
            except IncompleteRun as exc:
                summary.replace(summary.with_name(summary.name + DAMAGED_SUFFIX))
                bad[run] = str(exc)
    return bad


def write_failure(out: Path, rank: int, status: str, message: str, traceback: str) -> None:
    """A worker's expected failure, for the launcher to turn into the run's record (:func:`collect_failure`)."""
    write_json(out / FAILURE_FILE.format(rank=rank),
               {"status": status, "message": message, "rank": rank, "traceback": traceback})


def collect_failure(out: Path) -> dict | None:
    """The first rank's expected failure left in ``out`` (the files are removed), or None."""
    files = sorted(out.glob(FAILURE_FILE.format(rank="*")))
    if not files:
        return None
    failures = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    first = failures[0]
    return {"status": first["status"], "message": f"rank {first['rank']}: {first['message']}"}
