"""The report's derived tables, each from recorded files only: per run where and when it was recorded and
where its wall time went (runs.csv), every run of this study and of the studies it is compared with by
GPU count (scaling.csv), and the committed peer frameworks' runs beside ours (peers.csv)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llmpar.analysis.figure_list import family_rank
from llmpar.io import atomic_path, read_json
from llmpar.layout import RunSpec
from llmpar.plan.calibration import NOT_MODELLED
from llmpar.record import RunRecord

# Runs of one commit whose starts follow the previous run's end within this many seconds share a session.
SESSION_GAP_S = 1800
# Summary fields the report shows, whose absence from a summary means it was recorded before they existed.
LATER_FIELDS = ("gradient_noise_scale", "bubble_measured", "state_bytes_at", "first_update_norm")


def _commit(env: dict) -> str | None:
    c = env.get("git_commit")
    if not c or c == "unknown":
        return None
    head, dirty = c.removesuffix("-dirty"), c.endswith("-dirty")
    return head[:7] + ("-dirty" if dirty else "")


def variant(spec: dict, strategy: str) -> str:
    """A run's layout family across GPU counts: strategy, engine, ZeRO stage and pipeline schedule (the
    sizes that change with the GPU count left out), e.g. ``ZeRO-2``, ``TP torch``, ``PP torch 1f1b``."""
    s = RunSpec.from_dict(spec)
    engine = str(s.engine)
    if strategy == "single":
        return "single"
    if strategy == "data_parallel":
        return "DDP"
    if strategy == "fsdp":
        return "FSDP2" + (" + TP" if s.tp > 1 else "")
    if strategy == "zero":
        return f"ZeRO-{s.zero_stage}" + (" + PP" if s.stages > 1 else "")
    if strategy == "tensor_parallel":
        return f"TP {engine}"
    kind = "PP" if strategy == "pipeline_parallel" else "PP×DP"
    schedule = "" if engine == "deepspeed" else f" {s.schedule}"
    return f"{kind} {engine}{schedule}"


def sessions(df: pd.DataFrame) -> pd.Series:
    """Session letter per run: runs sorted by start; a new session where the commit changes or a run starts
    more than SESSION_GAP_S after every earlier run of the session has ended. A run whose record has no start
    (a launch that failed before training) has none."""
    labels, end, commit, n = {}, None, None, -1
    for idx, r in df[df["started_at"].notna()].sort_values("started_at").iterrows():
        start, finish = r["started_at"], r["finished_at"]
        if n < 0 or end is None or r["commit"] != commit or start - end > SESSION_GAP_S:
            n, end = n + 1, None
        if pd.notna(finish):
            end = finish if end is None else max(end, finish)
        commit = r["commit"]
        labels[idx] = chr(ord("A") + n) if n < 26 else str(n + 1)
    return pd.Series(labels).reindex(df.index)


def time_budget(steps: pd.DataFrame, excluded: int, wall_time_s: float | None) -> dict:
    """Where a run's wall time went, from its step rows: start-up (process start to the first step's start:
    imports, model build, process group), the excluded warm-up steps (compilation, allocator warm-up), the
    steady steps, evaluation and checkpoints between steps, and what followed the last step."""
    if steps.empty:
        return {}
    steps = steps.sort_values("step")
    first, last = steps.iloc[0], steps.iloc[-1]
    startup = float(first["elapsed_s"] - first["step_time_s"])
    warm = steps[steps["step"] <= excluded]["step_time_s"].sum()
    steady = steps[steps["step"] > excluded]["step_time_s"].sum()
    between = float(last["elapsed_s"]) - startup - warm - steady
    after = (wall_time_s - float(last["elapsed_s"])) if wall_time_s is not None else None
    return {"startup_s": startup, "warmup_steps_s": float(warm), "steady_steps_s": float(steady),
            "between_steps_s": between, "after_last_step_s": after}


def runs_table(study: str, summaries: list[dict], steps: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: per run its order in the report (family, then configured order), variant, where and with what
    it was recorded (host names, card, GPUs visible, commit, torch, session), what its summary lacks, the
    numerics note of runs recorded under engine settings the code no longer uses, and its time budget."""
    rows = []
    for i, s in enumerate(summaries):
        env = s.get("environment") or {}
        rec = RunRecord.from_json(s, s.get("run", "summary"))
        excluded = (rec.steps_completed or 0) - (rec.steady_steps or 0) if rec.steady_steps else 0
        run_steps = steps[steps["run"] == rec.run] if not steps.empty else steps
        rows.append({
            "run": rec.run, "strategy": rec.strategy, "order": family_rank(rec.strategy) * 1000 + i,
            "variant": variant(rec.spec, rec.strategy) if rec.spec else rec.strategy,
            "status": rec.status,
            "hosts": ",".join(rec.node_names or []) or None, "card": env.get("gpu_name"),
            "gpus_visible": env.get("gpu_count"), "commit": _commit(env), "torch": env.get("torch"),
            "started_at": rec.started_at, "finished_at": rec.finished_at, "wall_time_s": rec.wall_time_s,
            "not_recorded": ",".join(f for f in LATER_FIELDS if f not in s) or None,
            "numerics_note": NOT_MODELLED.get((study, rec.run)),
            "steps_excluded": excluded,
            **time_budget(run_steps, excluded, rec.wall_time_s),
        })
    df = pd.DataFrame(rows)
    df["session"] = sessions(df)
    return df.sort_values("order").drop(columns="order")


