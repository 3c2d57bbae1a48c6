"""Every metric the study reports, defined once, as pure functions of recorded step/eval/sample rows.

Row shapes (what the collector writes):

* step rows: ``step`` (1-based optimizer step), ``loss``, ``grad_norm``, ``tokens`` (cumulative trained tokens
  after this step), ``samples`` (cumulative sequences), ``step_time_s`` (end of the previous step or
  of the last evaluation/checkpoint, to the end of this step: data loading included, evaluation
  excluded), ``elapsed_s`` (seconds since the first process start of the run, across restarts),
  ``attempt`` (0 for the first launch, +1 per resume).
* eval rows: ``step``, ``tokens``, ``elapsed_s``, ``val_loss``.
* sample rows: ``t_s`` (seconds since process start), ``rank``, ``mem_gib``, ``util_pct``; on GPUs
  with NVML also ``device_mem_used_gib``, ``sm_clock_mhz`` (the SM clock at the sample) and ``power_w``
  (board power draw).

``DEFINITIONS`` holds the text the report prints next to each metric.
"""

from __future__ import annotations

import math
import statistics

DEFINITIONS: dict[str, str] = {
    "wall_time_s": "Total wall time of the run: process start to summary written, summed over restarts "
    "(work lost to a restart is included).",
    "tokens_per_s": "Steady-state throughput: tokens trained in the steps after the first "
    "`train.warmup_steps_excluded` steps, divided by the sum of those steps' times (data loading "
    "included, evaluation and checkpointing excluded). All ranks together; each token counted once.",
    "tokens_per_s_overall": "Throughput including overhead: all trained tokens divided by the wall time "
    "from process start (imports, model build, compilation, data loading) to the end of the last step.",
    "samples_per_s": "Steady-state sequences per second (tokens_per_s / sequence length).",
    "tokens_per_s_per_gpu": "tokens_per_s divided by the number of processes (GPUs, or CPU processes).",
    "goodput_steps_per_s": "Goodput (system): applied optimizer steps per second of total wall time. A "
    "step that was skipped, overflowed or re-done after a restart does not count; the time it took does.",
    "gradient_noise_scale": "Simple gradient noise scale B_simple = tr(Σ)/|G|² in sequences (McCandlish et al. "
    "2018, App. A.1), measured at no extra passes from two batch sizes a step has: the gradient of each "
    "micro-batch of each replica before anything accumulates or reduces it (small batch global_batch/(dp·"
    "micro_batches) sequences: its squared norm, mean over micro-batches and replicas) and the step's averaged "
    "gradient over global_batch (its norm before clipping). DDP, ZeRO, DeepSpeed AutoTP and one-replica layouts "
    "(single, torch TP, the pipelines) read each micro-batch's gradient with a hook on every parameter, summed "
    "over the ranks that hold parts of one replica (stages, tensor-parallel shards; a parameter replicated over "
    "them counted once); FSDP2 with each reduce-scatter's input. "
    "Plain replicas of the torch TP x DP and PP x DP layouts use the replica's gradient over all its "
    "micro-batches (small batch global_batch/dp), read after backward. Measured on every "
    "train.noise_scale_every-th step only (the other steps run without the hooks). The per-step unbiased "
    "estimates of |G|² and tr(Σ) are smoothed by separate exponential moving averages (decay 0.95 per measured "
    "step, bias-corrected) and the value is their ratio at the run's last measured step: a ratio of averages, "
    "biased for few steps (of order var/mean² of the |G|² average) but consistent. gradient_noise_scale_mean ± "
    "gradient_noise_scale_se: mean tr(Σ) / mean |G|² over the steady measured steps, standard error by the "
    "delta method over the per-step estimates (the uncertainty to compare runs with). Empty with "
    "noise_scale_reason where the layout cannot measure it: one replica of one micro-batch (one batch size); "
    "FSDP2 x TP (a rank holds a slice of its replica's gradient); FSDP2 on one rank (no "
    "reduce-scatter to read); train.metrics off; "
    "train.grad_clip 0 (no norm computed). Steps of an earlier attempt of a resumed run do not count.",
    "pollux_efficiency": "Pollux statistical efficiency E(M) = (B_noise + M0) / (B_noise + M) (Qiao et al., OSDI "
    "2021) with B_noise = gradient_noise_scale, M the run's global batch and M0 one reference batch for the whole "
    "study (train.pollux_reference_batch, default train.global_batch): the progress per sequence of training at "
    "batch M relative to batch M0. 1 for every run at M0 (runs of one global batch have one efficiency, whatever "
    "their layout); computed by the aggregation from the recorded noise scale, so a change of M0 needs no "
    "retraining. Empty, with pollux_reason, for a run at another batch that measured no noise scale.",
    "pollux_goodput": "Pollux goodput = tokens_per_s × pollux_efficiency (Qiao et al., OSDI 2021): tokens per "
    "second weighted by how much each still helps at the run's batch, against the study's reference batch.",
    "tokens_to_target": "Statistical efficiency: trained tokens at the first validation whose loss is at "
    "or below `train.target_loss` (no interpolation); 'not reached' when none is.",
    "seconds_to_target": "Wall seconds (elapsed_s) at that same first validation at or below the target.",
    "val_loss_at_tokens": "Validation loss at a fixed token budget, linearly interpolated between the two "
    "validations that bracket it; not available beyond the last validation.",
    "loss": "Training cross-entropy (nats/token) of each step's global batch, averaged over its tokens.",
    "grad_norm": "Global L2 norm, before clipping, of each step's gradient of `loss` (the global batch's mean: "
    "averaged over micro-batches and data-parallel replicas), over every parameter of the model whatever "
    "its layout (tensor-parallel, FSDP and ZeRO shards and pipeline stages combined): the norm the step's "
    "clipping divides `train.grad_clip` by, as each engine's clipping computes it (DeepSpeed's for its "
    "engines). Kept on the device and resolved with the losses (no per-step host sync); null when "
    "`train.grad_clip` is 0 (nothing clips, so nothing computes it).",
    "first_update_norm": "L2 norm of the first optimizer step's change ||w_1 − w_0|| of four named "
    "parameters (embedding, layer 0's q_proj, the last layer's down_proj, lm_head), each element counted "
    "once whatever shards or replicas the ranks hold; from host copies (no device memory). A run "
    "resumed after step 1 reports the value its first attempt recorded. AdamW's first update is about "
    "±lr per element whatever the gradient's scale, so this checks that every shard of each parameter "
    "is updated with the right learning rate and weight decay, not the gradient's scale (grad_norm does).",
    "val_loss": "Validation cross-entropy (nats/token) over `train.eval_batches` fixed global batches; "
    "perplexity = exp(val_loss).",
    "peak_mem_gib": "Peak memory, maximum over ranks. GPU: torch.cuda.max_memory_allocated (GiB); "
    "also max_memory_reserved and NVML device memory used. CPU: peak resident set size of the "
    "process (ru_maxrss), labelled cpu_peak_rss.",
    "util_mean_pct": "Device utilization sampled by a background thread every `train.sample_period_s` "
    "(NVML GPU utilization on GPUs; process CPU percent on CPU, labelled), mean and median over the "
    "steady state (after the warm-up steps, to the last step), per rank and over all ranks.",
    "mfu": "Model FLOPs utilization = tokens_per_s per GPU × FLOPs per token / peak FLOP/s per GPU. "
    "FLOPs per token = 6·N + 6·L·h·s, N = parameters except the input embedding, L layers, h hidden "
    "size, s sequence length (causal attention: half of PaLM's 12·L·h·s). Recomputation from "
    "activation checkpointing does not count. Each token counts once per model replica, so tensor and "
    "pipeline ranks share it. Peak: bf16 dense tensor rate by GPU name (H100/H200 SXM 989e12, "
    "A100 312e12, ...) or `train.peak_flops`; undefined on CPU unless configured.",
    "state_gib_per_rank": "Model-state memory per rank (params_gib_per_rank, grads_gib_per_rank, "
    "optimizer_gib_per_rank): bytes of the parameter, gradient and optimizer-state tensors the engine "
    "holds, each storage counted once, measured during the last step after each micro-batch's backward "
    "and just before the optimizer step, at the moment with the largest total; maximum over ranks.",
    "time_breakdown": "Share of step time in forward, backward (communication overlapped with it "
    "included) and optimizer over the steady steps (after train.warmup_steps_excluded; compilation "
    "excluded), from CUDA events on GPU (host clocks on CPU), rank 0, resolved at the end of the run (no "
    "per-step host sync). Pipelines report the theoretical bubble (p−1)/(v·m+p−1) (v = 2 virtual stages "
    "per rank for interleaved 1F1B, else 1) and, for the torch engine, bubble_measured: the share of "
    "each rank's schedule time not spent in its stages' calls (forward, loss, backward), i.e. idle "
    "waiting for neighbours (the bubble plus point-to-point transfers), averaged over the ranks. A rank's "
    "schedule ends when its own last backward does, so the last stage's wait for the first stage to "
    "drain falls after it (into the gradient-norm all-reduce that follows) and is not counted: a lower "
    "bound for the last stage. Summaries recorded before it existed leave it empty and their breakdowns "
    "include the warm-up steps.",
    # results/<study>/batch_sweep.csv (llmpar.analysis.batch_sweep: the statistical-efficiency experiment)
    "steps_to_target": "Batch sweep: optimizer steps until the validation loss first reaches the target, "
    "interpolated linearly between the two evaluations that bracket it.",
    "sequences_to_target": "Batch sweep: steps_to_target × the run's global batch (E in McCandlish et al.); "
    "tokens_to_target_interp = that × sequence length.",
    "s_min": "Batch sweep fit: the fewest steps to the target at any batch (S_min), intercept of S = S_min + "
    "E_min / B fitted by least squares in 1/B, weighted by 1/S².",
    "e_min": "Batch sweep fit: the fewest sequences to the target at any batch (E_min), the fit's slope.",
    "b_crit": "Batch sweep fit: the critical batch E_min / S_min (sequences): twice the minimum steps and twice "
    "the minimum data.",
    "b_simple": "The simple gradient noise scale tr(Σ)/|G|² (sequences) measured during the sweep's runs: per "
    "run, the ratio of the mean per-step estimates over its measured steps in the second half of its way to the "
    "target; over the runs, their inverse-variance mean.",
    "pollux_predicted": "Pollux's E(M) = (B_simple + M0) / (B_simple + M): the predicted sequences to target at "
    "the reference batch M0 over those at the run's batch M.",
    "efficiency_measured": "sequences_to_target at M0 / sequences_to_target at the run's batch (E(M0) from the "
    "fit where M0 is not a batch of the sweep).",
    # results/<study>/plan.csv (llmpar.plan: model output, compared with the recorded runs)
    "predicted_peak_gib": "Plan: predicted peak memory of the run's fullest rank (GiB): model states as the "
    "engine shards them, communication buffers, activations saved per micro-batch times the micro-batches the "
    "schedule keeps alive, the logits' gradient, allocator overhead (llmpar.plan, constants in cards.yaml).",
    "measured_peak_gib": "Plan: the recorded run's peak_mem_gib (max_memory_allocated, max over ranks).",
    "peak_error": "Plan: (predicted_peak_gib - measured_peak_gib) / measured_peak_gib; bound 10 %.",
    "predicted_step_s": "Plan: predicted seconds per optimizer step: GEMM and attention FLOPs over the card's "
    "measured rates, elementwise traffic over its bandwidth, fixed costs per micro-batch and step, the pipeline "
    "bubble, communication not hidden behind compute, the optimizer's bytes.",
    "measured_step_s": "Plan: global batch tokens / the recorded run's tokens_per_s (steady state).",
    "step_error": "Plan: (predicted_step_s - measured_step_s) / measured_step_s; bound 15 %.",
    "predicted_tokens_per_s": "Plan: global batch tokens / predicted_step_s.",
    "predicted_mfu": "Plan: MFU (as defined for mfu) at predicted_tokens_per_s.",
    "predicted_steps_to_target": "Plan, with sweep_from: the recorded batch-size sweep's fit S(B) = S_min + E_min / B "
    "at the layout's global batch in tokens (B from the run or the extrapolation's weak scaling): optimizer steps "
    "to the sweep's target loss (llmpar.plan.efficiency; the steps transfer across models as a function of tokens "
    "per batch, an assumption stated there).",
    "predicted_time_to_target_s": "Plan: predicted_steps_to_target × predicted_step_s, the seconds of steady "
    "training to the sweep's target: the ranking that accounts for the batch a layout trains at, not only its "
    "throughput.",
    "global_batch": "Sequences per optimizer step of the run (data-parallel replicas × micro-batches × micro-batch "
    "size).",
    "smallest_batch": "Plan: the smallest global batch (sequences) a run's layout can train: one sequence per "
    "data-parallel replica, times the micro-batches a pipeline needs (max(4, 2 × stages)); smallest_batch_why "
    "says which.",
    "predicted_time_to_target_at_smallest_s": "Plan: predicted time to the sweep's target if the layout trained at "
    "its smallest batch (one sequence per micro-batch; its step time predicted there).",
    # results/<study>/extrapolation.csv (llmpar.plan_extrapolate: model output at 8-1024 GPUs, never measured)
    "predicted_fits": "Extrapolation: whether predicted_peak_gib is at most 90 % of the card's memory (the "
    "launcher's criterion); a layout that does not fit shows its peak at micro-batch 1 and no time.",
    "predicted_tokens_per_s_per_gpu": "Extrapolation: global batch tokens / predicted_step_s / GPUs.",
    "predicted_comm_share": "Extrapolation: share of predicted_step_s spent in communication the plan does not "
    "hide behind compute (tensor-parallel all-reduces, pipeline transfers, exposed data-parallel collectives).",
    "predicted_bubble": "Extrapolation: the pipeline bubble in the predicted step, (p-1)/(v·m+p-1); 0 without "
    "stages.",
}

