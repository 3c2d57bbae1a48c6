"""The training loop: one loop for every strategy, readable top to bottom.

Runs inside each torchrun worker. config -> process group -> data -> model -> parallelize ->
resume -> steps (log, evaluate, checkpoint) -> summary. Rank 0 writes the run's files; the summary
is written last and atomically, so its presence means the run is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from llmpar import distributed, faults
from llmpar.checkpoint import Checkpoints
from llmpar.config import RunSpec, stable_hash
from llmpar.data.loader import TokenData
from llmpar.errors import ExpectedFailure
from llmpar.io import read_appended_jsonl, write_json, write_jsonl
from llmpar.metrics import definitions as D
from llmpar.metrics import noise_scale
from llmpar.metrics.env import environment
from llmpar.metrics.probe import LayerProbe, compiled_graphs
from llmpar.metrics.recorder import Recorder
from llmpar.metrics.sampler import Sampler
from llmpar.metrics.updates import FirstUpdate
from llmpar.model import attention_backends, build_model, flops_per_token, param_counts
from llmpar.strategies import parallelize
from llmpar.strategies.base import decoder_layers

FAILURE_FILE = ".failure-rank{rank}.json"


def log(ctx, msg: str) -> None:
    if ctx is None or ctx.is_main:
        print(msg, flush=True)


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _micro_batches(x, y, m: int, device, pin: bool):
    if pin:
        x, y = x.pin_memory(), y.pin_memory()
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return list(zip(x.chunk(m), y.chunk(m)))


def evaluate(engine, data: TokenData, global_batch: int, n_batches: int, device) -> torch.Tensor:
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = data.val_batch(i, global_batch, engine.dp_rank, engine.dp_size)
        total += engine.eval_loss(x.to(device), y.to(device)).float()
    return total / n_batches


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return {
            "memory_kind": "cuda_max_allocated",
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
        }
    return {"memory_kind": "cpu_peak_rss", "peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(run_cfg: dict, tokens_dir: str | Path, out_dir: str | Path, t0: float | None = None) -> None:
    """Train one run in this process group (created here when there is none; left for the caller to
    destroy, so that a batch of runs shares one launch). ``t0``: when the run's wall clock starts."""
    t0 = float(os.environ.get("LLMPAR_T0", time.time())) if t0 is None else t0
    ctx = distributed.init(run_cfg["train"]["device"])
    # the attention backend order (train.attention) holds for the whole run, backward passes included
    with attention_backends(run_cfg["train"]["attention"], ctx.device.type):
        _train(run_cfg, RunSpec.from_dict(run_cfg["run"]), ctx, tokens_dir, Path(out_dir), t0)


