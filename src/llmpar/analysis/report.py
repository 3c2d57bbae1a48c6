"""A self-contained HTML report in the style of a paper's results section: findings computed from the
tables, a headline table, scaling across the compared studies, the peer frameworks, every figure with a
caption that says what to look at, the plan's predictions, each run's provenance and time budget, the full
tables (collapsed), the metric definitions, configuration and environment. The layout is the Jinja2
template ``report/templates/report.html.j2``; this module only fills it."""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path

import pandas as pd
import yaml

from llmpar.analysis import findings as F
from llmpar.analysis.aggregate import RATIO_DEFINITIONS, read_table, study_wall_time
from llmpar.analysis.derive import SESSION_GAP_S
from llmpar.analysis.figure_list import FIGURES, caption_file, colour
from llmpar.io import write_text
from llmpar.metrics.definitions import DEFINITIONS


def rst_to_html(text: str) -> str:
    """A caption's RST as HTML; a caption docutils warns about fails the report (halt at warnings)."""
    from docutils.core import publish_parts

    return publish_parts(text, writer="html", settings_overrides={"halt_level": 2})["body"]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return F.num(v)
    return html.escape(str(v))


# Column -> header label (short, with its unit); a column without one shows its name.
LABELS = {
    "run": "run", "strategy": "strategy", "engine": "engine", "nodes": "nodes", "gpus_per_node": "GPUs/node",
    "world_size": "GPUs", "tp": "TP", "stages": "PP", "dp": "DP", "micro_batch_size": "micro-batch",
    "micro_batches": "micro-batches", "schedule": "schedule", "zero_stage": "ZeRO", "precision": "precision",
    "status": "status", "wall_time_s": "wall s", "tokens_per_s": "tokens/s", "tokens_per_s_overall": "tokens/s overall",
    "tokens_per_s_per_gpu": "tokens/s per GPU", "goodput_steps_per_s": "goodput steps/s", "mfu": "MFU",
    "util_mean_pct": "util %", "forward_share": "forward", "backward_share": "backward",
    "optimizer_share": "optimizer", "bubble_theoretical": "bubble (theory)", "bubble_measured": "idle (measured)",
    "attempts": "attempts", "redone_steps": "redone steps", "peak_mem_gib": "peak GiB",
    "peak_reserved_gib": "reserved GiB", "memory_kind": "memory kind", "params_gib_per_rank": "params GiB",
    "grads_gib_per_rank": "grads GiB", "optimizer_gib_per_rank": "optimizer GiB", "state_bytes_at": "states at",
    "final_loss": "final loss", "final_val_loss": "final val loss", "tokens_to_target": "tokens to target",
    "seconds_to_target": "s to target", "gradient_noise_scale_mean": "noise scale (mean)",
    "gradient_noise_scale_se": "± s.e.", "gradient_noise_scale": "noise scale (last, smoothed)",
    "pollux_efficiency": "Pollux eff.", "pollux_goodput": "Pollux goodput", "time_reduction_x": "time reduction ×",
    "throughput_increase_x": "throughput ×", "memory_reduction_x": "memory reduction ×",
    "scaling_efficiency": "scaling eff.", "final_loss_rel_gap": "loss gap",
}


