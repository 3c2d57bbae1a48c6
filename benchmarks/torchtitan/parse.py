"""torchtitan's training log -> the peer's result JSON (results/<study>/baselines/torchtitan_<mode>.json).

    python benchmarks/torchtitan/parse.py --log tt_fsdp.log --mode fsdp --gpus 2 --out torchtitan_fsdp.json \
        [--config configs/gpu2-1b.yaml] [--warmup 5] [--steps 45] [--versions versions.json] \
        [--ours runs/fsdp/summary.json --started 1796658928.4] [--command "torchrun ..."] [--wall 95.2]

What torchtitan 0.2.2 logs (torchtitan/components/metrics.py, MetricsProcessor.log), at step 1 and at every
logged step, one line per rank (torchrun --tee prefixes "[rank0]:"; colours unless disabled):

    step: 15  loss:  2.41035  grad_norm:  1.2345  memory: 52.31GiB(66.06%)  tps: 69,876  tflops: 511.09  mfu: 51.68%

* ``tps`` is per GPU: the tokens this rank trained since the previous logged step (``ntokens_since_last_log``,
  every micro-batch's labels counted) divided by the host time (``time.perf_counter``) since the end of the
  previous log call, divided by the non-data-parallel degree (1 here). The logged step ends with a host
  sync (the loss and grad-norm ``.item()``), so a window's time is the GPU time of its steps. It is rounded
  to an integer (relative error < 1e-5 at these rates).
* ``tflops`` = flops/token x tps / 1e12 and ``mfu`` = 100 x flops/token x tps / peak, with torchtitan's
  flops/token = 6·(N − embedding) + 6·L·n_heads·(2·head_dim)·s = 6·N' + 12·L·h·s
  (torchtitan/models/utils.py, get_dense_model_nparams_and_flops: "we follow the convention and do not
  account for sparsity in causal attention") and its peak from torchtitan/tools/utils.py get_peak_flops
  (logged as "Peak FLOPS used for computing MFU").
* ``memory`` is ``reserved_bytes.all.peak`` (torch.cuda max reserved) since the previous log, in GiB and in
  percent of the card's capacity; the peak is reset after every log.

Steady state: a logged window covers the steps after the previous logged step up to its own. The windows
whose previous logged step is >= ``--warmup`` are averaged (tt_launch.py logs at steps 1, W, W+10, ...,
so with W = 5 and 45 steps these are steps 6-45, the steps our runs time). Each window's time is its
tokens / its tps, and the steady tokens/s per GPU is the steady tokens over the summed window times (the
study's definition: tokens over the sum of the steps' times). All GPUs: the sum over the data-parallel
ranks' steady tokens/s (each rank trains its own tokens; rank 0's value x ranks where only rank 0 logged).

MFU both ways over the same tokens/s per GPU: torchtitan's (its flops/token and its logged peak) and ours
(llmpar.metrics.definitions.mfu with llmpar.model.flops_per_token = 6·N' + 6·L·h·s and
definitions.peak_flops_for(card name)). Peak memory: ``peak_mem_gib`` is torch.cuda.max_memory_allocated
over the whole run, maximum over ranks, as our summaries report it (tt_launch.py's "[llmpar] memory"
line); ``peak_reserved_gib`` the same for reserved memory, and ``tt_logged_max_reserved_gib`` the largest
memory value torchtitan itself printed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PREFIX = re.compile(r"^\[(?P<role>[A-Za-z_]*?)(?P<rank>\d+)\]:")
STEP = re.compile(
    r"(?<!validate )step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+grad_norm:\s*(?P<grad_norm>\S+)\s+"
    r"memory:\s*(?P<mem>[\d.]+)GiB\((?P<mem_pct>[\d.]+)%\)\s+tps:\s*(?P<tps>[\d,]+)\s+"
    r"tflops:\s*(?P<tflops>[\d,.]+)\s+mfu:\s*(?P<mfu>[\d.]+)%"
)
PATTERNS = {
    "params": re.compile(r"Model \S+ (?P<flavor>\S+) size: (?P<v>[\d,]+) total parameters"),
    "peak_flops": re.compile(r"Peak FLOPS used for computing MFU: (?P<v>\S+)"),
    "torchtitan": re.compile(r"torchtitan version: (?P<v>\S+)"),
    "card": re.compile(r"CUDA capacity: (?P<v>.+?) with (?P<cap>[\d.]+)GiB memory"),
    "trainer": re.compile(
        r"Trainer is initialized with local batch size (?P<local>\d+), global batch size (?P<global>\d+), "
        r"gradient accumulation steps (?P<accum>\d+), sequence length (?P<seq>\d+), total steps (?P<steps>\d+)"
    ),
    "completed": re.compile(r"Training completed"),
    "memory": re.compile(r"\[llmpar\] memory (?P<v>\{.*\})"),
    "fsdp": re.compile(r"Applied FSDP to the model"),
    "amp": re.compile(r"Mixed precision training is handled by (?P<v>\S+)"),
}
ERRORS = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*Error\b|out of memory|timed out|Watchdog caught")


def _num(s: str) -> float:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return math.nan


def parse_log(text: str) -> dict:
    """Per-rank step rows and the run's facts from a torchtitan console log (torchrun prefixes optional)."""
    ranks: dict[int, list[dict]] = {}
    facts: dict = {"memory": {}, "errors": []}
    for raw in text.splitlines():
        line = ANSI.sub("", raw).rstrip()
        m = PREFIX.match(line)
        rank = int(m["rank"]) if m else 0
        body = line[m.end():] if m else line
        s = STEP.search(body)
        if s:
            ranks.setdefault(rank, []).append({
                "step": int(s["step"]), "loss": _num(s["loss"]), "grad_norm": _num(s["grad_norm"]),
                "max_reserved_gib": _num(s["mem"]), "max_reserved_pct": _num(s["mem_pct"]),
                "tps": _num(s["tps"]), "tflops": _num(s["tflops"]), "mfu_pct": _num(s["mfu"]),
            })
            continue
        for key, pat in PATTERNS.items():
            p = pat.search(body)
            if not p:
                continue
            if key == "memory":
                mem = json.loads(p["v"])
                facts["memory"][int(mem.get("rank", rank))] = mem
            elif key == "params":
                facts.setdefault("params", int(p["v"].replace(",", "")))
                facts.setdefault("flavor", p["flavor"])
            elif key == "peak_flops":
                facts.setdefault("peak_flops", float(p["v"]))
            elif key == "card":
                facts.setdefault("card", p["v"].strip())
                facts.setdefault("capacity_gib", float(p["cap"]))
            elif key == "trainer":
                facts.setdefault("trainer", {k: int(v) for k, v in p.groupdict().items()})
            elif key in ("completed", "fsdp"):
                facts[key] = True
            elif key == "amp":
                facts.setdefault("mixed_precision_by", p["v"].rstrip("."))
            else:
                facts.setdefault(key, p["v"])
        if ERRORS.search(body) and "warn" not in body.lower() and len(facts["errors"]) < 10:
            facts["errors"].append(body.strip()[:300])
    for rows in ranks.values():
        rows.sort(key=lambda r: r["step"])
    return {"ranks": ranks, **facts}