def _train(run_cfg: dict, spec: RunSpec, ctx, tokens_dir: str | Path, out: Path, t0: float) -> None:
    tc, mc, seed = run_cfg["train"], run_cfg["model"], run_cfg["seed"]
    log(ctx, f"[{spec.name}] strategy={spec.strategy} world={ctx.world_size} tp={spec.tp} stages={spec.stages} "
             f"dp={spec.dp} micro_batches={spec.micro_batches}x{spec.micro_batch_size} device={ctx.device} "
             f"backend={ctx.backend} threads/process={torch.get_num_threads()}")

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peaks are per run, also when runs share a process
    data = TokenData(tokens_dir, mc["seq_len"], seed)
    model = build_model(mc, data.vocab_size, seed, device=ctx.device)
    first = FirstUpdate(model)  # the tracked parameters' full sizes, before the strategy shards them
    graphs_before = compiled_graphs()
    probe = LayerProbe(decoder_layers(model)) if tc["metrics"] and not spec.compile else None
    engine = parallelize(model, spec, ctx, tc)

    # ---- resume
    config_hash = stable_hash({k: run_cfg[k] for k in ("seed", "model", "train", "run")} | {"data": data.meta})
    ckpts = Checkpoints(out / "checkpoints", config_hash, ctx.rank, tc["keep_checkpoints"])
    progress_path = out / "progress.jsonl"
    start_step, attempt, offset, prior = 0, 0, 0.0, []
    latest = ckpts.latest() if tc["checkpoint_every"] else None
    if latest is not None:
        path, meta = latest
        ckpts.load(engine, path)
        start_step, attempt = meta["step"], meta["attempt"] + 1
        rows = read_appended_jsonl(progress_path)
        if ctx.is_main:  # drop a line torn by the kill before appending to the file again
            write_jsonl(progress_path, rows)
        prior = [r for r in rows if r.get("config_hash") == config_hash]
        offset = max([meta["elapsed_s"]] + [r["elapsed_s"] for r in prior])
        log(ctx, f"[{spec.name}] resumed from checkpoint {path.name} (step {start_step}), attempt {attempt}; "
                 f"previous attempt ran until {offset:.1f}s")
    elif ctx.is_main:
        progress_path.unlink(missing_ok=True)
    ckpts.clean_partial()
    if start_step == 0:
        first.snapshot(model)
    dist.barrier()

    seq, gb = mc["seq_len"], tc["global_batch"]
    rec = Recorder(ctx.device, t0, offset, gb * seq, gb, attempt)
    sampler = Sampler(ctx.rank, t0, offset, tc["sample_period_s"]) if tc["metrics"] else None
    if sampler:
        sampler.start()
    pin = ctx.device.type == "cuda"
    pool = ThreadPoolExecutor(1)

    def fetch(step):  # 0-based step -> this rank's micro-batches on the device
        x, y = data.train_batch(step, gb, engine.dp_rank, engine.dp_size)
        return _micro_batches(x, y, spec.micro_batches, ctx.device, pin)

    steps, evals, first_update = [], [], None
    local_sq: dict[int, torch.Tensor] = {}  # step -> this replica's squared gradient norm (noise scale)
    bad, status, message = 0, "ok", ""
    if spec.fault:
        faults.inject(engine, spec.fault, start_step, attempt, ctx.is_main, lambda m: log(ctx, f"[{spec.name}] {m}"))

    def flush() -> list[dict]:
        """Resolve pending steps into rows; rank 0 appends them to progress.jsonl (what a resume restores)."""
        rows = rec.flush()
        for r in rows:
            r["config_hash"] = config_hash
        steps.extend(rows)
        if ctx.is_main and rows:
            _append_jsonl(progress_path, [{"kind": "step"} | r for r in rows])
        return rows

    nxt = pool.submit(fetch, start_step)
    for step in range(start_step + 1, tc["steps"] + 1):
        micro = nxt.result()
        if step < tc["steps"]:
            nxt = pool.submit(fetch, step)
        if step == tc["steps"]:
            engine.arm_state_capture()  # model-state bytes at the last step's optimizer step
        watching = probe is not None and step == min(start_step + 2, tc["steps"])
        engine.begin_step(step)
        with probe.watch() if watching else contextlib.nullcontext():
            loss = engine.train_step(micro)
        if step == tc["warmup_steps_excluded"]:
            engine.reset_time_breakdown()  # the breakdown covers the steady steps, as throughput does
        rec.step_done(step, loss, engine.lr(), engine.grad_norm())
        replica_sq = engine.local_grad_sq()
        if replica_sq is not None:
            local_sq[step] = replica_sq  # resolved once, after the last step (no per-step sync)
        if step == 1:  # host copies, outside the step's time (as an evaluation is)
            first_update = first.norms(model, ctx.device)
            if ctx.is_main:
                _append_jsonl(progress_path, [{"kind": "first_update", "norms": first_update,
                                               "elapsed_s": rec.now_elapsed(), "config_hash": config_hash}])
            rec.boundary()

        if step % tc["log_every"] == 0 or step == tc["steps"]:
            rows = flush()
            last = rows[-1]
            window = [r for r in rows if r["step_time_s"] > 0]
            tps = len(window) * gb * seq / sum(r["step_time_s"] for r in window) if window else float("nan")
            log(ctx, f"[{spec.name}] step {step}/{tc['steps']} | loss {last['loss']:.4f} | {tps:,.0f} tok/s | "
                     f"lr {last['lr']:.2e} | elapsed {last['elapsed_s']:.1f}s")
            for r in rows:
                bad = bad + 1 if not math.isfinite(r["loss"]) else 0
                if bad >= tc["nan_patience"]:
                    status = "diverged"
                    message = f"loss not finite for {bad} consecutive steps (at step {r['step']})"
                    break
            if status == "diverged":
                log(ctx, f"[{spec.name}] DIVERGED: {message}")
                break

        if step % tc["eval_every"] == 0 or step == tc["steps"]:
            val = evaluate(engine, data, gb, tc["eval_batches"], ctx.device).item()
            row = {"step": step, "tokens": step * gb * seq, "elapsed_s": rec.now_elapsed(), "val_loss": val,
                   "val_ppl": math.exp(min(val, 50.0)), "config_hash": config_hash, "attempt": attempt}
            evals.append(row)
            if ctx.is_main:
                _append_jsonl(progress_path, [{"kind": "eval"} | row])
            log(ctx, f"[{spec.name}] eval step {step} | val_loss {val:.4f} | ppl {row['val_ppl']:.2f}")
            rec.boundary()

        if tc["checkpoint_every"] and step % tc["checkpoint_every"] == 0 and step < tc["steps"]:
            flush()
            path = ckpts.save(engine, step, attempt, rec.now_elapsed())
            log(ctx, f"[{spec.name}] checkpoint {path.name}")
            rec.boundary()

    flush()
    breakdown = engine.time_breakdown()
    samples = sampler.stop() if sampler else []
    per_rank = distributed.all_gather_object({
        "rank": ctx.rank,
        "node": distributed.node_name(),
        "node_rank": ctx.node_rank,
        "memory": peak_memory(ctx.device),
        "state_bytes": engine.captured_state_bytes,
        "local_params": engine.local_param_count(),
        "samples": samples,
        "breakdown": breakdown,
        "nvml": None if sampler is None else sampler.nvml_reason,
        # observed facts of what ran (llmpar.metrics.probe): graphs torch.compile made during this run,
        # and the decoder layers' passes in the second step of this attempt (None: compiled or no metrics)
        "compiled_graphs": compiled_graphs() - graphs_before,
        "layer_probe": None if probe is None else probe.result(),
        "local_grad_sq": {s: float(v) for s, v in local_sq.items()},
    })
    if ctx.is_main:
        write_outputs(out, run_cfg, spec, ctx, data, prior, steps, evals, first_update, per_rank, status, message,
                      t0, offset, config_hash, engine)
    dist.barrier()
    if status == "ok" and tc["delete_checkpoints_on_success"]:
        ckpts.delete_all()
    pool.shutdown()
    engine.close()


