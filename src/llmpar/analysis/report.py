"""A self-contained HTML report in the style of a paper: configuration, the seed's results table,
every figure with its caption, each metric with its definition, and the environment."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd
import yaml

from llmpar.analysis.aggregate import RATIO_DEFINITIONS, read_table, study_wall_time
from llmpar.analysis.figure_list import FIGURES
from llmpar.io import write_text
from llmpar.metrics.definitions import DEFINITIONS

CSS = """
body{font-family:Georgia,serif;max-width:980px;margin:2em auto;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .5em}
th{background:#f3f3f3}td.num{text-align:right;font-family:monospace}tr.failed td{background:#fdecea}
figure{margin:1.5em 0}figure img{max-width:100%}figcaption{font-size:.9em;color:#444}
pre{background:#f7f7f7;padding:.8em;font-size:.8em;overflow-x:auto}dt{font-weight:bold;margin-top:.5em}
.note{color:#a33}
"""


def rst_to_html(text: str) -> str:
    from docutils.core import publish_parts

    return publish_parts(text, writer_name="html", settings_overrides={"report_level": 5})["body"]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return html.escape(str(v))


def table(df: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
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
        rows.append(f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(r['strategy'])}</td>"
                    f"<td>{html.escape(str(r['engine']))}</td><td class='num'>{ours}</td>"
                    f"<td class='num'>{' / '.join(f'{x:g}' for x in seed)}</td></tr>")
    if not rows:
        return ""
    head = "<tr><th>run</th><th>strategy</th><th>engine</th><th>ours: time / throughput / memory</th>" \
           "<th>the seed's table</th></tr>"
    return ("<p>Beside the seed's reported ratios (time reduction / throughput increase / memory reduction; "
            "the seed does not say against what baseline, on how many GPUs or for which model):</p>"
            f"<table>{head}{''.join(rows)}</table>")
FULL_TABLE = ["run", "strategy", "engine", "nodes", "gpus_per_node", "tp", "stages", "dp", "micro_batches",
              "schedule", "zero_stage", "precision", "status", "wall_time_s", "tokens_per_s",
              "tokens_per_s_overall", "tokens_per_s_per_gpu", "goodput_steps_per_s", "gradient_noise_scale",
              "gradient_noise_scale_se", "pollux_efficiency", "pollux_goodput", "peak_mem_gib",
              "memory_kind", "final_val_loss", "tokens_to_target", "seconds_to_target", "mfu", "util_mean_pct",
              "forward_share", "backward_share", "optimizer_share", "bubble_theoretical", "bubble_measured", "attempts",
              "redone_steps", "message"]


EXTRAPOLATION_TABLE = ["shape", "strategy", "gpus", "layout", "inter_node", "micro_batch_size", "micro_batches",
                       "predicted_peak_gib", "predicted_fits", "predicted_step_s", "predicted_tokens_per_s_per_gpu",
                       "predicted_mfu", "predicted_comm_share", "predicted_bubble", "note"]
NO_CARD = ("The plan (llmpar.plan) is not calibrated for CPU: its constants are measured on GPU cards "
           "(src/llmpar/cards.yaml) and this study names no <code>train.card</code>, so it shows no predictions "
           "and no extrapolation (a GPU card's numbers would not describe these runs).")


def _png(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def plan_section(config: dict, plan_files: dict | None, captions_dir, number: int) -> str:
    """Predicted before run (plan.csv and its figure) and beyond one machine on paper (extrapolation.csv),
    or, for a study without a card, the sentence saying why there is neither."""
    parts = [f"<h2>{number}. Predicted before run, and beyond one machine on paper</h2>"]
    card_name = config["train"].get("card")
    if not card_name or not plan_files or not plan_files.get("plan"):
        return parts[0] + f"<p>{NO_CARD}</p>"
    from llmpar.plan import extrapolate
    from llmpar.plan.calibration import MEMORY_BOUND, TIME_BOUND
    from llmpar.plan.cards import card

    c = card(card_name)
    rows = read_table(plan_files["plan"])
    bounded = rows[rows["bounded"].astype(str).str.lower() == "true"] if not rows.empty else rows
    met = bounded[(bounded["peak_error"].abs() <= MEMORY_BOUND) & (bounded["step_error"].abs() <= TIME_BOUND)]
    parts.append(
        f"<p>Model output of <code>llmpar.plan</code> on the {html.escape(c['name'])} constants "
        f"(<code>train.card: {html.escape(card_name)}</code>), computed from each run's shape, layout, precision, "
        f"micro-batch and engine and set against what the run measured: {len(met)} of {len(bounded)} modelled "
        f"runs within both bounds (peak memory ±{MEMORY_BOUND:.0%}, step time ±{TIME_BOUND:.0%}).</p>")
    if plan_files.get("figure"):
        cap = Path(captions_dir) / "plan_vs_measured.rst"
        caption = rst_to_html(cap.read_text()) if cap.is_file() else ""
        parts.append(f'<figure><img alt="plan_vs_measured" src="data:image/png;base64,{_png(plan_files["figure"])}"/>'
                     f"<figcaption><b>Predicted against measured.</b> {caption}</figcaption></figure>")
    notes = rows[rows["note"].notna()] if not rows.empty else rows
    if not notes.empty:
        parts.append("<ul>" + "".join(f"<li><b>{html.escape(r['run'])}</b>: {html.escape(str(r['note']))}</li>"
                                      for _, r in notes.iterrows()) + "</ul>")
    if plan_files.get("extrapolation"):
        table_df = read_table(plan_files["extrapolation"])
        parts.append(
            "<h3>Beyond one machine, on paper (model output, never measured)</h3>"
            f"<p><b>Nothing in this table was measured.</b> Every strategy for the 1.1B preset and an 8B Llama-3 "
            f"shape at {', '.join(map(str, extrapolate.WORLDS))} GPUs, {c['cluster']['gpus_per_node']} per "
            "node, predicted by the same plan; <code>inter_node</code> names the groups whose collectives cross "
            "nodes. Assumptions:</p><ol>"
            + "".join(f"<li>{html.escape(a)}</li>" for a in extrapolate.assumptions(card_name)) + "</ol>")
        parts.append(table(table_df, EXTRAPOLATION_TABLE))
    return "\n".join(parts)


def build_report(config: dict, metrics_csv, figures_dir, captions_dir, summaries: list, out_html,
                 figure_names: list[str], plan_files: dict | None = None) -> None:
    metrics = read_table(metrics_csv)
    baseline = config["baseline"]
    parts = [f"<h1>Parallelism study <code>{html.escape(config['study'])}</code></h1>"]
    n_ok = int((metrics["status"] == "ok").sum())
    wall = study_wall_time(metrics)
    span = f"{wall['study_span_s']:.0f} s" if wall["study_span_s"] is not None else "unknown"
    parts.append(
        f"<p>{len(metrics)} runs ({n_ok} completed, {len(metrics) - n_ok} failed as results), one global batch "
        f"of {config['train']['global_batch']} sequences × {config['model']['seq_len']} tokens per step, "
        f"{config['train']['steps']} steps, seed {config['seed']}, baseline <code>{html.escape(baseline)}</code>. "
        f"Study wall time {span} (first run start to last run end); sum of run wall times "
        f"{wall['sum_of_run_wall_times_s']:.0f} s.</p>"
    )
    failed = metrics[metrics["status"] != "ok"]
    if not failed.empty:
        items = "".join(
            f"<li><b>{html.escape(r['run'])}</b>: {html.escape(r['status'])} — {html.escape(str(r['message']))}</li>"
            for _, r in failed.iterrows()
        )
        parts.append(f'<p class="note">Runs that ended as results, not completions:</p><ul>{items}</ul>')

    parts.append("<h2>1. Results against the baseline</h2>")
    parts.append(f"<p>In the seed's form: each run against <code>{html.escape(baseline)}</code>.</p>")
    parts.append(table(metrics, SEED_TABLE))
    parts.append(seed_comparison(metrics))
    parts.append("<dl>" + "".join(f"<dt>{k}</dt><dd>{html.escape(v)}</dd>" for k, v in RATIO_DEFINITIONS.items())
                 + "</dl>")
    parts.append("<h2>2. All metrics</h2>")
    parts.append(table(metrics, FULL_TABLE))

    parts.append("<h2>3. Figures</h2>")
    for i, name in enumerate(figure_names, 1):
        png = Path(figures_dir) / f"{name}.png"
        data = base64.b64encode(png.read_bytes()).decode()
        cap_path = Path(captions_dir) / f"{name}.rst"
        caption = rst_to_html(cap_path.read_text()) if cap_path.is_file() else ""
        parts.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}"/>'
            f"<figcaption><b>Figure {i}. {html.escape(FIGURES[name])}.</b> {caption}</figcaption></figure>"
        )

    parts.append(plan_section(config, plan_files, captions_dir, 4))

    parts.append("<h2>5. Metric definitions</h2><dl>")
    for k, v in DEFINITIONS.items():
        parts.append(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>")
    parts.append("</dl>")

    parts.append("<h2>6. Configuration</h2>")
    parts.append(f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>")

    parts.append("<h2>7. Environment</h2>")
    envs = {s["run"]: s.get("environment") for s in summaries if s.get("environment")}
    if envs:
        first = next(iter(envs.values()))
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in first.items())
        parts.append(f"<p>As recorded by run <code>{html.escape(next(iter(envs)))}</code>:</p><table>{rows}</table>")
        commits = sorted({e.get("git_commit") for e in envs.values()})
        nodes = {s["run"]: s.get("node_names") for s in summaries if s.get("node_names")}
        parts.append(f"<p>Git commits across runs: {html.escape(', '.join(map(str, commits)))}</p>")
        parts.append(f"<p>Nodes per run: <code>{html.escape(json.dumps(nodes))}</code></p>")
    body = "\n".join(parts)
    write_text(out_html, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(config['study'])}"
                         f"</title><style>{CSS}</style></head><body>{body}</body></html>\n")
