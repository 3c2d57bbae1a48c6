"""The batch-size sweep's analysis (llmpar.analysis.batch_sweep): the crossing, the fit of McCandlish et al.'s
model on pairs with a known critical batch, the noise scale near the target, and Pollux beside the measured
efficiency."""

import math
import random

import pytest

from llmpar.analysis.batch_sweep import analyse, crossing, fit, noise_scale_before


def test_crossing_interpolates_between_the_bracketing_evaluations():
    evals = [{"step": 10, "val_loss": 6.0}, {"step": 20, "val_loss": 5.0}, {"step": 30, "val_loss": 4.0}]
    assert crossing(evals, 4.5) == pytest.approx(25.0)
    assert crossing(evals, 6.5) == 10.0  # the first evaluation is already below
    assert crossing(evals, 3.0) is None  # never reached


@pytest.mark.parametrize("b_crit", [12.0, 48.0, 200.0])
def test_fit_recovers_a_known_critical_batch(b_crit):
    """Pairs on S = S_min (1 + B_crit / B) with 1 % multiplicative noise (about what interpolating the crossing
    between evaluations leaves): B_crit within 5 %."""
    rng = random.Random(int(b_crit))
    s_min = 150.0
    batches = [8, 16, 32, 64, 128, 256]
    points = [(b, s_min * (1 + b_crit / b) * math.exp(rng.gauss(0, 0.01))) for b in batches]
    got = fit(points)
    assert got["b_crit"] == pytest.approx(b_crit, rel=0.05)
    assert got["s_min"] == pytest.approx(s_min, rel=0.05)
    assert got["e_min"] == pytest.approx(s_min * b_crit, rel=0.08)
    # the fitted curve is the hyperbola (S/S_min - 1)(E/E_min - 1) = 1
    for b in batches:
        s = got["s_min"] + got["e_min"] / b
        assert (s / got["s_min"] - 1) * (s * b / got["e_min"] - 1) == pytest.approx(1.0)


def test_fit_needs_three_batches():
    with pytest.raises(ValueError, match="at least 3"):
        fit([(8, 100.0), (16, 60.0)])


def test_noise_scale_before_the_target_uses_the_second_half():
    """Per-step estimates from norms built to give |G|² = 2 and tr(Σ) = 40 (B_simple 20) in the second half of
    the way to the target and nonsense before it: 20 back, the first half left out."""
    g2, trace, small, big = 2.0, 40.0, 4, 16
    steps, local = [], {}
    for step in range(1, 41):
        good = step >= 10
        steps.append({"step": step, "grad_norm": math.sqrt(g2 + trace / big) if good else 100.0})
        local[str(step)] = (g2 + trace / small) * (1 + 0.01 * (step % 3)) if good else 1.0
    value, se = noise_scale_before(steps, [local], big, small, until_step=20)
    assert value == pytest.approx(trace / g2, rel=0.05) and se > 0


def _run(name, batch, s_to_target, target=4.0):
    # a validation curve crossing ``target`` at ``s_to_target`` steps, evaluated every 5 steps
    evals = [{"step": k, "val_loss": target + (s_to_target - k) / s_to_target} for k in range(5, 10 * s_to_target, 5)]
    return {"run": name, "global_batch": batch, "small_batch": None, "evals": evals, "steps": [], "local_sq": []}


def test_analyse_on_an_exact_sweep():
    """Runs whose steps to target follow the model exactly give back its B_crit, and the measured efficiency
    relative to the reference batch is E(M0) / E(M)."""
    s_min, b_crit = 100, 32
    runs = [_run(f"gb{b}", b, round(s_min * (1 + b_crit / b))) for b in (8, 16, 32, 64, 128)]
    out = analyse(runs, 4.0, 512, reference_batch=8)
    assert out["fit"]["b_crit"] == pytest.approx(b_crit, rel=0.02)
    by_batch = {r["global_batch"]: r for r in out["rows"]}
    assert by_batch[8]["efficiency_measured"] == pytest.approx(1.0)
    assert by_batch[64]["efficiency_measured"] == pytest.approx(
        by_batch[8]["sequences_to_target"] / by_batch[64]["sequences_to_target"])
    assert by_batch[64]["tokens_to_target_interp"] == pytest.approx(by_batch[64]["sequences_to_target"] * 512)


def test_a_target_never_reached_is_a_row_not_a_crash():
    runs = [_run("gb8", 8, 400), _run("gb16", 16, 220), _run("gb32", 32, 130), _run("gb64", 64, 90)]
    runs[-1]["evals"] = [e for e in runs[-1]["evals"] if e["val_loss"] > 4.0]  # stopped before the target
    out = analyse(runs, 4.0, 512, reference_batch=8)
    last = out["rows"][-1]
    assert last["reached"] is False and last["steps_to_target"] is None and last["efficiency_measured"] is None
    assert out["fit"]["reached"] == 3 and "b_crit" in out["fit"]