def write_outputs(out, run_cfg, spec, ctx, data, prior, steps, evals, first_update, per_rank, status, message, t0,
                  offset, config_hash, engine):
    tc, mc = run_cfg["train"], run_cfg["model"]
    prior_steps = [{k: v for k, v in r.items() if k != "kind"} for r in prior if r.get("kind") == "step"]
    prior_evals = [{k: v for k, v in r.items() if k != "kind"} for r in prior if r.get("kind") == "eval"]
    all_steps, redone = D.dedupe_steps(prior_steps + steps)
    evals_by_step = {e["step"]: e for e in prior_evals + evals}
    all_evals = [evals_by_step[s] for s in sorted(evals_by_step)]
    if first_update is None:  # resumed after step 1: the attempt that ran it recorded it
        first_update = next((r["norms"] for r in prior if r.get("kind") == "first_update"), None)
    samples = [s for r in per_rank for s in r["samples"]]
    wall = time.time() - t0 + offset  # this attempt plus every earlier one (lost work included)
    world = ctx.world_size
    fpt = flops_per_token(mc, data.vocab_size)
    env = environment()
    peak = D.peak_flops_for(env["gpu_name"], tc["peak_flops"])
    warm = tc["warmup_steps_excluded"]
    tput = D.throughput(all_steps, warm, mc["seq_len"], world) if all_steps else {}
    steady = D.steady_steps(all_steps, warm) if all_steps else []
    t_lo = steady[0]["elapsed_s"] - steady[0]["step_time_s"] if steady else 0.0
    t_hi = all_steps[-1]["elapsed_s"] if all_steps else 0.0
    mem = [r["memory"] for r in per_rank]
    summary = {
        "run": spec.name,
        "status": status,
        "message": message,
        "spec": spec.to_dict(),
        "strategy": spec.strategy,
        "world_size": world,
        "nodes": spec.nodes,
        "gpus_per_node": spec.gpus_per_node,
        "node_names": sorted({r["node"] for r in per_rank}),
        "device": ctx.device.type,
        "backend": ctx.backend,
        "steps_completed": len(all_steps),
        "steps_planned": tc["steps"],
        "tokens_trained": all_steps[-1]["tokens"] if all_steps else 0,
        "attempts": 1 + max([r.get("attempt", 0) for r in all_steps], default=0),
        "redone_steps": redone,
        "state_bytes_at": "step_peak",  # see DEFINITIONS["state_gib_per_rank"]
        "wall_time_s": wall,
        "started_at": t0 - offset,
        "finished_at": time.time(),
        **tput,
        "goodput_steps_per_s": D.goodput(len(all_steps), wall),
        **noise_scale.summarize(all_steps, [r["local_grad_sq"] for r in per_rank], tc["global_batch"],
                                engine.dp_size, warm, tput.get("tokens_per_s"), engine.noise_scale_reason,
                                splits=engine.noise_scale_splits),
        "final_loss": all_steps[-1]["loss"] if all_steps else None,
        "final_val_loss": all_evals[-1]["val_loss"] if all_evals else None,
        "final_val_ppl": all_evals[-1]["val_ppl"] if all_evals else None,
        "first_update_norm": first_update,
        **D.time_to_target(all_evals, tc["target_loss"]),
        "val_loss_at_tokens": {str(b): D.val_loss_at_tokens(all_evals, b) for b in tc["token_budgets"]},
        "memory_kind": mem[0]["memory_kind"],
        "peak_mem_gib": max(m["peak_mem_gib"] for m in mem),
        "peak_reserved_gib": max((m.get("peak_reserved_gib") or 0.0) for m in mem) or None,
        "device_mem_used_gib": max((s.get("device_mem_used_gib") or 0.0) for s in samples) if samples else None,
        "per_rank": [{k: v for k, v in r.items() if k != "samples"} for r in per_rank],
        **D.utilization(samples, t_lo, t_hi),
        "utilization_kind": "nvml_gpu_util" if ctx.device.type == "cuda" else "cpu_process_percent",
        "utilization_note": per_rank[0]["nvml"],
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": D.mfu(tput.get("tokens_per_s", math.nan), world, fpt, peak),
        "params_total": param_counts(mc, data.vocab_size)["total"],
        "time_breakdown": D.breakdown_shares(per_rank[0]["breakdown"]),
        "bubble_measured": D.bubble_measured([r["breakdown"] for r in per_rank]),
        "bubble_theoretical": D.bubble_fraction(spec.stages, spec.micro_batches,
                                                 2 if spec.schedule == "interleaved_1f1b" else 1)
        if spec.stages > 1 else None,
        "environment": env,
        "config_hash": config_hash,
        "data": data.meta,
    }
    strip = ("config_hash",)
    write_jsonl(out / "steps.jsonl", [{k: v for k, v in r.items() if k not in strip} for r in all_steps])
    write_jsonl(out / "evals.jsonl", [{k: v for k, v in r.items() if k not in strip} for r in all_evals])
    write_jsonl(out / "samples.jsonl", samples)
    write_json(out / "summary.json", summary)
    log(ctx, f"[{spec.name}] {status}: {len(all_steps)} steps, {summary.get('tokens_per_s', float('nan')):,.0f} "
             f"tok/s steady, peak {summary['peak_mem_gib']:.2f} GiB ({summary['memory_kind']}), "
             f"final val_loss {summary['final_val_loss']}")