def windows(rows: list[dict], tokens_per_step_per_rank: float) -> list[dict]:
    """Each logged step's window: first/last step it covers, its tokens and time on this rank."""
    out, prev = [], 0
    for r in rows:
        n = r["step"] - prev
        tokens = n * tokens_per_step_per_rank
        out.append({**r, "first_step": prev + 1, "last_step": r["step"], "steps": n, "tokens": tokens,
                    "time_s": tokens / r["tps"] if r["tps"] > 0 else math.nan})
        prev = r["step"]
    return out


def steady(wins: list[dict], warmup: int) -> list[dict]:
    return [w for w in wins if w["first_step"] > warmup]


def torchtitan_flops_per_token(model_cfg: dict, vocab: int) -> float:
    """torchtitan's formula on our shape: 6·(N − input embedding) + 12·L·h·s."""
    from llmpar.shape import model_dims, param_counts

    d = model_dims(model_cfg)
    n = param_counts(model_cfg, vocab)["non_embedding"]
    return 6.0 * n + 12.0 * d["num_layers"] * d["hidden_size"] * model_cfg["seq_len"]


def summarize(parsed: dict, *, mode: str, gpus: int, warmup: int, steps: int, model_cfg: dict,
              global_batch: int) -> dict:
    from llmpar.metrics.definitions import mfu, peak_flops_for
    from llmpar.shape import flops_per_token, param_counts

    vocab = model_cfg.get("vocab_size") or 32000
    seq = model_cfg["seq_len"]
    fpt_ours = flops_per_token(model_cfg, vocab)
    fpt_tt = torchtitan_flops_per_token(model_cfg, vocab)
    params_ours = param_counts(model_cfg, vocab)["total"]
    tokens_per_step_per_rank = global_batch * seq / gpus
    card = parsed.get("card")
    peak_ours = peak_flops_for(card, None)
    peak_tt = parsed.get("peak_flops")

    per_rank = {}
    for rank, rows in sorted(parsed["ranks"].items()):
        wins = windows(rows, tokens_per_step_per_rank)
        st = steady(wins, warmup)
        t = sum(w["time_s"] for w in st)
        tok = sum(w["tokens"] for w in st)
        per_rank[rank] = {
            "windows": wins, "steady": st,
            "tokens_per_s": tok / t if st and t > 0 else None,
            "steady_steps": sum(w["steps"] for w in st),
        }
    r0 = per_rank.get(0)
    status, message = "ok", ""
    if not r0 or r0["tokens_per_s"] is None:
        status = "failed"
        errs = [e for e in parsed["errors"] if not e.startswith("Traceback")] or parsed["errors"]
        message = "no steady-state window logged" + (f"; {errs[0]}" if errs else "")
    elif r0["steady"][-1]["last_step"] < steps or not parsed.get("completed"):
        status = "incomplete"
        message = (f"last logged step {r0['windows'][-1]['last_step']} of {steps}"
                   + ("" if parsed.get("completed") else "; 'Training completed' not logged"))

    row: dict = {
        "kind": "torchtitan",
        "mode": mode,
        "status": status,
        "message": message,
        "gpus": gpus,
        "world_size": gpus,
        "parallelism": "FSDP2 over 2 GPUs (data_parallel_shard_degree 2)" if gpus > 1 else
                       "1 GPU, gradient accumulation (no FSDP)",
        "mixed_precision": ("fully_shard MixedPrecisionPolicy(param bf16, reduce fp32)" if gpus > 1 else
                            "torch.autocast bf16 over fp32 weights"),
        "mixed_precision_logged_by": parsed.get("mixed_precision_by"),
        "compile": True,
        "optim": "AdamW (fused), betas 0.9/0.95, eps 1e-8, weight decay 0, clip 1.0",
        "lr_schedule": "lr 3e-4, 10 linear warm-up steps, cosine to 0.1 x lr at the last step",
        "attention": "SDPA, plain causal (cuDNN first, flash second: torchtitan's ScaledDotProductAttentionWrapper)",
        "steps": steps,
        "warmup_steps_excluded": warmup,
        "global_batch": global_batch,
        "seq_len": seq,
        "trainer_logged": parsed.get("trainer"),
        "params": parsed.get("params"),
        "params_ours": params_ours,
        "params_match": parsed.get("params") == params_ours if parsed.get("params") else None,
        "flavor": parsed.get("flavor"),
        "gpu": card,
        "gpu_capacity_gib": parsed.get("capacity_gib"),
        "torchtitan": parsed.get("torchtitan"),
        "errors": parsed["errors"],
    }
    if r0 and r0["tokens_per_s"] is not None:
        st = r0["steady"]
        ranks_tps = [p["tokens_per_s"] for p in per_rank.values() if p["tokens_per_s"] is not None]
        all_ranks = len(ranks_tps) == gpus
        tps_gpu = sum(ranks_tps) / len(ranks_tps) if all_ranks else r0["tokens_per_s"]
        tps_all = sum(ranks_tps) if all_ranks else r0["tokens_per_s"] * gpus
        row.update({
            "steady_steps": r0["steady_steps"],
            "steady_first_step": st[0]["first_step"],
            "steady_last_step": st[-1]["last_step"],
            "steady_windows": [f"{w['first_step']}-{w['last_step']}" for w in st],
            "steady_time_s": sum(w["time_s"] for w in st),
            "unlogged_steps_after_last_window": max(0, steps - r0["windows"][-1]["last_step"]),
            "tokens_per_s": tps_all,
            "tokens_per_s_per_gpu": tps_gpu,
            "tokens_per_s_source": ("sum over ranks of each rank's steady tokens/s" if all_ranks and gpus > 1 else
                                    "rank 0's steady tokens/s" + (f" x {gpus}" if gpus > 1 else "")),
            "tokens_per_s_per_rank": {str(k): p["tokens_per_s"] for k, p in per_rank.items()},
            "step_time_s": global_batch * seq / tps_all,
            "flops_per_token_ours": fpt_ours,
            "flops_per_token_torchtitan": fpt_tt,
            "flops_per_token_torchtitan_logged": (sum(w["tflops"] for w in st) * 1e12 / sum(w["tps"] for w in st)),
            "peak_flops_ours": peak_ours,
            "peak_flops_torchtitan": peak_tt,
            "mfu": mfu(tps_all, gpus, fpt_ours, peak_ours),
            "mfu_torchtitan": tps_gpu * fpt_tt / peak_tt if peak_tt else None,
            "mfu_torchtitan_logged_pct": [w["mfu_pct"] for w in st],
            "tflops_per_gpu_torchtitan": tps_gpu * fpt_tt / 1e12,
            "tflops_per_gpu_ours": tps_gpu * fpt_ours / 1e12,
            "train_loss": st[-1]["loss"],
            "loss_by_window": {str(w["last_step"]): w["loss"] for w in r0["windows"]},
            "windows_rank0": [{k: w[k] for k in ("first_step", "last_step", "tps", "tflops", "mfu_pct", "loss",
                                                  "max_reserved_gib", "time_s")} for w in r0["windows"]],
        })
    mem = parsed["memory"]
    logged_reserved = [r["max_reserved_gib"] for rows in parsed["ranks"].values() for r in rows]
    row.update({
        "peak_mem_gib": max((m["max_allocated_gib"] for m in mem.values()), default=None),
        "peak_reserved_gib": max((m["max_reserved_gib"] for m in mem.values()), default=None),
        "peak_active_gib": max((m["max_active_gib"] for m in mem.values()), default=None),
        "peak_mem_kind": "torch.cuda.max_memory_allocated over the whole run, maximum over ranks (as our "
                         "summaries' peak_mem_gib); reserved and active alongside",
        "peak_mem_per_rank": {str(k): v for k, v in sorted(mem.items())},
        "tt_logged_max_reserved_gib": max(logged_reserved) if logged_reserved else None,
        "tt_logged_memory_kind": "torchtitan's console 'memory': reserved_bytes.all.peak since the previous log",
    })
    if row["peak_mem_gib"] is None and row["tt_logged_max_reserved_gib"] is not None:
        row["peak_mem_note"] = ("no [llmpar] memory line (run cut short?): peak_mem_gib unknown; "
                                "tt_logged_max_reserved_gib is an upper bound of allocated memory")
    same_peak = bool(peak_ours) and peak_ours == peak_tt
    row["mfu_formulas"] = (
        "ours: 6·N' + 6·L·h·s = {:,.0f} FLOP/token (causal attention: half the s x s score and value matmuls); "
        "torchtitan: 6·N' + 12·L·h·s = {:,.0f} (attention counted in full, PaLM's convention); N' = parameters "
        "without the input embedding = {:,}; FLOP ratio {:.4f}. Both over the same tokens/s per GPU; {}.".format(
            fpt_ours, fpt_tt, param_counts(model_cfg, vocab)["non_embedding"], fpt_tt / fpt_ours,
            f"same peak ({peak_ours:.3e} FLOP/s), so mfu_torchtitan / mfu = the FLOP ratio" if same_peak else
            f"peaks differ (ours {peak_ours}, torchtitan {peak_tt}): mfu_torchtitan / mfu = FLOP ratio x "
            "our peak / its peak"))
    return row


