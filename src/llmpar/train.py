"""The training loop: one loop for every strategy, readable top to bottom.

Runs inside each torchrun worker. config -> process group -> data -> model -> parallelize ->
resume -> steps (log, evaluate, checkpoint) -> summary. Rank 0 writes the run's files; the summary
is written last and atomically, so its presence means the run is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from llmpar.config import stable_hash
from llmpar.data.loader import TokenData
from llmpar.errors import ExpectedFailure
from llmpar.io import read_appended_jsonl, write_jsonl
from llmpar.layout import RunSpec
from llmpar.metrics import definitions as D
from llmpar.metrics import noise_scale
from llmpar.metrics.env import environment
from llmpar.metrics.probe import LayerProbe, compiled_graphs
from llmpar.metrics.recorder import Recorder
from llmpar.metrics.sampler import Sampler
from llmpar.metrics.updates import FirstUpdate
from llmpar.model import attention_backends, build_model
from llmpar.record import RunRecord, write_failure, write_run
from llmpar.shape import flops_per_token, param_counts
from llmpar.strategies import parallelize
from llmpar.strategies.levers import decoder_layers


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


def evaluate(engine, data: TokenData, eval_batch: int, n_batches: int, device) -> torch.Tensor:
    """Mean validation loss over ``n_batches`` fixed batches of ``eval_batch`` sequences (the study's: the
    same validation set for runs of any global batch)."""
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = data.val_batch(i, eval_batch, engine.dp_rank, engine.dp_size)
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


def run(run_cfg: dict, tokens_dir: str | Path, out_dir: str | Path, t0: float) -> None:
    """Train one run in this process group (created here when there is none; left for the caller to
    destroy, so that a batch of runs shares one launch). ``t0``: when the run's wall clock starts."""
    ctx = distributed.init(run_cfg["train"]["device"])
    # the attention backend order (train.attention) holds for the whole run, backward passes included
    with attention_backends(run_cfg["train"]["attention"], ctx.device.type):
        _train(run_cfg, RunSpec.from_dict(run_cfg["run"]), ctx, tokens_dir, Path(out_dir), t0)


@dataclasses.dataclass
class Resumed:
    """Where an attempt starts: the step after the newest complete checkpoint of this config (0: afresh),
    the attempt number, the earlier attempts' elapsed time and their progress rows."""

    step: int = 0
    attempt: int = 0
    offset_s: float = 0.0
    prior: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    """What the attempt's steps produced, for the run's record."""

    steps: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)
    first_update: dict | None = None
    status: str = "ok"
    message: str = ""
    stopped_at_target: bool = False
    local_sq: dict = dataclasses.field(default_factory=dict)  # step -> this replica's squared gradient norm


def config_hash_of(run_cfg: dict, data_meta: dict) -> str:
    """The hash a checkpoint must carry to be resumed: everything that changes the training (seed, model,
    the whole train section, the run's layout and levers, the data)."""
    return stable_hash({k: run_cfg[k] for k in ("seed", "model", "train", "run")} | {"data": data_meta})


def resume(engine, ckpts: Checkpoints, progress_path: Path, config_hash: str, ctx, name: str) -> Resumed:
    """Load the newest intact checkpoint of this config (none: start afresh, dropping stale progress). A
    damaged newer one is logged with the reason and removed (:meth:`Checkpoints.newest_intact`)."""
    state = Resumed()
    chosen = None
    if engine.train_cfg["checkpoint_every"]:
        chosen = ckpts.newest_intact(lambda msg: log(ctx, f"[{name}] {msg}"))
    if chosen is not None:
        path, meta = chosen
        ckpts.load(engine, path)
        rows = read_appended_jsonl(progress_path)
        if ctx.is_main:  # drop a line torn by the kill before appending to the file again
            write_jsonl(progress_path, rows)
        state.prior = [r for r in rows if r.get("config_hash") == config_hash]
        # a new attempt number also when an older checkpoint is resumed after later attempts ran
        state.step = meta["step"]
        state.attempt = 1 + max([meta["attempt"]] + [r["attempt"] for r in state.prior if "attempt" in r])
        state.offset_s = max([meta["elapsed_s"]] + [r["elapsed_s"] for r in state.prior])
        log(ctx, f"[{name}] resumed from checkpoint {path.name} (step {state.step}), attempt {state.attempt}; "
                 f"previous attempt ran until {state.offset_s:.1f}s")
    elif ctx.is_main:
        progress_path.unlink(missing_ok=True)
    ckpts.clean_partial()
    return state