# bf16 dense tensor-core peak FLOP/s per device, by a substring of the device name (first match wins).
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("RTX 4090", 165e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops_for(device_name: str | None, configured: float | None) -> float | None:
    if configured:
        return float(configured)
    if not device_name:
        return None
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


# --------------------------------------------------------------------------- step-level metrics


def steady_steps(steps: list[dict], warmup: int) -> list[dict]:
    """The steady-state steps: all after the first ``warmup`` (or the last one if fewer exist)."""
    rows = [r for r in steps if r["step"] > warmup]
    return rows or steps[-1:]


def steady_window(steps: list[dict], warmup: int) -> tuple[float, float]:
    """The steady steps' span on the run's clock (``elapsed_s``, the samples' ``t_s``): from the start of the
    first steady step to the end of the last step; (0, 0) without steps."""
    if not steps:
        return 0.0, 0.0
    first = steady_steps(steps, warmup)[0]
    return first["elapsed_s"] - first["step_time_s"], steps[-1]["elapsed_s"]


def throughput(steps: list[dict], warmup: int, seq_len: int, world_size: int):
    """Steady-state and overall throughput (see DEFINITIONS)."""
    if not steps:
        return {}
    steady = steady_steps(steps, warmup)
    tokens_per_step = _tokens_per_step(steps)
    steady_tokens = tokens_per_step * len(steady)
    steady_time = sum(r["step_time_s"] for r in steady)
    tps = steady_tokens / steady_time if steady_time > 0 else math.nan
    last = steps[-1]
    overall_time = last["elapsed_s"]
    return {
        "tokens_per_s": tps,
        "samples_per_s": tps / seq_len,
        "tokens_per_s_per_gpu": tps / world_size,
        "samples_per_s_per_gpu": tps / seq_len / world_size,
        "tokens_per_s_overall": last["tokens"] / overall_time if overall_time > 0 else math.nan,
        "samples_per_s_overall": last["samples"] / overall_time if overall_time > 0 else math.nan,
        "steady_steps": len(steady),
        "steady_time_s": steady_time,
    }


def _tokens_per_step(steps: list[dict]) -> float:
    first = steps[0]
    prev_tokens = first["tokens"] / first["step"]  # every step trains the same global batch
    return prev_tokens


def dedupe_steps(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the last attempt's row of every step (a restart re-does steps after its checkpoint).

    Returns (rows sorted by step, number of re-done step rows dropped).
    """
    best: dict[int, dict] = {}
    for r in rows:
        cur = best.get(r["step"])
        if cur is None or r.get("attempt", 0) >= cur.get("attempt", 0):
            best[r["step"]] = r
    out = [best[s] for s in sorted(best)]
    return out, len(rows) - len(out)


def goodput(applied_steps: int, wall_time_s: float) -> float:
    return applied_steps / wall_time_s if wall_time_s > 0 else math.nan


def time_to_target(evals: list[dict], target: float | None) -> dict:
    """First validation at or below ``target`` (no interpolation). 'not reached' is a value."""
    if target is None:
        return {"target_loss": None, "target_reached": None, "tokens_to_target": None, "seconds_to_target": None}
    for e in sorted(evals, key=lambda e: e["step"]):
        if e["val_loss"] <= target:
            return {
                "target_loss": target,
                "target_reached": True,
                "tokens_to_target": e["tokens"],
                "seconds_to_target": e["elapsed_s"],
                "step_to_target": e["step"],
            }
    return {"target_loss": target, "target_reached": False, "tokens_to_target": None, "seconds_to_target": None}


def val_loss_at_tokens(evals: list[dict], budget: float) -> float | None:
    """Linear interpolation of validation loss at ``budget`` tokens; None outside the evaluated range."""
    pts = sorted((e["tokens"], e["val_loss"]) for e in evals)
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= budget <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (budget - t0) / (t1 - t0)
    if pts and pts[-1][0] == budget:
        return pts[-1][1]
    return None


def mfu(tokens_per_s: float, world_size: int, flops_per_token: float, peak: float | None) -> float | None:
    if not peak or not tokens_per_s or math.isnan(tokens_per_s):
        return None
    return tokens_per_s / world_size * flops_per_token / peak


def utilization(samples: list[dict], t_lo: float, t_hi: float) -> dict:
    """Mean and median utilization per rank and overall over samples with t_lo <= t_s <= t_hi."""
    window = [s for s in samples if t_lo <= s["t_s"] <= t_hi and s.get("util_pct") is not None]
    if not window:
        return {"util_mean_pct": None, "util_median_pct": None, "util_per_rank": {}}
    per_rank: dict[int, list[float]] = {}
    for s in window:
        per_rank.setdefault(int(s["rank"]), []).append(float(s["util_pct"]))
    allv = [v for vs in per_rank.values() for v in vs]
    return {
        "util_mean_pct": statistics.fmean(allv),
        "util_median_pct": statistics.median(allv),
        "util_per_rank": {
            r: {"mean": statistics.fmean(v), "median": statistics.median(v)} for r, v in sorted(per_rank.items())
        },
    }


def bubble_fraction(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Theoretical pipeline bubble: (p − 1) / (v·m + p − 1); v = 1 for GPipe and 1F1B, v chunks per rank
    for interleaved 1F1B (Narayanan et al. 2021: the bubble shrinks by v)."""
    return (stages - 1) / (virtual_stages * micro_batches + stages - 1)


def bubble_measured(breakdowns: list[dict | None]) -> float | None:
    """Mean over ranks of pipeline_idle / (forward + backward + pipeline_idle): the idle share of each
    rank's schedule time. None where the engine does not measure pipeline_idle."""
    shares = [b["pipeline_idle"] / (b["forward"] + b["backward"] + b["pipeline_idle"])
              for b in breakdowns if b and "pipeline_idle" in b and b["forward"] + b["backward"] > 0]
    return sum(shares) / len(shares) if shares else None


def breakdown_shares(totals: dict[str, float] | None) -> dict[str, float] | None:
    if not totals:
        return None
    s = sum(totals.values())
    return {k: v / s for k, v in totals.items()} if s > 0 else None
