"""The gradient noise scale estimator recovers a known B_noise from synthetic gradients.

Per-sample gradients are G + L·z with a known covariance Σ = L·Lᵀ (z standard normal), so
B_noise = tr(Σ) / |G|² is known exactly. Each step draws k replicas of b samples each, as a
data-parallel step does: the mean squared norm of the replicas' gradients and the squared norm of
their mean feed the two-batch estimator."""

import math

import pytest
import torch
from conftest import make_config

from llmpar.config import RunSpec
from llmpar.metrics.noise_scale import NoiseScale, pollux_efficiency, ratio_with_error, two_batch_estimates


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


# --------------------------------------------------------------------------- measured in real runs

@pytest.mark.slow
def test_runs_measure_the_same_noise_scale_on_different_engines(shared_two, shared_four):
    """DDP (its communication hook), FSDP2 (its reduce-scatter's input), DeepSpeed ZeRO-1/2/3 (parameter
    gradient hooks), the torch PP2 x DP2 hybrid (the pipeline's own gradient over both stages) and
    DeepSpeed's (hooks per micro-batch, summed over the stages) measure the same training's noise scale:
    within their stated uncertainty of each other. Layouts of one replica (TP, DeepSpeed's pipeline at 2
    stages) say why they measure nothing."""
    from conftest import read_run

    ddp = read_run(shared_two["dir"]["ddp_ref"])[0]
    fsdp = read_run(shared_two["dir"]["fsdp_ref"])[0]
    zero = [read_run(shared_two["dir"][f"{r}_ref"])[0] for r in ("zero1", "zero2_offload", "zero3")]
    hybrid = read_run(shared_four["dir"]["pp_dp_hybrid_ref"])[0]
    ds_hybrid = read_run(shared_four["dir"]["pp_dp_hybrid_deepspeed"])[0]  # per micro-batch of 1 sequence
    for s in (ddp, fsdp, *zero, hybrid, ds_hybrid):
        assert s["noise_scale_reason"] is None, s["noise_scale_reason"]
        assert s["gradient_noise_scale"] > 0 and s["gradient_noise_scale_se"] > 0
        # Pollux at M = 8 against M0 = 4 sequences, and goodput = throughput x efficiency
        b = s["gradient_noise_scale"]
        assert s["pollux_efficiency"] == pytest.approx((b + 4) / (b + 8))
        assert s["pollux_goodput"] == pytest.approx(s["tokens_per_s"] * s["pollux_efficiency"])
    print("noise scale: DDP", ddp["gradient_noise_scale_mean"], "+-", ddp["gradient_noise_scale_se"],
          "| FSDP2", fsdp["gradient_noise_scale_mean"], "+-", fsdp["gradient_noise_scale_se"],
          "| PP2 x DP2", hybrid["gradient_noise_scale_mean"], "+-", hybrid["gradient_noise_scale_se"])
    print("ZeRO-1/2 (optimizer offload)/3:", [(z["gradient_noise_scale_mean"], z["gradient_noise_scale_se"])
                                                for z in zero])
    print("DeepSpeed PP2 x DP2:", ds_hybrid["gradient_noise_scale_mean"], "+-", ds_hybrid["gradient_noise_scale_se"])
    for other in (fsdp, *zero, hybrid, ds_hybrid):
        gap = abs(ddp["gradient_noise_scale_mean"] - other["gradient_noise_scale_mean"])
        assert gap <= math.hypot(ddp["gradient_noise_scale_se"], other["gradient_noise_scale_se"])
    # with 2 micro-batches FSDP2 and ZeRO measure each micro-batch's gradient: their small batch is one
    # micro-batch (2 sequences, not DDP's 4 of an accumulated replica), another estimator of the same quantity
    ddp_acc, fsdp_acc, zero_acc = (read_run(shared_two["dir"][r])[0]
                                   for r in ("ddp_accumulate", "fsdp_accumulate", "zero1_accumulate"))
    print("with 2 micro-batches:", *(f"{n} {s['gradient_noise_scale_mean']} +- {s['gradient_noise_scale_se']}"
                                     for n, s in (("DDP", ddp_acc), ("FSDP2", fsdp_acc), ("ZeRO-1", zero_acc))))
    for other in (fsdp_acc, zero_acc):
        gap = abs(ddp_acc["gradient_noise_scale_mean"] - other["gradient_noise_scale_mean"])
        assert gap <= math.hypot(ddp_acc["gradient_noise_scale_se"], other["gradient_noise_scale_se"])
        assert other["pollux_efficiency"] == pytest.approx((other["gradient_noise_scale"] + 4)
                                                           / (other["gradient_noise_scale"] + 8))
    # the same estimator on the same training: FSDP2's reduce-scatter inputs and ZeRO's parameter hooks agree
    assert zero_acc["gradient_noise_scale_mean"] == pytest.approx(fsdp_acc["gradient_noise_scale_mean"], rel=1e-3)
    for run, why in (("tp_ref", "one data-parallel replica"), ("pp_deepspeed_ref", "one data-parallel replica")):
        s = read_run(shared_two["dir"][run])[0]
        assert s["gradient_noise_scale"] is None and s["pollux_goodput"] is None
        assert why in s["noise_scale_reason"], (run, s["noise_scale_reason"])


def test_ddp_measures_replica_gradient_and_metrics_off_measures_nothing(tmp_path):
    """DDP's replica gradient norm, from its communication hook, is that of the gradient it averages: the
    whole step's local gradient (with two micro-batches, accumulated under ``no_sync`` over both), equal
    to the squared norm of the gradient of the step's mean loss, computed here on a plain copy of the
    model. ``train.metrics: false`` (the overhead benchmark's off arm) turns it off too: DDP keeps its own
    all-reduce without the hook and the engine says why. In process, one gloo rank."""
    import types

    import torch.distributed as dist

    from llmpar.config import prepare, run_config
    from llmpar.model import build_model
    from llmpar.strategies import ddp
    from llmpar.strategies.base import causal_lm_loss

    def grad_sq(x, loss_fn):  # |grad of the mean loss on x|² of an unwrapped copy of the same model
        model = build_model(cfg["model"], 50, seed=0)
        causal_lm_loss(model, x, x, loss_fn).backward()
        return sum(p.grad.double().square().sum().item() for p in model.parameters())

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        for m in (1, 2):
            cfg = prepare(make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": 1,
                                               "micro_batches": m}}))
            rc = run_config(cfg, "ddp")
            spec = RunSpec(**cfg["runs"]["ddp"])
            ctx = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1, is_main=True)
            x = torch.randint(0, 50, (4, cfg["model"]["seq_len"]))
            micro = [(x, x)] if m == 1 else [(x[:2], x[:2]), (x[2:], x[2:])]
            for metrics in (True, False):
                model = build_model(cfg["model"], 50, seed=0)
                engine = ddp.parallelize(model, spec, ctx, {**rc["train"], "metrics": metrics})
                engine.train_step(micro)
                sq = engine.local_grad_sq()
                if metrics:
                    # 1e-4: fp32 norms of ~1e5 elements (this CPU's fp32 reduction is off the fp64 sum by ~2e-5)
                    assert sq.item() == pytest.approx(grad_sq(x, engine.loss_fn), rel=1e-4)
                else:
                    assert sq is None and engine.noise_scale_reason == "train.metrics is off"
    finally:
        dist.destroy_process_group()
