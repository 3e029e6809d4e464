"""Goodput (Pollux, OSDI'21): system throughput × statistical efficiency, and the batch size that maximises it.

Notation: ``R`` replicas (DDP ranks or parameter-server workers), each computing ``K`` micro-batches of ``m``
samples per optimizer step (gradient accumulation), so one step uses the global batch ``M = R · m · K``. ``M₀`` is
the base batch size, the one the learning rate was tuned for, and ``B`` the gradient noise scale
(:mod:`lightning_patterns.adaptive.noise_scale`).

**Throughput.** A step's time is modelled as compute linear in the micro-batch, once per micro-batch, plus a fixed
cost per step (the optimizer update and the gradient synchronisation, which accumulation amortises)::

    T(m, K) = K · (α + β · m) + γ          throughput(m, K) = R · m · K / T(m, K)   samples per second

:func:`fit_step_time` fits ``α, β, γ ≥ 0`` to measured step times by least squares on relative errors (each
configuration weighted by its number of measurements). :class:`StepTimes` keeps what it is fitted to: per
configuration the median of its most recent step times, so a few slow steps (a garbage collection, another job on
the machine, the first step at a new batch size) do not move the model the way a mean would. While the
measurements cannot tell the terms apart (one micro-batch size only, or one accumulation only) a weak prior fills
in the rest: ``γ = 0`` and half of a micro-step's time fixed (``α = β · m``, as AdaptDL assumes). The optimiser then
tries a larger batch, measures it, and the fit rests on data. (The prior is optimistic about larger batches when
compute dominates the step; when fixed costs dominate, as for a small model on a CPU, where ``α`` is hundreds of
``β``, it undervalues them until that second size is measured.)

**Statistical efficiency.** Relative to ``M₀``, a step with batch ``M`` makes the progress of
``E(M) = (B + M₀) / (B + M)`` samples per sample (``1`` at ``M = M₀``, decreasing in ``M``, ``1`` everywhere when
``B = ∞``): :func:`efficiency`.

**Goodput** ``= throughput(m, K) · E(R · m · K)``, in base-batch-equivalent samples per second. :func:`best_batch_size`
evaluates every ``1 ≤ m ≤ max_micro_batch_size`` (the memory limit) and ``min_accumulation ≤ K ≤ max_accumulation``
whose ``M`` lies in ``[min_batch_size, max_batch_size]`` and returns the argmax (ties: the larger ``M``, then the
smaller ``K``).
Bounds: the result always satisfies those limits; its ``M`` is non-decreasing in ``B`` (``log E`` has increasing
differences in ``(M, B)``); with ``B = ∞`` it is the throughput-maximising configuration. For ``R = K = 1`` and
``γ = 0`` the optimum is ``m* = sqrt(α · B / β)`` (set the derivative of ``m / ((α + β m)(B + m))`` to zero).

**AdaScale.** Training at ``M = S · M₀`` multiplies the learning rate by the gain (:func:`adascale_gain`)::

    gain(S) = (σ² + μ²) / (σ² / S + μ²)   with σ² = tr(Σ) / M₀, μ² = |G|²
            = S · (B + M₀) / (B + S · M₀) = S · E(S · M₀)        1 ≤ gain(S) ≤ S

and one such step counts as ``gain(S)`` base-batch steps of *scale-invariant progress*, the clock learning-rate
schedules follow.

Example:
    >>> model = StepTimeModel(alpha=1.0, beta=0.01, gamma=0.0)
    >>> best_batch_size(model, noise_scale=400.0, base_batch_size=32, max_batch_size=1000).micro_batch_size
    200
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BatchConfig",
    "StepTimeModel",
    "StepTimes",
    "adascale_gain",
    "best_batch_size",
    "efficiency",
    "fit_step_time",
]

_FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per optimizer step: ``T(m, K) = K · (alpha + beta · m) + gamma``.

    Attributes:
        alpha: fixed seconds per micro-batch (kernel launches, Python, loading a batch).
        beta: seconds per sample of a micro-batch.
        gamma: fixed seconds per optimizer step (the update, the gradient synchronisation).
    """

    alpha: float
    beta: float
    gamma: float

    def step_time(self, micro_batch_size: npt.ArrayLike, accumulation: npt.ArrayLike = 1) -> _FloatArray:
        """``T(m, K)`` in seconds (broadcasts over arrays)."""
        m = np.asarray(micro_batch_size, dtype=np.float64)
        k = np.asarray(accumulation, dtype=np.float64)
        return k * (self.alpha + self.beta * m) + self.gamma

    def throughput(
        self, micro_batch_size: npt.ArrayLike, accumulation: npt.ArrayLike = 1, replicas: int = 1
    ) -> _FloatArray:
        """Samples per second, ``R · m · K / T(m, K)``."""
        m = np.asarray(micro_batch_size, dtype=np.float64)
        k = np.asarray(accumulation, dtype=np.float64)
        return replicas * m * k / self.step_time(m, k)