def _record_rows(study: str, records: list[RunRecord]) -> list[dict]:
    rows = []
    for rec in records:
        env = rec.environment or {}
        tokens_per_step = (rec.tokens_trained or 0) / rec.steps_completed if rec.steps_completed else None
        rows.append({"study": study, "run": rec.run, "strategy": rec.strategy,
                     "variant": variant(rec.spec, rec.strategy) if rec.spec else rec.strategy,
                     "status": rec.status, "gpus": rec.world_size,
                     "micro_batch_size": (rec.spec or {}).get("micro_batch_size"), "card": env.get("gpu_name"),
                     "params_total": rec.params_total, "tokens_per_step": tokens_per_step,
                     "tokens_per_s": rec.tokens_per_s, "tokens_per_s_per_gpu": rec.tokens_per_s_per_gpu,
                     "mfu": rec.mfu, "peak_mem_gib": rec.peak_mem_gib})
    return rows


def read_records(runs_dir: Path) -> list[RunRecord]:
    return [RunRecord.from_json(read_json(p), str(p)) for p in sorted(Path(runs_dir).glob("*/summary.json"))]


def scaling_table(study: str, summaries: list[dict], others: dict[str, list[RunRecord]]) -> pd.DataFrame:
    """scaling.csv: the ok runs of this study and of each compared study, joined where a compared study ran
    the same model (parameters), tokens per step and card as this one (``joined``; else ``not_joined`` says
    why); ``reference_per_gpu``: the mean tokens/s of the joined single-GPU ``single`` runs with the run's
    micro-batch size (repeats across studies averaged), and ``scaling_efficiency`` against it."""
    own = pd.DataFrame(_record_rows(study, [RunRecord.from_json(s) for s in summaries]))
    frames = [own.assign(joined=True, not_joined=None)]
    ok = own[own["status"] == "ok"]
    key = {"params_total": set(ok["params_total"]), "tokens_per_step": set(ok["tokens_per_step"]),
           "card": set(ok["card"].dropna())}
    for name, records in others.items():
        df = pd.DataFrame(_record_rows(name, records))
        if df.empty:
            continue
        why = [what for col, what in (("params_total", "another model"), ("tokens_per_step", "another global batch"),
                                      ("card", "another card")) if not set(df[col].dropna()) <= key[col]]
        frames.append(df.assign(joined=not why, not_joined="; ".join(why) or None))
    df = pd.concat(frames, ignore_index=True)
    df = df[df["status"] == "ok"].copy()
    refs = df[df["joined"] & (df["strategy"] == "single") & (df["gpus"] == 1)]
    per_mbs = refs.groupby("micro_batch_size")["tokens_per_s_per_gpu"].mean()
    df["reference_per_gpu"] = df["micro_batch_size"].map(per_mbs)
    df["scaling_efficiency"] = (df["tokens_per_s_per_gpu"] / df["reference_per_gpu"]).where(df["joined"])
    df["order"] = df["strategy"].map(family_rank)
    return df.sort_values(["order", "variant", "gpus", "study"]).drop(columns="order")