def _train(run_cfg: dict, spec: RunSpec, ctx, tokens_dir: str | Path, out: Path, t0: float) -> None:
    tc, mc, seed = run_cfg["train"], run_cfg["model"], run_cfg["seed"]
    log(ctx, f"[{spec.name}] strategy={spec.strategy} world={ctx.world_size} tp={spec.tp} stages={spec.stages} "
             f"dp={spec.dp} micro_batches={spec.micro_batches}x{spec.micro_batch_size} device={ctx.device} "
             f"backend={ctx.backend} threads/process={torch.get_num_threads()}")

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peaks are per run, also when runs share a process
    data = TokenData(tokens_dir, mc["seq_len"], seed)
    model = build_model(mc, data.vocab_size, seed, device=ctx.device, attention=tc["attention"])
    first = FirstUpdate(model)  # the tracked parameters' full sizes, before the strategy shards them
    graphs_before = compiled_graphs()
    probe = LayerProbe(decoder_layers(model)) if tc["metrics"] and not spec.compile else None
    engine = parallelize(model, spec, ctx, tc)

    config_hash = config_hash_of(run_cfg, data.meta)
    ckpts = Checkpoints(out / "checkpoints", config_hash, ctx.rank, tc["keep_checkpoints"])
    progress_path = out / "progress.jsonl"
    resumed = resume(engine, ckpts, progress_path, config_hash, ctx, spec.name)
    if resumed.step == 0:
        first.snapshot(engine.named_weights(model))
    dist.barrier()

    seq, gb = mc["seq_len"], tc["global_batch"]
    rec = Recorder(ctx.device, t0, resumed.offset_s, gb * seq, gb, resumed.attempt)
    sampler = Sampler(ctx.rank, t0, resumed.offset_s, tc["sample_period_s"]) if tc["metrics"] else None
    if sampler:
        sampler.start()
    if spec.fault:
        faults.inject(engine, spec.fault, resumed.step, resumed.attempt, ctx.is_main,
                      lambda m: log(ctx, f"[{spec.name}] {m}"))
    outcome = train_steps(engine, model, data, rec, ckpts, first, probe, resumed, config_hash, ctx, tc, spec,
                          progress_path)
    per_rank = distributed.all_gather_object({
        "rank": ctx.rank,
        "node": distributed.node_name(),
        "node_rank": ctx.node_rank,
        "memory": peak_memory(ctx.device),
        "state_bytes": engine.captured_state_bytes,
        "local_params": engine.local_param_count(),
        "samples": sampler.stop() if sampler else [],
        "breakdown": engine.time_breakdown(),
        "nvml": None if sampler is None else sampler.nvml_reason,
        # observed facts of what ran (llmpar.metrics.probe): graphs torch.compile made during this run,
        # and the decoder layers' passes in the second step of this attempt (None: compiled or no metrics)
        "compiled_graphs": compiled_graphs() - graphs_before,
        "layer_probe": None if probe is None else probe.result(),
        "local_grad_sq": {s: float(v) for s, v in outcome.local_sq.items()},
    })
    if ctx.is_main:
        steps, evals, record = run_record(run_cfg, spec, ctx, data, engine, config_hash, resumed, outcome, per_rank,
                                          t0)
        write_run(out, record, steps, evals, [s for r in per_rank for s in r["samples"]])
        log(ctx, f"[{spec.name}] {record.status}: {len(steps)} steps, {record.tokens_per_s or math.nan:,.0f} "
                 f"tok/s steady, peak {record.peak_mem_gib:.2f} GiB ({record.memory_kind}), "
                 f"final val_loss {record.final_val_loss}")
    dist.barrier()
    if outcome.status == "ok" and tc["delete_checkpoints_on_success"]:
        ckpts.delete_all()
    engine.close()