def other_session(s: dict, tt_row: dict, started: float | None) -> str | None:
    """Why our run ``s`` (a summary) is not of torchtitan's session, or None: it must have finished on the same
    card model at most the report's session gap (llmpar.analysis.derive.SESSION_GAP_S) before torchtitan's
    command ``started`` (Unix seconds)."""
    from llmpar.analysis.derive import SESSION_GAP_S

    ours_gpu, tt_gpu = s.get("environment", {}).get("gpu_name"), tt_row.get("gpu")
    if ours_gpu and tt_gpu and ours_gpu != tt_gpu:
        return f"our run trained on {ours_gpu}, torchtitan on {tt_gpu}"
    if started is None:
        return None
    if s.get("finished_at") is None:
        return "our run's summary has no finished_at to place it in torchtitan's session"
    gap = started - s["finished_at"]
    if not 0 <= gap <= SESSION_GAP_S:
        return (f"our run finished {gap:,.0f} s before torchtitan started; one session spans at most "
                f"{SESSION_GAP_S} s between runs")
    return None


def ours_block(summary_path: Path, fpt_tt: float, tt_row: dict, started: float | None = None) -> dict:
    """Our run of the same invocation, from its summary.json, beside the peer's numbers; only its name, path
    and the reason where it was not trained in torchtitan's session (status ``other session``)."""
    s = json.loads(summary_path.read_text())
    path = str(summary_path)
    where = path[path.index("results/"):] if "results/" in path else path  # as in the repository
    why = other_session(s, tt_row, started)
    if why:
        return {"run": s.get("run"), "status": "other session", "message": why, "summary": where}
    keep = ("run", "status", "message", "strategy", "world_size", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
            "flops_per_token", "peak_flops", "peak_mem_gib", "peak_reserved_gib", "steady_steps", "final_loss",
            "wall_time_s", "util_mean_pct")
    out = {k: s.get(k) for k in keep}
    out["micro_batch_size"] = s.get("spec", {}).get("micro_batch_size")
    out["gpu"] = s.get("environment", {}).get("gpu_name")
    out["summary"] = where
    if s.get("tokens_per_s_per_gpu") and s.get("peak_flops"):
        out["mfu_torchtitan_formula"] = s["tokens_per_s_per_gpu"] * fpt_tt / s["peak_flops"]
    if s.get("tokens_per_s") and tt_row.get("tokens_per_s"):
        out["torchtitan_over_ours_tokens_per_s"] = tt_row["tokens_per_s"] / s["tokens_per_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True, choices=["single", "fsdp"])
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--config", default=str(REPO / "configs" / "gpu2-1b.yaml"))
    p.add_argument("--warmup", type=int, default=None, help="steps excluded (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="steps run (default: the config's)")
    p.add_argument("--versions", help="JSON of versions written by side_by_side.sh")
    p.add_argument("--ours", help="our run's summary.json from the same invocation")
    p.add_argument("--started", type=float, default=None,
                   help="Unix seconds torchtitan's command started at: our run must have finished in its session")
    p.add_argument("--command", default=None)
    p.add_argument("--wall", type=float, default=None, help="wall seconds of the torchrun command")
    a = p.parse_args(argv)

    from llmpar.config import load_yaml

    cfg = load_yaml(a.config)
    model_cfg = dict(cfg["model"])
    tc = cfg.get("train", {})
    warmup = a.warmup if a.warmup is not None else tc.get("warmup_steps_excluded", 5)
    steps = a.steps if a.steps is not None else tc.get("steps", 45)
    log = Path(a.log)
    text = log.read_text(errors="replace") if log.is_file() else ""
    parsed = parse_log(text)
    row = summarize(parsed, mode=a.mode, gpus=a.gpus, warmup=warmup, steps=steps, model_cfg=model_cfg,
                    global_batch=tc.get("global_batch", 32))
    if not log.is_file():
        row["status"], row["message"] = "failed", f"no log at {log}"
    row["log"] = log.name
    row["command"] = a.command
    row["wall_s"] = a.wall
    try:
        v = json.loads(Path(a.versions).read_text()) if a.versions else None
    except (OSError, ValueError) as exc:
        v, row["versions_error"] = None, f"{a.versions}: {exc}"
    if isinstance(v, dict):
        row["versions"] = v
        row["torch"] = v.get("torch")
        row["torchtitan"] = row.get("torchtitan") or v.get("torchtitan")
        row["gpu"] = row.get("gpu") or (v.get("gpus") or [None])[0]
    if a.ours and Path(a.ours).is_file():
        row["ours_same_call"] = ours_block(Path(a.ours), torchtitan_flops_per_token(model_cfg,
                                           model_cfg.get("vocab_size") or 32000), row, a.started)
    elif a.ours:
        row["ours_same_call"] = {"summary": a.ours, "status": "missing"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(a.out)
    brief = {k: row.get(k) for k in ("mode", "status", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "mfu_torchtitan",
                                     "peak_mem_gib", "peak_reserved_gib", "params", "params_match",
                                     "steady_windows", "gpu", "message")}
    print(json.dumps(brief), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