def peers_table(baselines_dir: Path, metrics: pd.DataFrame, summaries: list[dict]) -> pd.DataFrame:
    """peers.csv: each committed peer-framework run (results/<study>/baselines/*.json: torchtitan, the Hugging
    Face Trainer) beside the run of ours it compares with: the run of ours recorded in the same session where
    the file holds one that trained (``ours_same_call``; benchmarks/torchtitan/parse.py keeps a run of another
    session out of it), else this study's run of the same strategy and GPU count (the baseline for one GPU).
    MFU of both by our definition (our FLOPs per token and peak)."""
    rows = []
    by_run = metrics.set_index("run")
    flops = next((s.get("flops_per_token") for s in summaries if s.get("flops_per_token")), None)
    peak = next((s.get("peak_flops") for s in summaries if s.get("peak_flops")), None)
    for path in sorted(Path(baselines_dir).glob("*.json")) if Path(baselines_dir).is_dir() else []:
        b = read_json(path)
        if b.get("status", "ok") != "ok" or not b.get("tokens_per_s"):
            continue
        gpus = b.get("gpus") or 1
        per_gpu = b.get("tokens_per_s_per_gpu") or b["tokens_per_s"] / gpus
        same_call = b.get("ours_same_call")
        if same_call and same_call.get("status") == "ok":
            ours_run, ours_per_gpu = same_call["run"], same_call["tokens_per_s_per_gpu"]
            ours_mem = same_call["peak_mem_gib"]
            where = "ours in the same session"
        else:
            strategy = "fsdp" if b.get("mode") == "fsdp" else "single"
            cands = metrics[(metrics["strategy"] == strategy) & (metrics["world_size"] == gpus)
                            & (metrics["status"] == "ok")]
            if cands.empty:
                continue
            ours_run = strategy if strategy in set(cands["run"]) else cands["run"].iloc[0]
            ours_per_gpu, ours_mem = by_run.loc[ours_run, "tokens_per_s_per_gpu"], by_run.loc[ours_run, "peak_mem_gib"]
            where = "this study's run"
        mode = b.get("mode") or ("compiled" if b.get("compile") else "eager")
        rows.append({"peer": "torchtitan" if b["kind"] == "torchtitan" else "HF Trainer", "mode": mode,
                     "file": path.name, "gpus": gpus, "steady_steps": b.get("steady_steps"),
                     "peer_tokens_per_s_per_gpu": per_gpu,
                     "peer_mfu": per_gpu * flops / peak if flops and peak else None,
                     "peer_peak_mem_gib": b.get("peak_mem_gib"), "ours_run": ours_run, "ours_from": where,
                     "ours_tokens_per_s_per_gpu": ours_per_gpu,
                     "ours_mfu": ours_per_gpu * flops / peak if flops and peak else None,
                     "ours_peak_mem_gib": ours_mem, "ours_over_peer": ours_per_gpu / per_gpu})
    return pd.DataFrame(rows, columns=["peer", "mode", "file", "gpus", "steady_steps", "peer_tokens_per_s_per_gpu",
                                       "peer_mfu", "peer_peak_mem_gib", "ours_run", "ours_from",
                                       "ours_tokens_per_s_per_gpu", "ours_mfu", "ours_peak_mem_gib",
                                       "ours_over_peer"])


def derive(study: str, summary_paths: list, steps_csv, metrics_csv, compare: dict[str, str], baselines_dir,
           out_dir) -> dict[str, pd.DataFrame]:
    """Write runs.csv, scaling.csv and peers.csv into ``out_dir``; ``compare``: study name -> its runs dir."""
    from llmpar.analysis.aggregate import read_table

    summaries = [read_json(p) for p in summary_paths]
    steps, metrics = read_table(steps_csv), read_table(metrics_csv)
    others = {name: read_records(path) for name, path in compare.items() if Path(path).is_dir()}
    tables = {"runs": runs_table(study, summaries, steps), "scaling": scaling_table(study, summaries, others),
              "peers": peers_table(Path(baselines_dir), metrics, summaries)}
    for name, df in tables.items():
        with atomic_path(Path(out_dir) / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
    return tables