def release_run_memory(device) -> None:
    """Between the runs of a batch: free what the last run left (its engine, compiled graphs, cached
    blocks), so the next run starts from an empty device and its peak memory is its own."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def worker_main() -> int:
    """Entry point of each torchrun worker: one run (``LLMPAR_RUN_CONFIG``/``LLMPAR_OUT``) or a batch
    of runs that share this launch (``LLMPAR_BATCH``: a JSON file listing run configs and output
    directories; every run has the same process layout). Expected failures leave a failure file in the
    run's directory for the launcher, and stop the batch (the other ranks may be inside a collective)."""
    tokens_dir = os.environ["LLMPAR_TOKENS"]
    if os.environ.get("LLMPAR_BATCH"):
        jobs = json.loads(Path(os.environ["LLMPAR_BATCH"]).read_text())
    else:
        jobs = [{"run_config": json.loads(os.environ["LLMPAR_RUN_CONFIG"]), "out": os.environ["LLMPAR_OUT"]}]
    rank = int(os.environ.get("RANK", 0))
    for i, job in enumerate(jobs):
        try:
            run(job["run_config"], tokens_dir, job["out"], t0=None if i == 0 else time.time())
        except (torch.OutOfMemoryError, ExpectedFailure) as exc:
            status = getattr(exc, "status", "oom")
            write_json(Path(job["out"]) / FAILURE_FILE.format(rank=rank), {
                "status": status, "message": f"{type(exc).__name__}: {exc}", "rank": rank,
                "traceback": traceback.format_exc(),
            })
            print(f"[rank {rank}] {status}: {exc}", file=sys.stderr, flush=True)
            sys.stderr.flush()
            os._exit(3)  # do not wait on collectives the other ranks will never join
        if i < len(jobs) - 1:
            release_run_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    distributed.destroy()
    # The outputs are complete and the process group is destroyed: leave without interpreter
    # teardown, where a C++ thread left behind by gloo/DeepSpeed once aborted a rank of a finished
    # ZeRO-2 run ("terminate called without an active exception", SIGABRT) in CI.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker_main())