def train_steps(engine, model, data, rec, ckpts, first, probe, resumed: Resumed, config_hash: str, ctx, tc: dict,
                spec: RunSpec, progress_path: Path) -> Outcome:
    """The steps of this attempt: train, log, evaluate, checkpoint. Rank 0 appends every step, evaluation
    and the first update to ``progress_path`` as they resolve (what a resume restores)."""
    seq, gb = data.seq_len, tc["global_batch"]
    pin = ctx.device.type == "cuda"
    pool = ThreadPoolExecutor(1)
    out = Outcome()
    bad = 0

    def fetch(step):  # 0-based step -> this rank's micro-batches on the device
        x, y = data.train_batch(step, gb, engine.dp_rank, engine.dp_size)
        return _micro_batches(x, y, spec.micro_batches, ctx.device, pin)

    def flush() -> list[dict]:
        """Resolve pending steps into rows; rank 0 appends them to progress.jsonl."""
        rows = rec.flush()
        for r in rows:
            r["config_hash"] = config_hash
        out.steps.extend(rows)
        if ctx.is_main and rows:
            _append_jsonl(progress_path, [{"kind": "step"} | r for r in rows])
        return rows

    nxt = pool.submit(fetch, resumed.step)
    for step in range(resumed.step + 1, tc["steps"] + 1):
        micro = nxt.result()
        if step < tc["steps"]:
            nxt = pool.submit(fetch, step)
        if step == tc["steps"]:
            engine.arm_state_capture()  # model-state bytes at the last step's optimizer step
        watching = probe is not None and step == min(resumed.step + 2, tc["steps"])
        engine.begin_step(step)
        with probe.watch() if watching else contextlib.nullcontext():
            loss = engine.train_step(micro)
        if step == tc["warmup_steps_excluded"]:
            engine.reset_time_breakdown()  # the breakdown covers the steady steps, as throughput does
        rec.step_done(step, loss, engine.lr(), engine.grad_norm())
        replica_sq = engine.local_grad_sq()
        if replica_sq is not None:
            out.local_sq[step] = replica_sq  # resolved once, after the last step (no per-step sync)
        if step == 1:  # host copies, outside the step's time (as an evaluation is)
            out.first_update = first.norms(engine.named_weights(model), ctx.device)
            if ctx.is_main:
                _append_jsonl(progress_path, [{"kind": "first_update", "norms": out.first_update,
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
                    out.status = "diverged"
                    out.message = f"loss not finite for {bad} consecutive steps (at step {r['step']})"
                    break
            if out.status == "diverged":
                log(ctx, f"[{spec.name}] DIVERGED: {out.message}")
                break

        if step % tc["eval_every"] == 0 or step == tc["steps"]:
            val = evaluate(engine, data, tc["eval_batch"], tc["eval_batches"], ctx.device).item()
            row = {"step": step, "tokens": step * gb * seq, "elapsed_s": rec.now_elapsed(), "val_loss": val,
                   "val_ppl": math.exp(min(val, 50.0)), "config_hash": config_hash, "attempt": resumed.attempt}
            out.evals.append(row)
            if ctx.is_main:
                _append_jsonl(progress_path, [{"kind": "eval"} | row])
            log(ctx, f"[{spec.name}] eval step {step} | val_loss {val:.4f} | ppl {row['val_ppl']:.2f}")
            rec.boundary()
            if tc["stop_at_target"] and tc["target_loss"] is not None and val <= tc["target_loss"]:
                out.stopped_at_target = True  # the same value on every rank: the loss is all-reduced
                log(ctx, f"[{spec.name}] reached target loss {tc['target_loss']} at step {step}: stopping")
                break

        if tc["checkpoint_every"] and step % tc["checkpoint_every"] == 0 and step < tc["steps"]:
            flush()
            path = ckpts.save(engine, step, resumed.attempt, rec.now_elapsed())
            log(ctx, f"[{spec.name}] checkpoint {path.name}")
            rec.boundary()

    flush()
    pool.shutdown()
    return out


def run_record(run_cfg: dict, spec: RunSpec, ctx, data, engine, config_hash: str, resumed: Resumed,
               outcome: Outcome, per_rank: list[dict], t0: float) -> tuple[list[dict], list[dict], RunRecord]:
    """The run's step and evaluation rows (earlier attempts' included, each step once) and its record."""
    tc, mc = run_cfg["train"], run_cfg["model"]
    prior = resumed.prior
    prior_steps = [{k: v for k, v in r.items() if k != "kind"} for r in prior if r.get("kind") == "step"]
    prior_evals = [{k: v for k, v in r.items() if k != "kind"} for r in prior if r.get("kind") == "eval"]
    all_steps, redone = D.dedupe_steps(prior_steps + outcome.steps)
    evals_by_step = {e["step"]: e for e in prior_evals + outcome.evals}
    all_evals = [evals_by_step[s] for s in sorted(evals_by_step)]
    first_update = outcome.first_update
    if first_update is None:  # resumed after step 1: the attempt that ran it recorded it
        first_update = next((r["norms"] for r in prior if r.get("kind") == "first_update"), None)
    samples = [s for r in per_rank for s in r["samples"]]
    wall = time.time() - t0 + resumed.offset_s  # this attempt plus every earlier one (lost work included)
    world = ctx.world_size
    fpt = flops_per_token(mc, data.vocab_size)
    env = environment()
    peak = D.peak_flops_for(env["gpu_name"], tc["peak_flops"])
    warm = tc["warmup_steps_excluded"]
    tput = D.throughput(all_steps, warm, mc["seq_len"], world) if all_steps else {}
    t_lo, t_hi = D.steady_window(all_steps, warm)
    mem = [r["memory"] for r in per_rank]
    record = RunRecord(
        run=spec.name,
        status=outcome.status,
        message=outcome.message,
        spec=spec.to_dict(),
        strategy=spec.strategy,
        world_size=world,
        nodes=spec.nodes,
        gpus_per_node=spec.gpus_per_node,
        node_names=sorted({r["node"] for r in per_rank}),
        device=ctx.device.type,
        backend=ctx.backend,
        steps_completed=len(all_steps),
        steps_planned=tc["steps"],
        stopped_at_target=outcome.stopped_at_target,
        global_batch=tc["global_batch"],
        tokens_trained=all_steps[-1]["tokens"] if all_steps else 0,
        attempts=1 + max([r.get("attempt", 0) for r in all_steps], default=0),
        redone_steps=redone,
        state_bytes_at="step_peak",  # see DEFINITIONS["state_gib_per_rank"]
        wall_time_s=wall,
        started_at=t0 - resumed.offset_s,
        finished_at=time.time(),
        **tput,
        goodput_steps_per_s=D.goodput(len(all_steps), wall),
        **noise_scale.summarize(all_steps, [r["local_grad_sq"] for r in per_rank], tc["global_batch"],
                                engine.dp_size, warm, engine.noise.reason, splits=engine.noise.splits),
        final_loss=all_steps[-1]["loss"] if all_steps else None,
        final_val_loss=all_evals[-1]["val_loss"] if all_evals else None,
        final_val_ppl=all_evals[-1]["val_ppl"] if all_evals else None,
        first_update_norm=first_update,
        **D.time_to_target(all_evals, tc["target_loss"]),
        val_loss_at_tokens={str(b): D.val_loss_at_tokens(all_evals, b) for b in tc["token_budgets"]},
        memory_kind=mem[0]["memory_kind"],
        peak_mem_gib=max(m["peak_mem_gib"] for m in mem),
        peak_reserved_gib=max((m.get("peak_reserved_gib") or 0.0) for m in mem) or None,
        device_mem_used_gib=max((s.get("device_mem_used_gib") or 0.0) for s in samples) if samples else None,
        per_rank=[{k: v for k, v in r.items() if k != "samples"} for r in per_rank],
        **D.utilization(samples, t_lo, t_hi),
        utilization_kind="nvml_gpu_util" if ctx.device.type == "cuda" else "cpu_process_percent",
        utilization_note=per_rank[0]["nvml"],
        flops_per_token=fpt,
        peak_flops=peak,
        mfu=D.mfu(tput.get("tokens_per_s", math.nan), world, fpt, peak),
        params_total=param_counts(mc, data.vocab_size)["total"],
        time_breakdown=D.breakdown_shares(per_rank[0]["breakdown"]),
        bubble_measured=D.bubble_measured([r["breakdown"] for r in per_rank]),
        bubble_theoretical=D.bubble_fraction(spec.stages, spec.micro_batches, spec.virtual_stages)
        if spec.stages > 1 else None,
        environment=env,
        config_hash=config_hash,
        data=data.meta,
    )
    strip = ("config_hash",)
    steps = [{k: v for k, v in r.items() if k not in strip} for r in all_steps]
    evals = [{k: v for k, v in r.items() if k not in strip} for r in all_evals]
    return steps, evals, record


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
    """Entry point of each torchrun worker: the runs of the job file ``LLMPAR_JOB`` (:func:`llmpar.launch.write_job`;
    several runs of one process layout may share a launch). An expected failure leaves a failure file in the
    run's directory for the launcher, and stops the batch (the other ranks may be inside a collective)."""
    job = json.loads(Path(os.environ["LLMPAR_JOB"]).read_text())
    rank = int(os.environ.get("RANK", 0))
    for i, entry in enumerate(job["runs"]):
        try:
            run(entry["run_config"], job["tokens"], entry["out"], t0=job["t0"] if i == 0 else time.time())
        except (torch.OutOfMemoryError, ExpectedFailure) as exc:
            status = getattr(exc, "status", "oom")
            write_failure(Path(entry["out"]), rank, status, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            print(f"[rank {rank}] {status}: {exc}", file=sys.stderr, flush=True)
            sys.stderr.flush()
            os._exit(3)  # do not wait on collectives the other ranks will never join
        if i < len(job["runs"]) - 1:
            release_run_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    distributed.destroy()
    # The outputs are complete and the process group is destroyed: leave without interpreter
    # teardown, where a C++ thread left behind by gloo/DeepSpeed can abort a rank of a finished run
    # ("terminate called without an active exception", SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker_main())
