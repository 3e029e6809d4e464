"""The gradient noise scale: unbiased estimates of |G|² and tr(Σ) from two gradient norms, smoothed over steps.

Notation (McCandlish et al., *An Empirical Model of Large-Batch Training*, 2018): per-sample gradients have mean
``G`` (the true gradient) and covariance ``Σ``. The gradient ``g_b`` of the mean loss over ``b`` independently
drawn samples then satisfies

    E |g_b|² = |G|² + tr(Σ) / b.

**Two norms give both terms.** Measure ``n ≥ 2`` gradients ``g_1 … g_n`` of ``b_1 … b_n`` samples each (DDP: one
per rank, before the all-reduce; one process: one per micro-batch of gradient accumulation, or two consecutive
steps) and their equal-weight average ``ḡ = (g_1 + … + g_n) / n`` (what the all-reduce or the accumulation
produces). With ``1/b_small = mean_i(1/b_i)`` (a harmonic mean, so unequal batches stay exact) and
``b_big = n · b_small``:

    S_small = mean_i |g_i|²        E S_small = |G|² + tr(Σ) / b_small
    S_big   = |ḡ|²                 E S_big   = |G|² + tr(Σ) / b_big

and solving the two linear equations gives the unbiased estimators (:func:`estimate_gradient_stats`):

    |G|²  ≈ (b_big · S_big − b_small · S_small) / (b_big − b_small)
    tr(Σ) ≈ (S_small − S_big) / (1 / b_small − 1 / b_big)

**Smoothing.** One step's estimates are very noisy (either can be negative). :class:`NoiseScaleEMA` keeps an
exponential moving average of each with Adam's bias correction (divide by one minus the product of the decays),
so the first measurement is used as is. Its memory is counted in samples, as AdaptDL's is: a measurement over
``s`` times as many samples as the first one (``big_batch``) decays the averages by ``β^s``, so after a switch to a
larger batch the averages follow the new measurements within as many samples as before, not as many steps.
The noise scale is the ratio of the two averages, never the average of ratios (a ratio of noisy terms is biased):

    B_noise = tr(Σ) / |G|²

Bounds: ``B_noise ≥ 0``; it is ``inf`` while the smoothed ``|G|²`` is not positive (the gradient is all noise, so
every batch size is equally efficient) and ``0`` while the smoothed ``tr(Σ)`` is not positive.

Consecutive steps are measured at different parameters, so they add the change of ``G`` between the steps to the
variance (small for small learning rates); the other sources are unbiased.

Example:
    >>> stats = estimate_gradient_stats(GradientNormSample(small_sqr=3.0, small_batch=1, big_sqr=1.5, big_batch=4))
    >>> stats.grad_sqr, stats.grad_var, stats.noise_scale
    (1.0, 2.0, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["GradientNormSample", "GradientStats", "NoiseScaleEMA", "estimate_gradient_stats"]


@dataclass(frozen=True)
class GradientNormSample:
    """Squared gradient norms measured in one step at two batch sizes.

    Attributes:
        small_sqr: mean over the ``n`` measured gradients of their squared norm, ``mean_i |g_i|²``.
        small_batch: samples per measured gradient (the harmonic mean when they differ).
        big_sqr: squared norm of their equal-weight average, ``|ḡ|²``.
        big_batch: samples in the average, ``n · small_batch``.
    """

    small_sqr: float
    small_batch: float
    big_sqr: float
    big_batch: float

    def __post_init__(self) -> None:
        if not (self.small_batch > 0 and self.big_batch > self.small_batch):
            raise ValueError(
                f"A gradient-norm sample needs 0 < small_batch < big_batch, got small_batch={self.small_batch!r}, "
                f"big_batch={self.big_batch!r}. Measure at least two gradients (ranks, micro-batches or steps)."
            )


@dataclass(frozen=True)
class GradientStats:
    """Estimates of the squared true-gradient norm ``|G|²`` and the per-sample gradient variance ``tr(Σ)``."""

    grad_sqr: float
    grad_var: float
    #: Samples the estimates were measured over (``big_batch``); ``None`` for smoothed or other estimates.
    batch_size: float | None = None

    @property
    def noise_scale(self) -> float:
        """``B_noise = tr(Σ) / |G|²``, clamped to ``[0, inf]`` (``inf`` while ``|G|² ≤ 0``)."""
        if self.grad_sqr <= 0.0:
            return math.inf
        return max(self.grad_var, 0.0) / self.grad_sqr


def estimate_gradient_stats(sample: GradientNormSample) -> GradientStats:
    """The unbiased estimates of ``|G|²`` and ``tr(Σ)`` from one :class:`GradientNormSample`."""
    b, big = sample.small_batch, sample.big_batch
    grad_sqr = (big * sample.big_sqr - b * sample.small_sqr) / (big - b)
    grad_var = (sample.small_sqr - sample.big_sqr) / (1.0 / b - 1.0 / big)
    return GradientStats(grad_sqr=grad_sqr, grad_var=grad_var, batch_size=big)


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of ``|G|²`` and ``tr(Σ)``; their ratio is the noise scale.

    Args:
        smoothing: decay ``β`` per measurement at the batch size of the first one, in ``[0, 1)``; about
            ``2 / (1 − β)`` such measurements count. A measurement over ``s`` times as many samples decays by ``β^s``.
    """

    def __init__(self, smoothing: float = 0.99) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1), got smoothing={smoothing!r}. Try 0.99.")
        self.smoothing = smoothing
        self._sqr = 0.0
        self._var = 0.0
        self._weight = 0.0  # 1 − ∏ β: the bias correction
        self.count = 0
        self._reference: float | None = None  # the first measurement's batch size: its decay is `smoothing`

    def update(self, stats: GradientStats) -> None:
        """Fold one step's estimates into the averages (non-finite estimates are skipped)."""
        if not (math.isfinite(stats.grad_sqr) and math.isfinite(stats.grad_var)):
            return
        beta = self.smoothing
        if stats.batch_size is not None and stats.batch_size > 0:
            if self._reference is None:
                self._reference = stats.batch_size
            beta **= stats.batch_size / self._reference
        self._sqr = beta * self._sqr + (1.0 - beta) * stats.grad_sqr
        self._var = beta * self._var + (1.0 - beta) * stats.grad_var
        self._weight = beta * self._weight + (1.0 - beta)
        self.count += 1

    def reset(self) -> None:
        """Forget every measurement (when their source changes from a biased one to an unbiased one, or back)."""
        self._sqr = self._var = self._weight = 0.0
        self.count = 0
        self._reference = None

    @property
    def stats(self) -> GradientStats | None:
        """The smoothed estimates, or ``None`` before the first measurement."""
        if self.count == 0:
            return None
        return GradientStats(grad_sqr=self._sqr / self._weight, grad_var=self._var / self._weight)

    @property
    def noise_scale(self) -> float | None:
        """``tr(Σ) / |G|²`` of the smoothed estimates (see :attr:`GradientStats.noise_scale`), or ``None``."""
        stats = self.stats
        return None if stats is None else stats.noise_scale

    def state_dict(self) -> dict[str, Any]:
        """The averages, for checkpoints."""
        return {
            "sqr": self._sqr,
            "var": self._var,
            "weight": self._weight,
            "count": self.count,
            "reference": self._reference,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s averages (the decay stays the one given to the constructor)."""
        self._sqr = float(state["sqr"])
        self._var = float(state["var"])
        self._weight = float(state["weight"])
        self.count = int(state["count"])
        reference = state.get("reference")  # absent from checkpoints before the memory was counted in samples
        self._reference = None if reference is None else float(reference)
