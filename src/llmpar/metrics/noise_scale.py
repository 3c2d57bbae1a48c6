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
goodput = throughput × E.
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
