"""Gradient noise scale and Pollux statistical efficiency.

The simple noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training") is
B_simple = tr(Σ) / |G|², with G the true gradient and Σ the per-sample gradient covariance: the
batch size (in samples) at which the gradient noise and the signal are about equal. It is measured
at no extra cost from gradient norms at two batch sizes that a data-parallel step has anyway
(Appendix A.1): each replica's local gradient over its b samples, before the reduction, and the
reduced gradient over all B = k·b samples. For the mean gradient g_n over n samples,
E|g_n|² = |G|² + tr(Σ)/n, so

    |G|²  ≈ (B·|g_B|² − b·|g_b|²) / (B − b)
    tr(Σ) ≈ (|g_b|² − |g_B|²) / (1/b − 1/B)

are unbiased per step (|g_b|² the mean over the k replicas). Both are noisy, and |G|² can come out
negative on a single step, so each is smoothed by its own exponential moving average and the noise
scale is the ratio of the two averages. A ratio of averages is biased for finite samples (of order
var/mean² of the denominator) but consistent; it is reported with a standard error from the spread of
the per-step estimates (delta method over the steps averaged), so two runs can be compared.

Pollux (Qiao et al., OSDI '21) turns it into statistical efficiency: training with batch M instead of
a reference batch M0 makes E(M) = (B_noise + M0) / (B_noise + M) of the progress per sample, and
goodput = throughput × E. M0 is one batch for the whole study (``train.pollux_reference_batch``), so runs
of one global batch get one efficiency; :func:`pollux` is applied by the aggregation, where the study's
reference is known.
"""

from __future__ import annotations

import math


def two_batch_estimates(small_sq: float, big_sq: float, small: int, big: int) -> tuple[float, float]:
    """One step's unbiased estimates (|G|², tr(Σ)) from the mean squared gradient norm over batches of
    ``small`` samples and the squared norm of their mean over ``big`` samples."""
    if not 0 < small < big:
        raise ValueError(f"need 0 < small batch < big batch, got {small} and {big}")
    g2 = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return g2, trace


class NoiseScale:
    """Exponential moving averages of |G|² and tr(Σ), each smoothed on its own (``decay`` per step,
    bias-corrected as in Adam so the first steps are not pulled towards zero)."""

    def __init__(self, decay: float = 0.95):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self._g2 = self._trace = 0.0
        self.samples: list[tuple[float, float]] = []  # every step's (|G|², tr(Σ)) for the standard error

    def update(self, small_sq: float, big_sq: float, small: int, big: int) -> None:
        g2, trace = two_batch_estimates(small_sq, big_sq, small, big)
        self.steps += 1
        self._g2 = self.decay * self._g2 + (1 - self.decay) * g2
        self._trace = self.decay * self._trace + (1 - self.decay) * trace
        self.samples.append((g2, trace))

    @property
    def value(self) -> float | None:
        """B_simple in samples, or None before the averaged |G|² is positive."""
        if self.steps == 0:
            return None
        correction = 1 - self.decay ** self.steps
        g2, trace = self._g2 / correction, self._trace / correction
        return trace / g2 if g2 > 0 else None


def ratio_with_error(samples: list[tuple[float, float]]) -> tuple[float, float] | None:
    """mean(tr Σ) / mean(|G|²) over the given steps and its standard error (delta method with the
    covariance of the per-step estimates); None with fewer than 2 steps or a non-positive mean |G|²."""
    n = len(samples)
    if n < 2:
        return None
    g = [s[0] for s in samples]
    t = [s[1] for s in samples]
    mg, mt = sum(g) / n, sum(t) / n
    if mg <= 0:
        return None
    vg = sum((x - mg) ** 2 for x in g) / (n - 1)
    vt = sum((x - mt) ** 2 for x in t) / (n - 1)
    cgt = sum((x - mg) * (y - mt) for x, y in zip(g, t)) / (n - 1)
    r = mt / mg
    var = (vt - 2 * r * cgt + r * r * vg) / (mg * mg * n)
    return r, math.sqrt(max(var, 0.0))


def pollux_efficiency(noise_scale: float, batch: float, reference_batch: float) -> float:
    """E(M) = (B_noise + M0) / (B_noise + M): progress per sample at batch M relative to batch M0."""
    return (noise_scale + reference_batch) / (noise_scale + batch)


def summarize(steps: list[dict], local_sq: list[dict[int, float]], global_batch: int, dp: int, warmup: int,
              reason: str | None, decay: float = 0.95, splits: int | None = None) -> dict:
    """The run's noise-scale fields from its step rows (``grad_norm``: the averaged gradient's norm before
    clipping, batch ``global_batch``) and each rank's {step: squared norm of its replica's own gradient}
    (batch ``global_batch / splits``, ``splits`` = dp unless the engine measures smaller parts, e.g. FSDP2
    per micro-batch; the ranks of one replica hold the same value, so the mean over ranks is the mean over
    replicas). Batches in sequences. ``reason``: why the engine measures nothing."""
    fields = {"gradient_noise_scale": None, "gradient_noise_scale_mean": None, "gradient_noise_scale_se": None,
              "noise_scale_small_batch": None, "noise_scale_reason": None}
    if (splits or dp) < 2:
        reason = "one data-parallel replica of one micro-batch: one batch size, nothing to compare"
    elif not any(r.get("grad_norm") is not None for r in steps):
        reason = "needs the gradient norm before clipping, which runs with train.grad_clip 0 do not compute"
    elif not local_sq or not all(local_sq):
        reason = reason or "no replica gradient norms recorded"
    else:
        reason = None
    if reason:
        return fields | {"noise_scale_reason": reason}
    small = global_batch // (splits or dp)
    fields["noise_scale_small_batch"] = small
    est = NoiseScale(decay)
    steady = []
    for r in steps:
        if r.get("grad_norm") is None or any(r["step"] not in ranks for ranks in local_sq):
            continue  # steps of an earlier attempt: their replica norms died with it
        small_sq = sum(ranks[r["step"]] for ranks in local_sq) / len(local_sq)
        est.update(small_sq, r["grad_norm"] ** 2, small, global_batch)
        if r["step"] > warmup:
            steady.append(est.samples[-1])
    fields["gradient_noise_scale"] = est.value
    mean = ratio_with_error(steady)
    if mean is not None:
        fields["gradient_noise_scale_mean"], fields["gradient_noise_scale_se"] = mean
    if est.value is None:
        fields["noise_scale_reason"] = "the averaged |G|^2 estimate is not positive yet (too few or too noisy steps)"
    return fields


def pollux(noise_scale: float | None, batch: int, reference_batch: int, tokens_per_s: float | None,
           reason: str | None) -> dict:
    """Pollux efficiency and goodput of a run at global batch ``batch`` against the study's reference batch M0:
    1 at M0 whatever the noise scale (the definition's own value), else from the run's noise scale, or None
    with the noise scale's reason where it has none."""
    if batch == reference_batch:
        eff = 1.0
    elif noise_scale is None:
        return {"pollux_efficiency": None, "pollux_goodput": None,
                "pollux_reason": reason or "no gradient noise scale recorded"}
    else:
        eff = pollux_efficiency(noise_scale, batch, reference_batch)
    return {"pollux_efficiency": eff, "pollux_goodput": tokens_per_s * eff if tokens_per_s else None,
            "pollux_reason": None}