def table(df: pd.DataFrame, columns: list[str], labels: dict | None = None, drop_empty: bool = False) -> str:
    """An HTML table of ``columns`` (those present; with ``drop_empty`` those with a value in some row),
    numbers right-aligned, failed runs' rows marked."""
    labels = {**LABELS, **(labels or {})}
    cols = [c for c in columns if c in df.columns and not (drop_empty and df[c].isna().all())]
    head = "".join(f"<th>{html.escape(labels.get(c, c))}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cls = "" if r.get("status", "ok") == "ok" else ' class="failed"'
        cells = "".join(
            f'<td class="num">{_fmt(r[c])}</td>' if isinstance(r[c], (int, float)) and not isinstance(r[c], bool)
            else f"<td>{_fmt(r[c])}</td>"
            for c in cols
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def empty_columns(df: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if c in df.columns and df[c].isna().all()]


SEED_TABLE = ["run", "strategy", "engine", "world_size", "micro_batch_size", "status", "time_reduction_x",
              "throughput_increase_x", "memory_reduction_x", "scaling_efficiency", "final_loss_rel_gap"]
# The ratios the seed's table reports per strategy (time reduction, throughput increase, memory
# reduction), quoted beside ours; the seed names neither its baseline, its GPU count nor its model.
SEED_REPORTED = {
    "data_parallel": (1.2, 1.3, 1.7),
    "tensor_parallel": (1.3, 1.1, 1.75),
    "pipeline_parallel": (1.2, 1.7, 1.83),
    "hybrid_parallel": (1.2, 1.2, 1.9),
}


def seed_comparison(metrics) -> str:
    """Our three ratios per run beside the seed's for its strategy (runs of the seed's four strategies)."""
    cols = ["time_reduction_x", "throughput_increase_x", "memory_reduction_x"]
    rows = []
    for _, r in metrics[metrics["strategy"].isin(list(SEED_REPORTED))].iterrows():
        seed = SEED_REPORTED[r["strategy"]]
        ours = " / ".join(_fmt(r[c]) for c in cols)
        cls = "" if r["status"] == "ok" else ' class="failed"'
        rows.append(f"<tr{cls}><td>{html.escape(r['run'])}</td><td>{html.escape(r['strategy'])}</td>"
                    f"<td>{html.escape(str(r['engine']))}</td><td class='num'>{ours}</td>"
                    f"<td class='num'>{' / '.join(f'{x:g}' for x in seed)}</td></tr>")
    if not rows:
        return ""
    head = "<tr><th>run</th><th>strategy</th><th>engine</th><th>ours: time / throughput / memory</th>" \
           "<th>the seed's table</th></tr>"
    return ("<p>Beside the seed's reported ratios (time reduction / throughput increase / memory reduction; "
            "the seed does not say against what baseline, on how many GPUs or for which model):</p>"
            f"<table>{head}{''.join(rows)}</table>")


# The full metrics, one table per theme (each fits the page), collapsed in the report.
FULL_TABLES = {
    "Layout": ["run", "strategy", "engine", "nodes", "gpus_per_node", "tp", "stages", "dp", "micro_batch_size",
               "micro_batches", "schedule", "zero_stage", "precision"],
    "Speed": ["run", "status", "wall_time_s", "tokens_per_s", "tokens_per_s_overall", "tokens_per_s_per_gpu",
              "goodput_steps_per_s", "mfu", "util_mean_pct", "attempts", "redone_steps"],
    "Step time": ["run", "forward_share", "backward_share", "optimizer_share", "bubble_theoretical",
                  "bubble_measured"],
    "Memory": ["run", "peak_mem_gib", "peak_reserved_gib", "memory_kind", "params_gib_per_rank",
               "grads_gib_per_rank", "optimizer_gib_per_rank", "state_bytes_at"],
    "Learning": ["run", "final_loss", "final_val_loss", "tokens_to_target", "seconds_to_target",
                 "gradient_noise_scale_mean", "gradient_noise_scale_se", "gradient_noise_scale",
                 "pollux_efficiency", "pollux_goodput"],
}
EXTRAPOLATION_TABLE = ["shape", "strategy", "gpus", "layout", "inter_node", "micro_batch_size", "micro_batches",
                       "predicted_peak_gib", "predicted_fits", "predicted_step_s", "predicted_tokens_per_s_per_gpu",
                       "predicted_mfu", "predicted_comm_share", "predicted_bubble", "global_batch",
                       "predicted_steps_to_target", "predicted_time_to_target_s"]
EXTRAPOLATION_LABELS = {"gpus": "GPUs", "inter_node": "across nodes", "micro_batch_size": "mb",
                        "micro_batches": "mbs", "predicted_peak_gib": "peak GiB", "predicted_fits": "fits",
                        "predicted_step_s": "step s", "predicted_tokens_per_s_per_gpu": "tokens/s per GPU",
                        "predicted_mfu": "MFU", "predicted_comm_share": "comm share", "predicted_bubble": "bubble",
                        "global_batch": "batch", "predicted_steps_to_target": "steps to target",
                        "predicted_time_to_target_s": "s to target"}
TARGET_TABLE = ["run", "global_batch", "predicted_steps_to_target", "predicted_time_to_target_s", "smallest_batch",
                "predicted_time_to_target_at_smallest_s", "smallest_batch_why"]
TARGET_LABELS = {"global_batch": "batch", "predicted_steps_to_target": "steps to target",
                 "predicted_time_to_target_s": "s to target", "smallest_batch": "smallest batch",
                 "predicted_time_to_target_at_smallest_s": "s to target at it", "smallest_batch_why": "why"}


def sweep_source(config: dict) -> dict:
    """What the sweep a study takes its steps to target from (``sweep_from``) trained: its study, model (parameters,
    sequence), corpus and target loss, and whether that model and corpus are the study's own (where they are not,
    the report says on what assumption the steps transfer: :mod:`llmpar.plan.efficiency`)."""
    from llmpar.config import load_yaml, prepare
    from llmpar.paths import REPO_ROOT
    from llmpar.shape import param_counts

    sweep = prepare(load_yaml(REPO_ROOT / config["sweep_from"]))

    def model(cfg: dict) -> tuple:
        return param_counts(cfg["model"], cfg["tokenizer"]["vocab_size"])["total"], cfg["model"]["seq_len"]

    params, seq = model(sweep)
    return {"study": sweep["study"], "params_m": round(params / 1e6), "seq_len": seq,
            "corpus": sweep["data"]["source"], "target_loss": sweep["train"]["target_loss"],
            "own": model(sweep) == model(config) and sweep["data"] == config["data"]}


def time_to_target_context(config: dict, rows: pd.DataFrame, ext: pd.DataFrame | None) -> dict | None:
    """The plan's predicted time to the sweep's target (sweep_from): per recorded run, and the extrapolation's
    fastest layout per GPU count by that time beside the one with the highest tokens/s per GPU."""
    if rows.empty or "predicted_time_to_target_s" not in rows.columns:
        return None
    ranked = rows.sort_values("predicted_time_to_target_s")
    out = {"sweep": config.get("sweep_from"), "source": sweep_source(config),
           "table": table(ranked, TARGET_TABLE, TARGET_LABELS), "extrapolation": []}
    if ext is not None and "predicted_time_to_target_s" in ext.columns:
        for (shape, gpus), group in ext.dropna(subset=["predicted_time_to_target_s"]).groupby(["shape", "gpus"]):
            by_time = group.loc[group["predicted_time_to_target_s"].idxmin()]
            by_rate = group.loc[group["predicted_tokens_per_s_per_gpu"].idxmax()]
            out["extrapolation"].append(
                f"{shape} at {int(gpus)} GPUs (batch {int(by_time['global_batch'])}): "
                f"{by_time['strategy']} reaches the target first, {by_time['predicted_time_to_target_s']:.1f} s "
                f"({by_time['predicted_steps_to_target']:.0f} steps)"
                + ("" if by_time["strategy"] == by_rate["strategy"] else
                   f"; the highest tokens/s per GPU is {by_rate['strategy']}'s, "
                   f"{by_rate['predicted_time_to_target_s']:.1f} s to the target"))
    return out
NO_CARD = ("The plan (llmpar.plan) is not calibrated for CPU: its constants are measured on GPU cards "
           "(src/llmpar/cards.yaml) and this study names no <code>train.card</code>, so it shows no predictions "
           "and no extrapolation (a GPU card's numbers would not describe these runs).")
# runs.csv columns shown per run where their values differ within the study, with their labels
PROVENANCE = {"session": "session", "started": "started (UTC)", "hosts": "hosts", "card": "card",
              "gpus_visible": "GPUs visible", "commit": "commit", "torch": "torch", "numerics": "numerics"}
BUDGET = {"startup_s": "start-up s", "warmup_steps_s": "warm-up steps s", "steady_steps_s": "steady steps s",
          "between_steps_s": "between steps s", "after_last_step_s": "after last s", "wall_time_s": "wall s"}


def _png(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def figure(name: str, png, captions_dir, number: int) -> dict:
    cap = Path(captions_dir) / caption_file(name)
    return {"id": f"fig-{name}", "number": number, "title": FIGURES[name], "alt": FIGURES[name],
            "png": _png(png), "caption": rst_to_html(cap.read_text()) if cap.is_file() else ""}


def _utc(t) -> str | None:
    return None if pd.isna(t) else datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def provenance(runs: pd.DataFrame, metrics: pd.DataFrame) -> dict:
    """What differs between runs (shown per run), what all share (said once), the sessions and the study's
    wall time explained, and the runs recorded under numerics the code no longer uses."""
    wall = study_wall_time(metrics)
    if runs.empty:
        return {"same": {}, "table": "", "header": "", "numerics": []}
    df = runs.assign(started=runs["started_at"].map(_utc),
                     numerics=runs["numerics_note"].map(lambda n: "older †" if pd.notna(n) else "as the code runs"))
    varying = [c for c in PROVENANCE if c != "started" and df[c].nunique(dropna=False) > 1]
    same = {PROVENANCE[c]: _fmt(df[c].iloc[0]) for c in PROVENANCE
            if c not in varying and c not in ("session", "started") and df[c].notna().any()}
    show = ["run"] + (["session", "started"] if "session" in varying else []) + [c for c in varying if c != "session"]
    sessions = df[df["session"].notna()].groupby("session", sort=True).agg(
        n=("run", "size"), start=("started_at", "min"), end=("finished_at", "max"))
    span = wall["study_span_s"]
    header = (f"The runs' own wall times sum to {F.num(wall['sum_of_run_wall_times_s'])} s. ")
    if span is not None:
        header += (f"From the first run's start to the last run's end is {F.num(span)} s "
                   f"({_utc(df['started_at'].min())} to {_utc(df['finished_at'].max())} UTC)")
        if len(sessions) > 1:
            parts = ", ".join(f"{k}: {int(s['n'])} run{'s' if s['n'] > 1 else ''} from {_utc(s['start'])}"
                              for k, s in sessions.iterrows())
            between = (sessions["start"].shift(-1) - sessions["end"]).clip(lower=0).sum()
            header += (f": the runs were recorded in {len(sessions)} sessions ({parts}; a session is runs of one "
                       f"commit started within {SESSION_GAP_S // 60} min of the previous run's end), and "
                       f"{F.num(between)} s of the span lie between sessions")
        header += ". "
    numerics = [(r["run"], r["numerics_note"]) for _, r in df.iterrows() if pd.notna(r["numerics_note"])]
    budget = table(df.merge(metrics[["run", "status"]], on="run", suffixes=("_runs", "")),
                   ["run", *BUDGET], labels=BUDGET)
    prov = table(df, show, labels=PROVENANCE) if len(show) > 1 else ""
    return {"same": same, "table": prov, "header": header, "numerics": numerics, "budget": budget}


def step_gap(r: pd.Series) -> str:
    """A run's largest per-step loss gap to the baseline over its steady steps, with its step (– where the run
    trains other batches than the baseline's)."""
    gap, step = r.get("step_loss_gap_max"), r.get("step_loss_gap_step")
    return F.rel_gap(gap) + (f" (step {int(step)})" if pd.notna(gap) and pd.notna(step) else "")


def compared_steps(st: F.Study) -> bool:
    """Whether some run besides the baseline has a per-step loss gap to it (the step-gap column shows only then)."""
    gaps = st.ok["step_loss_gap_max"].drop(index=st.baseline, errors="ignore") if "step_loss_gap_max" in st.ok else []
    return bool(len(gaps) and gaps.notna().any())


def reached_target(st: F.Study) -> bool:
    """Whether some run reached the study's target loss (the time-to-target column shows only then)."""
    return "seconds_to_target" in st.ok and bool(st.ok["seconds_to_target"].notna().any())


def headline(st: F.Study) -> str:
    """One row per run, grouped by family: layout, GPUs, tokens/s per GPU, MFU, peak memory, time to target
    (a column only where some run reached a target; :func:`llmpar.analysis.findings.lacking` says why not)
    and loss gap."""
    target, steps = reached_target(st), compared_steps(st)
    rows = []
    for _, r in st.metrics.iterrows():
        ok = r["status"] == "ok"
        swatch = f'<span class="sw" style="background:{colour(r["strategy"])}"></span>'
        ref = st.ref(r["run"]) if ok else None
        eff = (r["tokens_per_s_per_gpu"] / st.ok.loc[ref, "tokens_per_s_per_gpu"]) if ref else None
        cells = [f"<td>{swatch}{html.escape(r['run'])}{st.note(r['run'])}</td>", f"<td>{html.escape(F.layout(r))}</td>",
                 f'<td class="num">{int(r["world_size"])}</td>']
        if ok:
            cells += [f'<td class="num">{F.num(r["tokens_per_s_per_gpu"])}</td>',
                      f'<td class="num">{F.pct(eff, 0) if eff is not None else "–"}</td>',
                      f'<td class="num">{F.num(r["mfu"])}</td>', f'<td class="num">{F.num(r["peak_mem_gib"])}</td>']
            cells += [f'<td class="num">{F.num(r.get("seconds_to_target"))}</td>'] if target else []
            cells += [f'<td class="num">{F.rel_gap(r.get("final_loss_rel_gap"))}</td>']
            cells += [f'<td class="num">{step_gap(r)}</td>'] if steps else []
        else:
            cells.append(f'<td colspan="{5 + target + steps}">{html.escape(r["status"])}: '
                         f'{html.escape(str(r["message"]))[:120]}</td>')
        cls = "" if ok else ' class="failed"'
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    head = ("<tr><th>run</th><th>layout</th><th>GPUs</th><th>tokens/s per GPU</th><th>vs 1 GPU</th><th>MFU</th>"
            f"<th>peak GiB</th>{'<th>s to target</th>' if target else ''}<th>loss gap</th>"
            f"{'<th>step gap</th>' if steps else ''}</tr>")
    return f"<table class='headline'>{head}{''.join(rows)}</table>"


def scaling_table(st: F.Study) -> str:
    """Layout family × GPU count: the fastest run's tokens/s per GPU and its scaling efficiency."""
    rows = F.scaling_rows(st.scaling)
    if rows.empty or rows["gpus"].nunique() < 2:
        return ""
    gpus = sorted(rows["gpus"].unique())
    head = "<tr><th>layout family</th>" + "".join(f"<th>{F.gpus(g)}</th>" for g in gpus) + "</tr>"
    body = []
    for var, g in rows.groupby("variant", sort=False):
        cells = []
        by = g.set_index("gpus")
        for n in gpus:
            if n not in by.index:
                cells.append("<td></td>")
                continue
            r = by.loc[n]
            eff = f" ({F.pct(r['scaling_efficiency'], 0)})" if pd.notna(r["scaling_efficiency"]) else ""
            cells.append(f'<td class="num" title="{html.escape(r["study"])}: {html.escape(r["run"])}">'
                         f"{F.num(r['tokens_per_s_per_gpu'])}{eff}</td>")
        swatch = f'<span class="sw" style="background:{colour(g["strategy"].iloc[0])}"></span>'
        body.append(f"<tr><td>{swatch}{html.escape(var)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def peers_table(st: F.Study) -> str:
    if st.peers.empty:
        return ""
    return table(st.peers, ["peer", "mode", "gpus", "steady_steps", "peer_tokens_per_s_per_gpu", "peer_mfu",
                            "peer_peak_mem_gib", "ours_run", "ours_tokens_per_s_per_gpu", "ours_mfu",
                            "ours_peak_mem_gib", "ours_over_peer"],
                 labels={"gpus": "GPUs", "steady_steps": "steady steps",
                         "peer_tokens_per_s_per_gpu": "tokens/s per GPU",
                         "peer_mfu": "MFU", "peer_peak_mem_gib": "peak GiB", "ours_run": "our run",
                         "ours_tokens_per_s_per_gpu": "ours: tokens/s per GPU", "ours_mfu": "ours: MFU",
                         "ours_peak_mem_gib": "ours: peak GiB", "ours_over_peer": "ours ÷ peer"})


def plan_context(config: dict, plan_files: dict | None, captions_dir, number: int) -> dict:
    """Predicted before run (plan.csv and its figure) and beyond one machine on paper (extrapolation.csv and
    its figure), or, for a study without a card, the sentence saying why there is neither."""
    card_name = config["train"].get("card")
    if not card_name or not plan_files or not plan_files.get("plan"):
        return {"no_card": NO_CARD}
    from llmpar.plan import extrapolate
    from llmpar.plan.calibration import MEMORY_BOUND, TIME_BOUND
    from llmpar.plan.cards import card

    c = card(card_name)
    rows = read_table(plan_files["plan"])
    bounded = rows[rows["bounded"].astype(str).str.lower() == "true"] if not rows.empty else rows
    met = bounded[(bounded["peak_error"].abs() <= MEMORY_BOUND) & (bounded["step_error"].abs() <= TIME_BOUND)]
    ctx = {"no_card": None, "target": time_to_target_context(config, rows, None),
           "card": c["name"], "card_key": card_name, "met": len(met), "bounded": len(bounded),
           "memory_bound": f"{MEMORY_BOUND:.0%}", "time_bound": f"{TIME_BOUND:.0%}", "figures": [], "notes": [],
           "extrapolation_table": None}
    if plan_files.get("figure"):
        ctx["figures"].append(figure("plan_vs_measured", plan_files["figure"], captions_dir, number))
    if not rows.empty:
        ctx["notes"] = [(r["run"], r["note"]) for _, r in rows[rows["note"].notna()].iterrows()]
    if plan_files.get("extrapolation"):
        ext = read_table(plan_files["extrapolation"])
        if plan_files.get("extrapolation_figure"):
            ctx["figures"].append(figure("extrapolation", plan_files["extrapolation_figure"], captions_dir,
                                         number + len(ctx["figures"])))
        ctx["worlds"] = ", ".join(map(str, extrapolate.WORLDS))
        ctx["gpus_per_node"] = c["cluster"]["gpus_per_node"]
        ctx["assumptions"] = extrapolate.assumptions(card_name)
        ctx["extrapolation_table"] = table(ext, EXTRAPOLATION_TABLE, EXTRAPOLATION_LABELS)
        ctx["target"] = time_to_target_context(config, rows, ext)
        ctx["extrapolation_notes"] = [(f"{r['shape']} {r['strategy']} at {int(r['gpus'])} GPUs", r["note"])
                                      for _, r in ext[ext["note"].notna()].iterrows()]
    return ctx


def environment(summaries: list[dict], varying: set[str]) -> list[tuple[str, str]]:
    """The environment fields every run recorded alike (the per-run ones are in the provenance table)."""
    envs = [s.get("environment") or {} for s in summaries]
    if not envs:
        return []
    keys = dict.fromkeys(k for e in envs for k in e)
    out = []
    for k in keys:
        values = {str(e.get(k)) for e in envs}
        out.append((k, _fmt(envs[0].get(k)) if len(values) == 1 else "differs per run (see the runs' table)"))
    return out


def corpus(config: dict, summaries: list[dict], data_dir) -> dict:
    """What the study trained on (kind, source, size in tokens, synthetic or not) and how often its runs see
    the training tokens, for the report's header."""
    from llmpar.data.describe import describe_study, repetition

    meta = Path(data_dir) / "corpus" / "meta.json" if data_dir else None
    corpus_meta = json.loads(meta.read_text()) if meta is not None and meta.is_file() else None
    tokens_meta = next((s["data"] for s in summaries if s.get("data")), None)
    trained = [s.get("tokens_trained") or 0 for s in summaries]
    return {"line": describe_study(config["data"], config["tokenizer"], corpus_meta, tokens_meta),
            "repetition": repetition(trained, tokens_meta["tokens"]["train"]) if tokens_meta else ""}


def batch_line(config: dict, metrics: pd.DataFrame) -> str:
    """The header's training size: one global batch and step count for the study, or their range where runs
    differ (per-run global batches, token budgets, runs stopped at their target)."""
    seq = config["model"]["seq_len"]
    batches = sorted({int(b) for b in metrics["global_batch"].dropna()}) or [config["train"]["global_batch"]]
    steps = sorted({int(x) for x in metrics["steps_completed"].dropna()}) or [config["train"]["steps"]]
    if len(batches) == 1:
        text = f"one global batch of {batches[0]} sequences × {seq} tokens per step"
    else:
        text = f"global batches of {batches[0]} to {batches[-1]} sequences × {seq} tokens per step, one per run"
    text += f", {steps[0]} steps" if len(steps) == 1 else f", {steps[0]} to {steps[-1]} steps"
    if config["train"].get("stop_at_target"):
        text += f" (each run until its validation loss reached {config['train']['target_loss']})"
    return text


def sweep_context(sweep_files: dict | None, captions_dir, number: int) -> dict | None:
    """The batch-size sweep's section (llmpar.analysis.batch_sweep), where the study is one."""
    if not sweep_files or not sweep_files.get("table"):
        return None
    rows, fits = read_table(sweep_files["table"]), read_table(sweep_files["fit"])
    fit = fits.iloc[0]
    ratio = fit.get("b_crit_over_b_simple")
    agree = ratio is not None and not pd.isna(ratio) and 0.5 <= ratio <= 2
    labels = {"global_batch": "batch", "steps_to_target": "steps S", "sequences_to_target": "sequences E",
              "tokens_to_target_interp": "tokens", "b_simple": "B_simple", "b_simple_se": "± se",
              "pollux_predicted": "Pollux E(M)", "efficiency_measured": "measured E(M0)/E(M)",
              "fit_steps": "fit S(B)"}
    fit_labels = {"target_loss": "target", "reached": "batches at it", "s_min": "S_min", "e_min": "E_min",
                  "b_crit": "B_crit", "b_simple": "B_simple", "b_simple_se": "± se",
                  "b_crit_over_b_simple": "B_crit / B_simple", "max_rel_residual": "largest fit residual"}
    counts = ("batches", "reached", "reference_batch")
    return {"fit": {k: int(fit[k]) if k in counts else fit.get(k)
                    for k in ("target_loss", *counts, "s_min", "e_min", "b_crit", "b_simple", "b_simple_se",
                              "max_rel_residual")},
            "ratio": ratio, "agree": agree,
            "table": table(rows, [c for c in ["run", *labels] if c in rows.columns], labels),
            "fits_table": table(fits, list(fit_labels), fit_labels),
            "figure": figure("batch_sweep", sweep_files["figure"], captions_dir, number)}


def build_report(config: dict, metrics_csv, figures_dir, captions_dir, summaries: list, out_html,
                 figure_names: list[str], tables: dict, template, plan_files: dict | None = None,
                 sweep_files: dict | None = None, data_dir=None) -> None:
    import jinja2

    metrics = read_table(metrics_csv)
    runs, scaling, peers = (read_table(tables[k]) for k in ("runs", "scaling", "peers"))
    st = F.Study(config, metrics, runs, scaling, peers)
    n_ok = int((metrics["status"] == "ok").sum())
    figs = [figure(name, Path(figures_dir) / f"{name}.png", captions_dir, i)
            for i, name in enumerate(figure_names, 1)]
    prov = provenance(runs, metrics)
    full = [(title, table(F.ordered(metrics), cols, drop_empty=True), empty_columns(metrics, cols))
            for title, cols in FULL_TABLES.items()]
    failed = metrics[metrics["status"] != "ok"]
    context = {
        "study": config["study"], "config": config, "baseline": config["baseline"],
        "batch_line": batch_line(config, metrics),
        "n_runs": len(metrics), "n_ok": n_ok, "n_failed": len(metrics) - n_ok,
        "failed": [(r["run"], r["status"], str(r["message"])) for _, r in failed.iterrows()],
        "findings": F.findings(st), "headline": headline(st), "target_column": reached_target(st),
        "step_gap_column": compared_steps(st), "scaling_table": scaling_table(st),
        "scaling_not_joined": sorted({(r["study"], r["not_joined"]) for _, r in scaling.iterrows()
                                      if not r["joined"]}) if not scaling.empty else [],
        "compare_with": config.get("compare_with", []), "peers_table": peers_table(st),
        "lacking": F.lacking(st, summaries), "figures": figs,
        "plan": plan_context(config, plan_files, captions_dir, len(figs) + 2), "provenance": prov,
        "sweep": sweep_context(sweep_files, captions_dir, len(figs) + 1), "corpus": corpus(config, summaries, data_dir),
        "seed_table": table(metrics, SEED_TABLE), "seed_comparison": seed_comparison(metrics),
        "ratio_definitions": RATIO_DEFINITIONS, "full_tables": full, "definitions": DEFINITIONS,
        "config_yaml": yaml.safe_dump(config, sort_keys=False),
        "environment": environment(summaries, set()),
    }
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(template).parent)),
                             autoescape=False, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    write_text(out_html, env.get_template(Path(template).name).render(**context))