@dataclass(frozen=True)
class BatchConfig:
    """A configuration the optimiser chose, with what the models predict for it.

    Attributes:
        micro_batch_size: samples per micro-batch per replica, ``m``.
        accumulation: micro-batches per optimizer step, ``K``.
        batch_size: the global batch ``M = R · m · K``.
        throughput: predicted samples per second.
        efficiency: ``E(M)``.
        goodput: ``throughput · efficiency``.
    """

    micro_batch_size: int
    accumulation: int
    batch_size: int
    throughput: float
    efficiency: float
    goodput: float


def efficiency(batch_size: npt.ArrayLike, noise_scale: float, base_batch_size: float) -> _FloatArray:
    """Statistical efficiency ``E(M) = (B + M₀) / (B + M)`` (``1`` when ``B`` is infinite)."""
    m = np.asarray(batch_size, dtype=np.float64)
    if math.isinf(noise_scale):
        return np.ones_like(m)
    return (noise_scale + base_batch_size) / (noise_scale + m)


def adascale_gain(scale: npt.ArrayLike, noise_scale: float, base_batch_size: float) -> _FloatArray:
    """AdaScale's gain ``S · (B + M₀) / (B + S · M₀)`` for a batch ``S`` times the base one (``S`` when ``B = ∞``)."""
    s = np.asarray(scale, dtype=np.float64)
    return s * efficiency(s * base_batch_size, noise_scale, base_batch_size)


class StepTimes:
    """Measured seconds per optimizer step, per configuration ``(m, K)``: the most recent ``window`` of each.

    Args:
        window: step times kept per configuration (older ones are dropped, so the model follows slow drifts).

    Example:
        >>> times = StepTimes(window=4)
        >>> for seconds in (0.010, 0.011, 0.250, 0.012, 0.010):  # one slow step
        ...     times.add(64, 1, seconds)
        >>> times.summary()  # (m, K, median seconds, steps kept)
        [(64, 1, 0.0115, 4)]
    """

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValueError(f"`window` must be at least 1, got window={window!r}.")
        self.window = window
        self._times: dict[tuple[int, int], list[float]] = {}

    def __len__(self) -> int:
        return len(self._times)

    def add(self, micro_batch_size: int, accumulation: int, seconds: float) -> None:
        """Note one step of ``seconds`` at ``(micro_batch_size, accumulation)``."""
        times = self._times.setdefault((int(micro_batch_size), int(accumulation)), [])
        times.append(float(seconds))
        del times[: -self.window]

    def summary(self) -> list[tuple[int, int, float, int]]:
        """``(m, K, median seconds, steps kept)`` per configuration, sorted by ``(m, K)``."""
        return [(m, k, float(np.median(times)), len(times)) for (m, k), times in sorted(self._times.items())]

    def model(self) -> StepTimeModel | None:
        """:func:`fit_step_time` over the medians, weighted by the steps kept (``None`` before any step)."""
        rows = self.summary()
        if not rows:
            return None
        m, k, seconds, steps = zip(*rows, strict=True)
        return fit_step_time(m, k, seconds, weights=steps)

    def state_dict(self) -> list[list[Any]]:
        """``[m, K, [seconds, ...]]`` per configuration, for checkpoints."""
        return [[m, k, list(times)] for (m, k), times in sorted(self._times.items())]

    def load_state_dict(self, state: list[list[Any]]) -> None:
        """Continue from :meth:`state_dict` (or from the older ``[m, K, seconds summed, steps]`` rows: their mean)."""
        self._times = {}
        for row in state:
            if len(row) == 3:
                m, k, times = row
                self._times[(int(m), int(k))] = [float(t) for t in times][-self.window :]
            else:
                m, k, total, steps = row
                self._times[(int(m), int(k))] = [float(total) / float(steps)]


