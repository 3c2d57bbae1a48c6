"""The gradient noise scale estimator recovers a known B_noise from synthetic gradients.

Per-sample gradients are G + L·z with a known covariance Σ = L·Lᵀ (z standard normal), so
B_noise = tr(Σ) / |G|² is known exactly. Each step draws k replicas of b samples each, as a
data-parallel step does: the mean squared norm of the replicas' gradients and the squared norm of
their mean feed the two-batch estimator."""

import math

import pytest
import torch
from conftest import make_config

from llmpar.layout import RunSpec
from llmpar.metrics.noise_scale import NoiseScale, pollux, pollux_efficiency, ratio_with_error, two_batch_estimates


def synthetic_steps(true_noise_scale: float, b: int, k: int, steps: int, dim: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(dim, generator=gen, dtype=torch.float64)
    scales = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5  # a non-isotropic diagonal Σ
    scales *= math.sqrt(true_noise_scale * G.square().sum() / scales.square().sum())  # tr(Σ)/|G|² = target
    for _ in range(steps):
        per_sample = G + scales * torch.randn(k, b, dim, generator=gen, dtype=torch.float64)
        replicas = per_sample.mean(dim=1)  # each replica's gradient over its b samples
        yield replicas.square().sum(dim=1).mean().item(), replicas.mean(dim=0).square().sum().item()


@pytest.mark.parametrize("true, b, k", [(20.0, 4, 2), (200.0, 8, 4), (5.0, 2, 2)])
def test_recovers_known_noise_scale(true, b, k):
    est = NoiseScale(decay=0.99)
    for small_sq, big_sq in synthetic_steps(true, b, k, steps=3000):
        est.update(small_sq, big_sq, b, k * b)
    ratio, se = ratio_with_error(est.samples)
    print(f"true {true}: ratio of means {ratio:.2f} ± {se:.2f}, EMA {est.value:.2f}")
    assert abs(ratio - true) <= 0.10 * true
    assert abs(ratio - true) <= 4 * se  # the stated uncertainty covers the error
    assert abs(est.value - true) <= 0.25 * true  # the EMA follows ~100 recent steps: noisier


def test_per_step_estimates_are_unbiased_at_their_expectations():
    # E|g_n|² = |G|² + tr(Σ)/n: feeding the expectations returns |G|² and tr(Σ) exactly
    g2, trace = 3.0, 12.0
    small, big = 4, 16
    assert two_batch_estimates(g2 + trace / small, g2 + trace / big, small, big) == pytest.approx((g2, trace))


def test_refusals_and_pollux():
    with pytest.raises(ValueError):
        two_batch_estimates(1.0, 1.0, 8, 8)  # one batch size: nothing to compare
    assert NoiseScale().value is None
    assert ratio_with_error([(1.0, 2.0)]) is None
    assert pollux_efficiency(10.0, 10.0, 10.0) == 1.0
    assert pollux_efficiency(10.0, 30.0, 10.0) == pytest.approx(0.5)  # (10 + 10) / (10 + 30)


def test_pollux_has_one_reference_per_study():
    """E(M) = (B + M0) / (B + M) with the study's M0: every run at M0 gets 1 whatever its noise scale (or with
    none), a run at twice M0 the formula's value, and goodput is throughput x efficiency."""
    at_reference = [pollux(b, 32, 32, 1000.0, None) for b in (0.5, 7.0, 300.0)]
    assert {r["pollux_efficiency"] for r in at_reference} == {1.0}
    assert pollux(None, 32, 32, 1000.0, "one batch size")["pollux_efficiency"] == 1.0
    double = pollux(8.0, 64, 32, 1000.0, None)
    assert double["pollux_efficiency"] == pytest.approx((8 + 32) / (8 + 64))
    assert double["pollux_goodput"] == pytest.approx(1000.0 * (8 + 32) / (8 + 64))
    half = pollux(8.0, 16, 32, 1000.0, None)  # a smaller batch makes more progress per sequence
    assert half["pollux_efficiency"] == pytest.approx((8 + 32) / (8 + 16)) and half["pollux_efficiency"] > 1
    none = pollux(None, 64, 32, 1000.0, "one data-parallel replica of one micro-batch")
    assert none["pollux_efficiency"] is None and "one data-parallel replica" in none["pollux_reason"]


@pytest.mark.parametrize("dp, splits", [(2, None), (2, 4), (4, None)])
def test_summarize_measures_at_the_replica_batch(dp, splits):
    """summarize on step rows whose two squared norms are their expectations for |G|^2 = 3 and tr(Sigma) = 12
    (B_noise = 4 sequences): the small batch is global_batch / splits (splits = dp unless an engine measures
    smaller parts), the big one global_batch."""
    from llmpar.metrics.noise_scale import summarize

    g2, trace, global_batch, warmup = 3.0, 12.0, 16, 1
    small = global_batch // (splits or dp)
    steps = [{"step": s, "grad_norm": math.sqrt(g2 + trace / global_batch)} for s in range(1, 7)]
    ranks = [{s: g2 + trace / small for s in range(1, 7)} for _ in range(dp)]
    fields = summarize(steps, ranks, global_batch, dp, warmup, None, splits=splits)
    assert fields["noise_scale_reason"] is None and fields["noise_scale_small_batch"] == small
    assert fields["gradient_noise_scale"] == pytest.approx(trace / g2, rel=1e-9)
    assert fields["gradient_noise_scale_mean"] == pytest.approx(trace / g2, rel=1e-9)


# --------------------------------------------------------------------------- measured in real runs

@pytest.mark.slow
def test_runs_measure_the_same_noise_scale_on_different_engines(shared_two, shared_four):
    """DDP and DeepSpeed ZeRO-1/2/3 (parameter gradient hooks), FSDP2 (its reduce-scatter's input), the torch
    PP2 x DP2 hybrid (the pipeline's own gradient over both stages) and DeepSpeed's (hooks per micro-batch,
    summed over the stages), and layouts of one replica with several micro-batches (pipelines, TP with
    accumulation: hooks per micro-batch) measure the same training's noise scale: within their stated
    uncertainty of each other (torch TP and DeepSpeed AutoTP: their shards summed over the tensor-parallel
    group). TP of one micro-batch (either engine) says why it measures nothing."""
    from conftest import read_run

    ddp = read_run(shared_two["dir"]["ddp_ref"])[0]
    fsdp = read_run(shared_two["dir"]["fsdp_ref"])[0]
    zero = [read_run(shared_two["dir"][f"{r}_ref"])[0] for r in ("zero1", "zero2_offload", "zero3")]
    hybrid = read_run(shared_four["dir"]["pp_dp_hybrid_ref"])[0]
    ds_hybrid = read_run(shared_four["dir"]["pp_dp_hybrid_deepspeed"])[0]  # per micro-batch of 1 sequence
    for s in (ddp, fsdp, *zero, hybrid, ds_hybrid):
        assert s["noise_scale_reason"] is None, s["noise_scale_reason"]
        assert s["gradient_noise_scale"] > 0 and s["gradient_noise_scale_se"] > 0
    print("noise scale: DDP", ddp["gradient_noise_scale_mean"], "+-", ddp["gradient_noise_scale_se"],
          "| FSDP2", fsdp["gradient_noise_scale_mean"], "+-", fsdp["gradient_noise_scale_se"],
          "| PP2 x DP2", hybrid["gradient_noise_scale_mean"], "+-", hybrid["gradient_noise_scale_se"])
    print("ZeRO-1/2 (optimizer offload)/3:", [(z["gradient_noise_scale_mean"], z["gradient_noise_scale_se"])
                                                for z in zero])
    print("DeepSpeed PP2 x DP2:", ds_hybrid["gradient_noise_scale_mean"], "+-", ds_hybrid["gradient_noise_scale_se"])
    for other in (fsdp, *zero, hybrid, ds_hybrid):
        gap = abs(ddp["gradient_noise_scale_mean"] - other["gradient_noise_scale_mean"])
        assert gap <= math.hypot(ddp["gradient_noise_scale_se"], other["gradient_noise_scale_se"])
    # with 2 micro-batches every engine measures each micro-batch's gradient: the small batch is one
    # micro-batch (2 sequences), the same estimator on the same training, so DDP's and ZeRO's parameter hooks
    # and FSDP2's reduce-scatter inputs agree to rounding
    ddp_acc, fsdp_acc, zero_acc = (read_run(shared_two["dir"][r])[0]
                                   for r in ("ddp_accumulate", "fsdp_accumulate", "zero1_accumulate"))
    print("with 2 micro-batches:", *(f"{n} {s['gradient_noise_scale_mean']} +- {s['gradient_noise_scale_se']}"
                                     for n, s in (("DDP", ddp_acc), ("FSDP2", fsdp_acc), ("ZeRO-1", zero_acc))))
    for other in (ddp_acc, zero_acc):
        assert other["gradient_noise_scale_mean"] == pytest.approx(fsdp_acc["gradient_noise_scale_mean"], rel=1e-3)
    # one replica of several micro-batches (the pipelines, TP with accumulation): per micro-batch, from hooks
    one_replica = {r: read_run(shared_two["dir"][r])[0]
                   for r in ("pp_torch_ref", "pp_gpipe", "pp_deepspeed_ref", "tp_accumulate",
                             "tp_deepspeed_accumulate")}
    print("one replica, per micro-batch:", *(f"{n} {s['gradient_noise_scale_mean']} +- {s['gradient_noise_scale_se']}"
                                             for n, s in one_replica.items()))
    for s in one_replica.values():
        assert s["noise_scale_reason"] is None, s["noise_scale_reason"]
        gap = abs(ddp["gradient_noise_scale_mean"] - s["gradient_noise_scale_mean"])
        assert gap <= math.hypot(ddp["gradient_noise_scale_se"], s["gradient_noise_scale_se"])
    for run, why in (("tp_ref", "one data-parallel replica of one micro-batch"),
                     ("tp_deepspeed_ref", "one data-parallel replica of one micro-batch")):
        s = read_run(shared_two["dir"][run])[0]
        assert s["gradient_noise_scale"] is None
        assert why in s["noise_scale_reason"], (run, s["noise_scale_reason"])


# which small batch each layout measures: "micro" (each micro-batch's gradient: parameter hooks, FSDP2's
# reduce-scatter input) or "replica" (the replica's gradient over all its micro-batches, after backward)
MEASURES = {
    "two": {"ddp_ref": "micro", "ddp_accumulate": "micro", "fsdp_accumulate": "micro", "zero1_accumulate": "micro",
            "zero3_ref": "micro", "zero2_offload_ref": "micro", "pp_torch_ref": "micro", "pp_compile": "micro",
            "pp_deepspeed_ref": "micro", "tp_accumulate": "micro", "tp_deepspeed_accumulate": "micro"},
    "four": {"pp_dp_hybrid_ref": "replica", "tp_dp": "replica", "pp_dp_hybrid_deepspeed": "micro",
             "pp_tp_3d_ref": "micro", "tp_deepspeed_dp": "micro"},
}


@pytest.mark.slow
def test_every_layout_measures_the_gradient_its_estimator_assumes(shared_two, shared_four, tiny_tokens):
    """At step 1 every rank's recorded replica norm is exactly what the estimator takes it for: the mean over
    its replica's micro-batches k of |grad L_k|² (per-micro-batch layouts) or |grad L|² of the replica's whole
    batch, computed here on a plain copy of the model from the same data. Pipeline stages and
    tensor-parallel shards (the 3-D run: both; AutoTP's slices, alone and with 2 replicas) hold parts of
    one replica: their parts must add up to it once, no part missed or counted twice. fp32, 1e-4 relative
    (fp32 norms against fp64 sums)."""
    from conftest import read_run

    from llmpar.config import prepare
    from llmpar.data.loader import TokenData

    cfg = prepare(make_config())
    data = TokenData(tiny_tokens, cfg["model"]["seq_len"], cfg["seed"])
    gb = cfg["train"]["global_batch"]
    for layout, runs in MEASURES.items():
        shared = shared_two if layout == "two" else shared_four
        for run, kind in runs.items():
            summary = read_run(shared["dir"][run])[0]
            dp, m = summary["spec"]["dp"], summary["spec"]["micro_batches"]
            want = []
            for r in range(dp):
                x, y = data.train_batch(0, gb, r, dp)
                micro = list(zip(x.chunk(m), y.chunk(m))) if kind == "micro" else [(x, y)]
                want.append(_micro_grad_sq(cfg["model"], data.vocab_size, cfg["seed"], micro))
            got = [rank["local_grad_sq"]["1"] for rank in summary["per_rank"]]
            print(run, kind, "recorded", got, "expected per replica", want)
            for g in got:  # each rank holds its replica's value ...
                assert min(abs(g - w) / w for w in want) <= 1e-4, (run, g, want)
            assert sum(got) / len(got) == pytest.approx(sum(want) / dp, rel=1e-4)  # ... every replica as often


def _micro_grad_sq(model_cfg, vocab, seed, micro, loss_fn=None, state=None) -> float:
    """mean over the micro-batches (x, y) of |grad of the mean loss on (x, y)|², on a plain copy of the model
    (its initial weights, or ``state``; fp64 sums): what per-micro-batch gradient hooks measure."""
    from llmpar.model import build_model
    from llmpar.strategies.loss import causal_lm_loss, cross_entropy

    model = build_model(model_cfg, vocab, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    total = 0.0
    for x, y in micro:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, x, y, loss_fn or cross_entropy).backward()
        total += sum(p.grad.double().square().sum().item() for p in model.parameters())
    return total / len(micro)


def test_hooks_measure_each_micro_batch_only_on_measured_steps(tmp_path):
    """DDP and ``single`` measure the small batch of the noise scale per micro-batch, from parameter hooks:
    the mean over micro-batches of the squared norm of each one's mean-loss gradient, as a plain copy of the
    model computes it. One process of one micro-batch has one batch size and measures nothing (DDP's
    replicas of one micro-batch: the exactness test over the shared runs). The hooks exist only on measured steps
    (``train.noise_scale_every``: 2 here): step 1 registers none and reports nothing, step 2 measures, and
    no hook outlives its step. ``train.metrics: false`` (the overhead benchmark's off arm) turns it off
    and says why. In process, one gloo rank."""
    import copy
    import types

    import torch.distributed as dist

    from llmpar.config import prepare, run_config
    from llmpar.model import build_model
    from llmpar.strategies import ddp, single

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ctx = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, is_main=True)
        for module, strategy, m in ((ddp, "data_parallel", 1), (ddp, "data_parallel", 2), (single, "single", 2),
                                    (single, "single", 1)):
            cfg = prepare(make_config({"run": {"strategy": strategy, "gpus_per_node": 1, "micro_batches": m}}))
            rc = run_config(cfg, "run")
            spec = RunSpec(**cfg["runs"]["run"])
            x = torch.randint(0, 50, (4, cfg["model"]["seq_len"]))
            micro = list(zip(x.chunk(m), x.chunk(m)))
            for metrics in (True, False):
                train = {**rc["train"], "metrics": metrics, "noise_scale_every": 2}
                engine = module.parallelize(build_model(cfg["model"], 50, seed=0), spec, ctx, train)
                plain = getattr(engine.model, "module", engine.model)  # DDP's wrapped module
                params = list(plain.parameters())
                for step in (1, 2):
                    state = copy.deepcopy(plain.state_dict())  # the weights this step's gradients are taken at
                    engine.begin_step(step)
                    hooked = sum(len(p._backward_hooks or {}) for p in params)
                    engine.train_step(micro)
                    sq = engine.local_grad_sq()
                    assert all(not p._backward_hooks for p in params)  # none outlives its step
                    if not metrics:
                        assert sq is None and hooked == 0 and engine.noise.reason == "train.metrics is off"
                    elif m == 1:  # one process, one micro-batch: one batch size, no hooks, nothing measured
                        assert sq is None and engine.noise.hooks is None and engine.noise.splits == 1
                    elif step == 1:  # not a multiple of noise_scale_every
                        assert sq is None and hooked == 0
                    else:
                        assert hooked == len(params) and engine.noise.splits == m
                        assert engine.noise.reason is None
                        want = _micro_grad_sq(cfg["model"], 50, 0, micro, engine.loss_fn, state)
                        # 1e-4: fp32 norms of ~1e5 elements (this CPU's fp32 reduction is off the fp64 sum by ~2e-5)
                        assert sq.item() == pytest.approx(want, rel=1e-4)
    finally:
        dist.destroy_process_group()


def test_fsdp_on_one_rank_says_why_it_measures_nothing(tmp_path):
    """FSDP2 on one rank issues no reduce-scatter, where it reads each micro-batch's gradient: with two
    micro-batches it measures nothing and says so (not the generic reason of engines that reduce inside
    backward). In process, one gloo rank."""
    import types

    import torch.distributed as dist

    from llmpar.config import prepare, run_config
    from llmpar.model import build_model
    from llmpar.strategies import fsdp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cfg = prepare(make_config({"run": {"strategy": "fsdp", "gpus_per_node": 1, "micro_batches": 2}}))
        ctx = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, is_main=True)
        engine = fsdp.parallelize(build_model(cfg["model"], 50, seed=0), RunSpec(**cfg["runs"]["run"]), ctx,
                                  run_config(cfg, "run")["train"])
        x = torch.randint(0, 50, (4, cfg["model"]["seq_len"]))
        engine.begin_step(1)
        engine.train_step(list(zip(x.chunk(2), x.chunk(2))))
        assert engine.local_grad_sq() is None
        assert engine.noise.reason.startswith("FSDP2 on one rank")
    finally:
        dist.destroy_process_group()
