"""What a study's tables say, as sentences whose every number is formatted from the tables: the winner per
criterion with its margin and its cause (the phase breakdown, the pipeline's idle share, the state
breakdown, the time budget), scaling across the compared studies, the peer frameworks, and which runs lack
a metric and why. No plotting, no HTML layout: the report places what this returns."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

from llmpar.analysis.aggregate import of_baselines_batches
from llmpar.analysis.figure_list import colour, family_rank, strategy_label

# Runs whose steady tokens/s is within this fraction of the fastest count as "as fast" for the memory trade-off.
NEAR_FASTEST = 0.10
# A final-loss gap to the baseline above this is called out as a different training.
LOSS_GAP_FLAG = 0.01
SAME_MEMORY = 0.005  # peaks this close to the baseline's are the same memory (allocator noise): the baseline's


@dataclass
class Finding:
    title: str
    html: str


def num(v, digits: int = 3) -> str:
    """A number as the report prints it: thousands separated, else ``digits`` significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.1f}"


def times(v) -> str:
    """A ratio as 1.95×."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}×"


def gpus(n) -> str:
    return f"{int(n)} GPU" + ("s" if n > 1 else "")


def pct(v, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f} %"


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def rel_gap(v) -> str:
    """A relative loss gap in percent with two decimals, or, below 0.005 %, with two significant digits and its
    power of ten (an fp32 run's 1.9 × 10⁻⁶ %, which two decimals would print as 0.00 %)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == 0 or 100 * abs(v) >= 0.005:
        return pct(v, 2)
    mantissa, exponent = f"{100 * v:.1e}".split("e")
    return f"{mantissa} × 10{str(int(exponent)).translate(SUPERSCRIPT)} %"


def run_ref(name: str, strategy: str) -> str:
    """A run's name in prose, with its strategy's colour."""
    return (f'<span class="run" style="border-color:{colour(strategy)}">{html.escape(str(name))}</span>')


def layout(r, zero: bool = True) -> str:
    """A run's layout in words: DP2, TP2×DP2, PP4, PP2×DP2 over 2 nodes, 1 GPU (and its ZeRO stage)."""
    parts = [f"{k}{int(r[c])}" for k, c in (("TP", "tp"), ("PP", "stages"), ("DP", "dp"))
             if pd.notna(r.get(c)) and int(r[c]) > 1]
    text = "×".join(parts) or ("1 GPU" if r["world_size"] == 1 else f"{int(r['world_size'])} ranks")
    if zero and r["strategy"] == "zero" and pd.notna(r.get("zero_stage")):
        text += f" ZeRO-{int(r['zero_stage'])}"
    if pd.notna(r.get("nodes")) and int(r["nodes"]) > 1:
        text += f", {int(r['nodes'])} nodes"
    return text


def ordered(metrics: pd.DataFrame) -> pd.DataFrame:
    df = metrics.reset_index(drop=True)
    return df.assign(_rank=df["strategy"].map(family_rank), _pos=range(len(df))).sort_values(
        ["_rank", "_pos"]).drop(columns=["_rank", "_pos"]).reset_index(drop=True)


class Study:
    """One study's tables, indexed by run, with the derived quantities the findings share."""

    def __init__(self, config: dict, metrics: pd.DataFrame, runs: pd.DataFrame, scaling: pd.DataFrame,
                 peers: pd.DataFrame):
        self.config, self.baseline = config, config["baseline"]
        self.metrics = ordered(metrics)
        self.runs = runs.set_index("run") if not runs.empty else runs
        self.scaling, self.peers = scaling, peers
        self.ok = self.metrics[self.metrics["status"] == "ok"].set_index("run", drop=False)
        self.tokens_per_step = config["train"]["global_batch"] * config["model"]["seq_len"]

    def ref(self, run: str) -> str | None:
        """The single-process run with ``run``'s micro-batch size (scaling efficiency's reference)."""
        r = self.ok.loc[run]
        refs = self.ok[(self.ok["strategy"] == "single") & (self.ok["world_size"] == 1)
                       & (self.ok["micro_batch_size"] == r["micro_batch_size"])]
        return refs.index[0] if not refs.empty else None

    def name(self, run: str) -> str:
        return run_ref(run, self.metrics.set_index("run").loc[run, "strategy"])

    def described(self, run: str) -> str:
        """A run's layout family and layout, e.g. ``ZeRO-2, DP2``."""
        r = self.ok.loc[run]
        family = (self.runs.loc[run, "variant"] if not self.runs.empty and run in self.runs.index
                  else strategy_label(r["strategy"]))
        return html.escape(f"{family}, {layout(r, zero=False)}")

    def step_s(self, run: str) -> float:
        return self.tokens_per_step / self.ok.loc[run, "tokens_per_s"]

    def note(self, run: str) -> str:
        """A footnote marker for a run recorded under numerics the code no longer uses."""
        if self.runs.empty or run not in self.runs.index or pd.isna(self.runs.loc[run, "numerics_note"]):
            return ""
        return '<sup><a href="#numerics">†</a></sup>'


# What each layout communicates, and in which pass: the reading of a phase that grew (fixed facts of the
# strategies, no numbers).
MECHANISM = {
    "data_parallel": "DDP all-reduces the gradients in buckets during the backward pass",
    "fsdp": "FSDP2 all-gathers each layer's parameters before its forward and backward and reduce-scatters its "
            "gradients after the backward",
    "zero": "ZeRO-{stage} reduces the gradients to their owners during the backward pass and all-gathers the "
            "updated parameters after the optimizer step",
    "zero3": "ZeRO-3 all-gathers each module's parameters before its forward and again before its backward",
    "tensor_parallel": "tensor parallel all-reduces the activations of every attention and MLP block in the "
                       "forward pass and their gradients in the backward pass",
}


def mechanism(r) -> str:
    if r["strategy"] == "zero":
        stage = int(r["zero_stage"]) if pd.notna(r.get("zero_stage")) else 0
        return MECHANISM["zero3"] if stage == 3 else MECHANISM["zero"].format(stage=stage)
    return MECHANISM.get(r["strategy"], "")


def cause(st: Study, run: str) -> str:
    """Why ``run`` trains fewer tokens per GPU than its single-process reference, from its recorded shares:
    a pipeline's idle share, else the phase whose time grew most beyond an even split of the reference's step
    over the run's GPUs, with the GPUs' mean utilization where it fell."""
    r = st.ok.loc[run]
    parts = []
    if pd.notna(r.get("bubble_measured")):
        parts.append(f"its ranks idle {pct(r['bubble_measured'])} of the pipeline schedule, waiting for their "
                     f"neighbours (the schedule's theoretical bubble: {pct(r['bubble_theoretical'])})")
    elif pd.notna(r.get("bubble_theoretical")) and r["bubble_theoretical"] > 0:
        parts.append(f"its pipeline schedule leaves a theoretical bubble of {pct(r['bubble_theoretical'])} "
                     "(this engine records no idle share)")
    ref = st.ref(run)
    if ref and ref != run and not parts and pd.notna(r.get("forward_share")):
        rr, world = st.ok.loc[ref], r["world_size"]
        step, ideal = st.step_s(run), st.step_s(ref) / world
        excess = {p: r[f"{p}_share"] * step - rr[f"{p}_share"] * st.step_s(ref) / world
                  for p in ("forward", "backward", "optimizer")}
        top = max(excess, key=excess.get)
        if step > ideal:
            how = mechanism(r)
            parts.append(f"its step takes {num(step)} s against {num(ideal)} s for {st.name(ref)}'s step split "
                         f"evenly over {int(world)} GPUs; of the {num(step - ideal, 2)} s more, "
                         f"{num(excess[top], 2)} s are in the {top} pass ({pct(r[f'{top}_share'], 0)} of its step, "
                         f"{pct(rr[f'{top}_share'], 0)} of {st.name(ref)}'s)"
                         + (f"; what it communicates: {how}" if how else ""))
    if ref and pd.notna(r.get("util_mean_pct")) and pd.notna(st.ok.loc[ref, "util_mean_pct"]) \
            and st.ok.loc[ref, "util_mean_pct"] - r["util_mean_pct"] > 15:
        parts.append(f"its GPUs are busy {num(r['util_mean_pct'], 2)} % of the time "
                     f"({st.name(ref)}: {num(st.ok.loc[ref, 'util_mean_pct'], 2)} %)")
    return "; ".join(parts)


def speed(st: Study) -> list[Finding]:
    ok = st.ok
    out = []
    if ok.empty:
        return out
    fastest = ok["tokens_per_s"].idxmax()
    f = ok.loc[fastest]
    text = (f"{st.name(fastest)}{st.note(fastest)} ({st.described(fastest)}) trains "
            f"{num(f['tokens_per_s'])} tokens/s")
    if st.baseline in ok.index and fastest != st.baseline:
        b = ok.loc[st.baseline]
        text += (f", {times(f['tokens_per_s'] / b['tokens_per_s'])} the baseline {st.name(st.baseline)} "
                 f"({num(b['tokens_per_s'])} tokens/s on {gpus(b['world_size'])})")
    others = ok.drop(index=fastest)
    if not others.empty:
        second = others["tokens_per_s"].idxmax()
        text += (f"; next is {st.name(second)} at {num(ok.loc[second, 'tokens_per_s'])} tokens/s "
                 f"({pct(1 - ok.loc[second, 'tokens_per_s'] / f['tokens_per_s'])} fewer)")
    out.append(Finding("Fastest", text + "."))
    multi = ok[ok["world_size"] > 1]
    if not multi.empty:
        best = multi["tokens_per_s_per_gpu"].idxmax()
        worst = multi["tokens_per_s_per_gpu"].idxmin()
        sentences = []
        for run, what in ((best, "Most tokens per GPU"), (worst, "Fewest tokens per GPU")):
            r, ref = ok.loc[run], st.ref(run)
            s = (f"{what} among the multi-GPU runs: {st.name(run)}{st.note(run)} with {num(r['tokens_per_s_per_gpu'])}"
                 f" tokens/s per GPU (MFU {num(r['mfu'])})")
            if ref:
                s += (f", {pct(r['tokens_per_s_per_gpu'] / ok.loc[ref, 'tokens_per_s_per_gpu'])} of "
                      f"{st.name(ref)}'s rate at the same micro-batch size")
            why = cause(st, run)
            sentences.append(s + (f": {why}" if why else "") + ".")
        if best == worst:
            sentences = sentences[:1]
        out.append(Finding("Per GPU", " ".join(sentences)))
    top_mfu = ok["mfu"].idxmax() if ok["mfu"].notna().any() else None
    if top_mfu is not None:
        text = f"Highest MFU: {st.name(top_mfu)} at {num(ok.loc[top_mfu, 'mfu'])}"
        if not multi.empty and multi["mfu"].notna().any() and top_mfu not in multi.index:
            m = multi["mfu"].idxmax()
            text += f"; among the multi-GPU runs {st.name(m)} at {num(ok.loc[m, 'mfu'])}"
        out.append(Finding("MFU", text + " (MFU is tokens/s per GPU × FLOPs per token ÷ the card's peak, so it "
                                         "ranks the runs as tokens per GPU does)."))
    return out


def families(st: Study) -> Finding | None:
    """Per strategy, its fastest run per GPU and why it falls short of its reference."""
    items = []
    multi = st.ok[st.ok["world_size"] > 1]
    for strategy, rows in multi.groupby("strategy", sort=False):
        run = rows["tokens_per_s_per_gpu"].idxmax()
        why = cause(st, run)
        ref = st.ref(run)
        share = (f", {pct(rows.loc[run, 'tokens_per_s_per_gpu'] / st.ok.loc[ref, 'tokens_per_s_per_gpu'])} of "
                 f"{st.name(ref)}'s per-GPU rate" if ref else "")
        items.append((family_rank(strategy), f"<li><b>{html.escape(strategy_label(strategy))}</b>: best run "
                      f"{st.name(run)}{st.note(run)}, {num(rows.loc[run, 'tokens_per_s_per_gpu'])} tokens/s per GPU"
                      f"{share}{': ' + why if why else ''}.</li>"))
    if not items:
        return None
    return Finding("Where each strategy loses per GPU", "<ul>" + "".join(t for _, t in sorted(items)) + "</ul>")


def memory(st: Study) -> list[Finding]:
    ok = st.ok[st.ok["peak_mem_gib"].notna()]
    if ok.empty:
        return []
    least = ok["peak_mem_gib"].idxmin()
    tied = []
    base = ok.loc[st.baseline, "peak_mem_gib"] if st.baseline in ok.index else None
    if base is not None and base <= (1 + SAME_MEMORY) * ok.loc[least, "peak_mem_gib"]:
        tied = [st.name(run) for run in ok.index[ok["peak_mem_gib"] < base]]
        least = st.baseline
    r = ok.loc[least]
    text = (f"{st.name(least)}{st.note(least)} ({st.described(least)}) peaks at {num(r['peak_mem_gib'])} GiB per rank"
            + (f" ({', '.join(tied)}: within {pct(SAME_MEMORY)})" if tied else ""))
    if st.baseline in ok.index and least != st.baseline:
        b = ok.loc[st.baseline]
        text += (f", {times(b['peak_mem_gib'] / r['peak_mem_gib'])} less than {st.name(st.baseline)}'s "
                 f"{num(b['peak_mem_gib'])} GiB")
    states = ["params_gib_per_rank", "grads_gib_per_rank", "optimizer_gib_per_rank"]
    if r[states].notna().all():
        held = r[states].sum()
        text += (f": model states {num(held)} GiB (parameters {num(r[states[0]])}, gradients {num(r[states[1]])}, "
                 f"optimizer {num(r[states[2]])}"
                 + ("; measured after the last step, gradients freed" if r.get("state_bytes_at") == "after_last_step"
                    else "") + f") and {num(r['peak_mem_gib'] - held)} GiB of activations and buffers")
        if st.baseline in ok.index and least != st.baseline and ok.loc[st.baseline, states].notna().all():
            b = ok.loc[st.baseline]
            text += (f" ({st.name(st.baseline)}: {num(b[states].sum())} GiB of states, "
                     f"{num(b['peak_mem_gib'] - b[states].sum())} GiB of the rest)")
    out = [Finding("Least memory", text + ".")]
    fast = ok[ok["tokens_per_s"] >= (1 - NEAR_FASTEST) * ok["tokens_per_s"].max()]
    lean = fast["peak_mem_gib"].idxmin()
    if ok.loc[lean, "peak_mem_gib"] > (1 + SAME_MEMORY) * ok.loc[least, "peak_mem_gib"]:  # not the same memory
        out.append(Finding("Fast and lean", f"Of the runs within {pct(NEAR_FASTEST, 0)} of the fastest's tokens/s, "
                           f"{st.name(lean)}{st.note(lean)} needs the least memory: "
                           f"{num(ok.loc[lean, 'peak_mem_gib'])} GiB "
                           f"per rank at {num(ok.loc[lean, 'tokens_per_s'])} tokens/s."))
    return out


def target(st: Study) -> list[Finding]:
    ok = st.ok
    if "seconds_to_target" not in ok or not ok["target_reached"].fillna(False).astype(bool).any():
        if ok.get("target_loss") is not None and ok["target_loss"].notna().any():
            return [Finding("Time to target", f"No run reached the target validation loss "
                                              f"{num(ok['target_loss'].dropna().iloc[0])}.")]
        return []
    reached = ok[ok["target_reached"].fillna(False).astype(bool)]
    first = reached["seconds_to_target"].idxmin()
    r = reached.loc[first]
    tokens = set(reached["tokens_to_target"])
    if len(tokens) == 1:
        text = (f"Every run that reached validation loss ≤ {num(r['target_loss'])} did so after the same "
                f"{num(r['tokens_to_target'])} tokens: they train the same model, so time to target differs only by "
                f"speed and start-up. First: {st.name(first)} after {num(r['seconds_to_target'])} s")
    else:
        fewest = reached["tokens_to_target"].idxmin()
        text = (f"Fewest tokens to validation loss ≤ {num(r['target_loss'])}: {st.name(fewest)} with "
                f"{num(reached.loc[fewest, 'tokens_to_target'])}; first in time: {st.name(first)} after "
                f"{num(r['seconds_to_target'])} s")
    if not st.runs.empty and first in st.runs.index and pd.notna(st.runs.loc[first, "startup_s"]):
        text += f", {num(st.runs.loc[first, 'startup_s'])} s of it start-up before the first step"
    if st.baseline in reached.index and first != st.baseline:
        text += f" ({st.name(st.baseline)}: {num(reached.loc[st.baseline, 'seconds_to_target'])} s)"
    missed = ok.index.difference(reached.index)
    if len(missed):
        text += f". Not reached: {', '.join(st.name(m) for m in missed)}"
    return [Finding("Time to target", text + ".")]


def startup(st: Study) -> Finding | None:
    """Where wall-time and throughput ratios disagree most, and what the start-up and warm-up add."""
    if st.runs.empty or st.baseline not in st.ok.index or "time_reduction_x" not in st.ok:
        return None
    ok = st.ok[st.ok["time_reduction_x"].notna() & st.ok["throughput_increase_x"].notna()]
    ok = ok[ok.index.isin(st.runs.index) & (ok.index != st.baseline)]
    if ok.empty:
        return None
    gap = (ok["throughput_increase_x"] / ok["time_reduction_x"])
    run = gap.idxmax()
    r, t = ok.loc[run], st.runs.loc[run]
    fixed = st.runs["startup_s"] + st.runs["warmup_steps_s"]
    text = (f"Wall-time ratios include start-up and compilation. {st.name(run)}'s throughput is "
            f"{times(r['throughput_increase_x'])} the baseline's while its time reduction (the baseline's wall time ÷ "
            f"its own) is {times(r['time_reduction_x'])}: of its {num(r['wall_time_s'])} s, {num(t['startup_s'])} s "
            "pass before the first step and "
            f"{num(t['warmup_steps_s'])} s in the {int(t['steps_excluded'])} warm-up steps, against "
            f"{num(t['steady_steps_s'])} s of steady steps. Across the study, start-up and warm-up take "
            f"{num(fixed.min())}–{num(fixed.max())} s per run; compare runs by steady throughput (Figure "
            '<a href="#fig-time_budget">time budget</a>).')
    return Finding("Start-up", text)


def same_model(st: Study) -> Finding | None:
    """Whether the runs train the same model: their final losses against the baseline's, among the runs that train
    the baseline's batches (its global batch for its number of steps); runs of other batches (a batch-size sweep)
    train another schedule by design and are named, not compared."""
    if "final_loss_rel_gap" not in st.ok or st.baseline not in st.ok.index:
        return None
    base = st.ok.loc[st.baseline]
    same_batches = of_baselines_batches(st.ok, st.baseline)
    gaps = st.ok.loc[same_batches, "final_loss_rel_gap"].dropna().drop(index=st.baseline, errors="ignore")
    others = [st.name(r) for r in st.ok.index[~same_batches]]
    other_text = (f"{', '.join(others)} train{'s' if len(others) == 1 else ''} other batches than "
                  f"{st.name(st.baseline)}'s ({int(base['global_batch'])} sequences for {int(base['steps_completed'])} "
                  "steps), so their final losses are not compared" if others else "")
    if gaps.empty:
        return Finding("Same model", other_text + ".") if others else None
    worst = gaps.idxmax()
    text = (f"Final training losses lie within {rel_gap(gaps.max())} of {st.name(st.baseline)}'s "
            f"(largest gap: {st.name(worst)}{st.note(worst)})")
    flagged = gaps[gaps > LOSS_GAP_FLAG]
    if len(flagged):
        text += (f"; {', '.join(st.name(r) for r in flagged.index)} differ by more than {pct(LOSS_GAP_FLAG, 0)}: "
                 "they do not train the same model")
    else:
        text += (": every run trains the same model" if not others else
                 f": the {len(gaps) + 1} runs of its batches train the same model")
    steps = (st.ok.loc[gaps.index, "step_loss_gap_max"].dropna() if "step_loss_gap_max" in st.ok
             else pd.Series(dtype=float))
    if len(steps):
        run = steps.idxmax()
        text += (f"; step by step their training losses differ from {st.name(st.baseline)}'s by up to "
                 f"{rel_gap(steps.max())} ({st.name(run)}, step {int(st.ok.loc[run, 'step_loss_gap_step'])})")
    return Finding("Same model", text + (f"; {other_text}" if others else "") + ".")


def scaling_rows(scaling: pd.DataFrame) -> pd.DataFrame:
    """Per layout family and GPU count, its fastest joined run (tokens/s per GPU, efficiency, study)."""
    df = scaling[scaling["joined"]] if not scaling.empty else scaling
    if df.empty:
        return df
    best = df.loc[df.groupby(["variant", "gpus"])["tokens_per_s_per_gpu"].idxmax()]
    best = best.assign(_rank=best["strategy"].map(family_rank))
    return best.sort_values(["_rank", "variant", "gpus"]).drop(columns="_rank")


def repeats(scaling: pd.DataFrame) -> pd.DataFrame:
    """Runs of one name, layout and GPU count recorded in several studies: their spread in tokens/s."""
    df = scaling[scaling["joined"]] if not scaling.empty else scaling
    if df.empty:
        return df
    groups = df.groupby(["run", "variant", "gpus", "micro_batch_size"])["tokens_per_s"]
    out = groups.agg(["count", "min", "max", "mean"]).reset_index()
    out = out[out["count"] > 1]
    return out.assign(spread=(out["max"] - out["min"]) / out["mean"])


def scaling_finding(st: Study) -> list[Finding]:
    rows = scaling_rows(st.scaling)
    if rows.empty or rows["gpus"].nunique() < 2:
        return []
    top = rows["gpus"].max()
    at_top = rows[(rows["gpus"] == top) & rows["scaling_efficiency"].notna()]
    out = []
    if not at_top.empty:
        eff = at_top["scaling_efficiency"]
        best, worst = at_top.loc[eff.idxmax()], at_top.loc[eff.idxmin()]
        studies = ", ".join(dict.fromkeys(st.scaling[st.scaling["joined"]]["study"]))
        text = (f"Across the studies {html.escape(studies)}, at {int(top)} GPUs {html.escape(best['variant'])} keeps "
                f"{pct(best['scaling_efficiency'])} of the single-GPU rate per GPU "
                f"({run_ref(best['run'], best['strategy'])}), "
                f"{html.escape(worst['variant'])} {pct(worst['scaling_efficiency'])} "
                f"({run_ref(worst['run'], worst['strategy'])}).")
        trend = []
        for var, g in rows[rows["scaling_efficiency"].notna()].groupby("variant", sort=False):
            if g["gpus"].nunique() > 1:
                trend.append(f"{html.escape(var)} " + " → ".join(f"{pct(e, 0)} at {int(n)}" for n, e in
                                                                zip(g["gpus"], g["scaling_efficiency"])))
        if trend:
            text += " Per-GPU efficiency as GPUs are added: " + "; ".join(trend) + "."
        out.append(Finding("Scaling", text))
    rep = repeats(st.scaling)
    if not rep.empty:
        worst = rep.loc[rep["spread"].idxmax()]
        out.append(Finding("Run-to-run spread", (
            f"{len(rep)} configuration{'s are' if len(rep) > 1 else ' is'} recorded in more than one study "
            f"({', '.join(html.escape(r) for r in rep['run'])}): their tokens/s differ by up to {pct(worst['spread'])} "
            f"({html.escape(worst['run'])}: {num(worst['min'])} and {num(worst['max'])}). Differences between runs "
            "smaller than that are within the spread of repeating a run.")))
    return out


def peers(st: Study) -> list[Finding]:
    if st.peers.empty:
        return []
    items = []
    for _, p in st.peers.iterrows():
        items.append(f"{html.escape(p['peer'])} ({html.escape(str(p['mode']))}, {gpus(p['gpus'])}): "
                     f"{num(p['peer_tokens_per_s_per_gpu'])} tokens/s per GPU; ours ({st.name(p['ours_run'])}, "
                     f"{html.escape(p['ours_from'])}) {num(p['ours_tokens_per_s_per_gpu'])}: "
                     f"{times(p['ours_over_peer'])}")
    return [Finding("Beside peer frameworks", "; ".join(items) + ".")]


def findings(st: Study) -> list[Finding]:
    out = speed(st)
    out += [f for f in (families(st),) if f]
    out += memory(st) + target(st)
    out += [f for f in (startup(st), same_model(st)) if f]
    return out + scaling_finding(st) + peers(st)


def lacking(st: Study, summaries: list[dict]) -> list[tuple[str, list[str]]]:
    """Per metric the report shows, the runs without it and why: the summary's stated reason, a summary
    recorded before the field existed, an engine that reports no phase breakdown, no target loss set or the
    target not reached."""
    raw = {s["run"]: s for s in summaries}
    out = []

    def listed(reasons: dict[str, str]) -> list[str]:
        """The runs grouped by their reason (run -> reason), "every run" where one reason is every run's."""
        by_reason: dict[str, list[str]] = {}
        for run, reason in reasons.items():
            by_reason.setdefault(reason, []).append(run)
        return [("every run" if len(runs) == len(st.ok) > 1 else ", ".join(st.name(r) for r in runs))
                + f": {html.escape(reason)}" for reason, runs in by_reason.items()]

    def why(run: str, field: str, reason_field: str | None = None, default: str = "") -> str:
        s = raw.get(run, {})
        if field not in s:
            return "recorded before this metric existed"
        return (s.get(reason_field) if reason_field else None) or default

    checks = [
        ("gradient noise scale", "gradient_noise_scale_mean", "gradient_noise_scale", "noise_scale_reason",
         "not measured"),
        ("phase breakdown (forward, backward, optimizer)", "forward_share", "time_breakdown", None,
         "this engine records no phase breakdown"),
        ("measured pipeline idle share", "bubble_measured", "bubble_measured", None,
         "this engine records no phase breakdown"),
        ("MFU", "mfu", "mfu", None, "no peak FLOP/s known for this device"),
    ]
    target = st.ok.get("target_loss")
    not_reached = st.ok[st.ok["seconds_to_target"].isna()] if "seconds_to_target" in st.ok else st.ok
    if not not_reached.empty:
        reasons = {}
        for run, r in not_reached.iterrows():
            goal = target.loc[run] if target is not None else None
            reasons[run] = ("the study sets no target loss (train.target_loss)" if goal is None or pd.isna(goal) else
                            f"its validation loss stayed above the target {num(goal)} "
                            f"(last {num(r.get('final_val_loss'))})")
        out.append(("time to target", listed(reasons)))
    for label, col, field, reason_field, default in checks:
        rows = st.ok
        if col == "bubble_measured":
            rows = rows[rows["bubble_theoretical"].notna()] if "bubble_theoretical" in rows else rows.iloc[0:0]
        missing = rows[rows[col].isna()] if col in rows else rows
        if missing.empty:
            continue
        out.append((label, listed({run: why(run, field, reason_field, default) for run in missing.index})))
    return out