def fit_step_time(
    micro_batch_size: Sequence[float],
    accumulation: Sequence[float],
    seconds: Sequence[float],
    weights: Sequence[float] | None = None,
    prior_weight: float = 1e-3,
) -> StepTimeModel:
    """Fit :class:`StepTimeModel` to measured step times (one entry per configuration, or per step).

    Args:
        micro_batch_size: ``m`` of each measurement.
        accumulation: ``K`` of each measurement.
        seconds: measured seconds per optimizer step.
        weights: how much each measurement counts (e.g. how many steps it averages); default 1 each.
        prior_weight: strength of the prior (``γ = 0``, ``α = β · m``) relative to all the data; it only decides
            what the data leave open.

    Returns:
        The fitted model, every coefficient ``≥ 0``.
    """
    m = np.asarray(micro_batch_size, dtype=np.float64)
    k = np.asarray(accumulation, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (m.shape == k.shape == t.shape == w.shape and m.ndim == 1 and m.size >= 1):
        raise ValueError(
            "`micro_batch_size`, `accumulation`, `seconds` and `weights` must be 1-D and of one length >= 1, got "
            f"lengths {m.size}, {k.size}, {t.size}, {w.size}."
        )
    if not (np.all(m >= 1) and np.all(k >= 1) and np.all(t > 0) and np.all(w > 0) and prior_weight > 0):
        raise ValueError(
            "Step times need micro_batch_size >= 1, accumulation >= 1, seconds > 0, weights > 0 and "
            f"prior_weight > 0; got micro_batch_size={m.tolist()}, accumulation={k.tolist()}, "
            f"seconds={t.tolist()}, weights={w.tolist()}, prior_weight={prior_weight!r}."
        )
    # Relative errors: a 1 ms miss matters at 2 ms per step, not at 2 s.
    rows = np.sqrt(w)[:, None] / t[:, None] * np.stack([k, k * m, np.ones_like(k)], axis=1)
    targets = np.sqrt(w)
    # The prior, from the most measured configuration: its time per micro-batch split evenly into a fixed part and
    # a per-sample part, nothing per step.
    ref = int(np.argmax(w))
    per_micro = t[ref] / k[ref]
    prior = np.array([per_micro / 2, per_micro / (2 * m[ref]), 0.0])
    scale = np.array([per_micro, per_micro / m[ref], per_micro])
    strength = math.sqrt(prior_weight * float(w.sum()))
    rows = np.vstack([rows, np.diag(strength / scale)])
    targets = np.concatenate([targets, strength * prior / scale])
    alpha, beta, gamma = _nonnegative_least_squares(rows, targets)
    return StepTimeModel(alpha=alpha, beta=beta, gamma=gamma)


def _nonnegative_least_squares(a: _FloatArray, b: _FloatArray) -> tuple[float, float, float]:
    """``argmin |a x − b|`` over ``x ≥ 0`` for 3 unknowns, exactly.

    The minimum of a convex quadratic over the orthant is the unconstrained minimum over some set of free
    coordinates (the others zero), so trying all 8 sets and keeping the best feasible one finds it.
    """
    best: tuple[float, _FloatArray] | None = None
    for size in range(4):
        for free in itertools.combinations(range(3), size):
            x = np.zeros(3)
            if free:
                x[list(free)] = np.linalg.lstsq(a[:, list(free)], b, rcond=None)[0]
            if np.any(x < 0):
                continue
            cost = float(np.sum((a @ x - b) ** 2))
            if best is None or cost < best[0]:
                best = (cost, x)
    assert best is not None  # x = 0 is always feasible
    x = best[1]
    return float(x[0]), float(x[1]), float(x[2])


def best_batch_size(
    model: StepTimeModel,
    noise_scale: float,
    base_batch_size: int,
    max_batch_size: int,
    min_batch_size: int = 1,
    max_micro_batch_size: int | None = None,
    max_accumulation: int = 1,
    replicas: int = 1,
    min_accumulation: int = 1,
) -> BatchConfig:
    """The configuration ``(m, K)`` of highest goodput within the limits.

    Args:
        model: the fitted step-time model.
        noise_scale: the gradient noise scale ``B`` (``inf``: every batch size equally efficient).
        base_batch_size: ``M₀``, the global batch the learning rate was tuned for.
        max_batch_size: the largest global batch ``M`` to consider.
        min_batch_size: the smallest global batch ``M`` to consider.
        max_micro_batch_size: the largest micro-batch per replica that fits in memory (default: no limit below
            ``max_batch_size / replicas``).
        max_accumulation: the most micro-batches per step.
        replicas: ``R``.
        min_accumulation: the fewest micro-batches per step. One process measures the noise scale without bias
            only from ``K ≥ 2`` micro-batches (consecutive steps add the parameters' motion), so it asks for 2.

    Raises:
        ValueError: when no configuration satisfies the limits.
    """
    if replicas < 1:
        raise ValueError(f"`replicas` must be at least 1, got replicas={replicas!r}.")
    if max_micro_batch_size is None:
        max_micro_batch_size = max(max_batch_size // replicas, 1)
    for name, value in (
        ("base_batch_size", base_batch_size),
        ("min_batch_size", min_batch_size),
        ("max_micro_batch_size", max_micro_batch_size),
        ("max_accumulation", max_accumulation),
        ("min_accumulation", min_accumulation),
    ):
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1, got {name}={value!r}.")
    if noise_scale < 0 or math.isnan(noise_scale):
        raise ValueError(f"`noise_scale` must be >= 0, got noise_scale={noise_scale!r}.")
    micro = np.arange(1, max_micro_batch_size + 1, dtype=np.int64)
    accumulation = np.arange(1, max_accumulation + 1, dtype=np.int64)
    m, k = (grid.reshape(-1) for grid in np.meshgrid(micro, accumulation, indexing="ij"))
    total = replicas * m * k
    valid = (total >= min_batch_size) & (total <= max_batch_size)
    valid &= k >= min_accumulation
    if not valid.any():
        raise ValueError(
            f"No batch size fits: {min_batch_size=}, {max_batch_size=}, {max_micro_batch_size=}, "
            f"{min_accumulation=}, {max_accumulation=}, {replicas=} allow no R·m·K in "
            "[min_batch_size, max_batch_size]. Raise `max_batch_size`, `max_micro_batch_size` or `max_accumulation`, "
            "or lower `min_batch_size`."
        )
    m, k, total = m[valid], k[valid], total[valid]
    throughput = model.throughput(m, k, replicas)
    eff = efficiency(total, noise_scale, base_batch_size)
    goodput = throughput * eff
    # Ties go to the larger batch, then to fewer micro-batches: sort so the preferred comes first for argmax.
    order = np.lexsort((k, -total))
    best = order[int(np.argmax(goodput[order]))]
    return BatchConfig(
        micro_batch_size=int(m[best]),
        accumulation=int(k[best]),
        batch_size=int(total[best]),
        throughput=float(throughput[best]),
        efficiency=float(eff[best]),
        goodput=float(goodput[best]),
    )
