"""The noise-scale estimators: exact algebra, and the estimate against full-dataset per-sample gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.adaptive.noise_scale import (
    GradientNormSample,
    GradientStats,
    NoiseScaleEMA,
    estimate_gradient_stats,
)
from lightning_patterns.testing.gradient_noise import LinearRegressionNoise

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@given(grad_sqr=positive, grad_var=positive, small=st.integers(1, 512), factor=st.integers(2, 64))
def test_estimators_invert_the_expected_norms(grad_sqr: float, grad_var: float, small: int, factor: int) -> None:
    """With E|g_b|² = |G|² + tr(Σ)/b plugged in exactly, the estimators return |G|² and tr(Σ)."""
    big = small * factor
    sample = GradientNormSample(grad_sqr + grad_var / small, small, grad_sqr + grad_var / big, big)
    stats = estimate_gradient_stats(sample)
    assert stats.grad_sqr == pytest.approx(grad_sqr, rel=1e-6, abs=1e-9 * grad_var)
    assert stats.grad_var == pytest.approx(grad_var, rel=1e-6)
    assert stats.noise_scale == pytest.approx(grad_var / grad_sqr, rel=1e-4)


def test_noise_scale_bounds() -> None:
    assert GradientStats(grad_sqr=-1.0, grad_var=5.0).noise_scale == math.inf
    assert GradientStats(grad_sqr=0.0, grad_var=5.0).noise_scale == math.inf
    assert GradientStats(grad_sqr=2.0, grad_var=-1.0).noise_scale == 0.0
    assert GradientStats(grad_sqr=2.0, grad_var=5.0).noise_scale == 2.5


def _estimate_from_batches(problem: LinearRegressionNoise, batch: int, steps: int, smoothing: float) -> NoiseScaleEMA:
    """Two independent batches per step (two "ranks"), their norms and their average's, into the EMA."""
    generator = torch.Generator().manual_seed(1)
    ema = NoiseScaleEMA(smoothing)
    for _ in range(steps):
        indices = torch.randperm(problem.num_samples, generator=generator)[: 2 * batch]
        first, second = problem.batch_gradient(indices[:batch]), problem.batch_gradient(indices[batch:])
        mean = (first + second) / 2
        small_sqr = float((first @ first + second @ second) / 2)
        ema.update(estimate_gradient_stats(GradientNormSample(small_sqr, batch, float(mean @ mean), 2 * batch)))
    return ema


def test_estimate_matches_full_dataset_per_sample_gradients_within_15_percent() -> None:
    """Issue 15's check: linear regression with known noise, exact |G|² and tr(Σ) from every per-sample gradient."""
    problem = LinearRegressionNoise(num_samples=4096, dim=8, noise=1.0, offset=0.5, seed=0)
    exact = problem.exact()
    assert 5 < exact.noise_scale < 50  # a regime where batches of 16 see both terms
    stats = _estimate_from_batches(problem, batch=16, steps=3000, smoothing=0.999).stats
    assert stats is not None
    assert stats.grad_sqr == pytest.approx(exact.grad_sqr, rel=0.15)
    assert stats.grad_var == pytest.approx(exact.grad_var, rel=0.15)
    assert stats.noise_scale == pytest.approx(exact.noise_scale, rel=0.15)


def test_exact_values_agree_with_the_closed_form() -> None:
    """E over x, ε: |G|² = |w − w*|², tr(Σ) = (d + 1)|w − w*|² + dσ² (a check of the reference itself)."""
    problem = LinearRegressionNoise(num_samples=200_000, dim=4, noise=2.0, offset=1.0, seed=3)
    x, y, w = (t.double() for t in (problem.inputs, problem.targets, problem.weights))
    exact = problem.exact()
    # The empirical G of the finite dataset is close to w − w* (up to sampling error of the dataset).
    delta_sqr = exact.grad_sqr
    assert exact.grad_var == pytest.approx((problem.dim + 1) * delta_sqr + problem.dim * problem.noise**2, rel=0.03)
    assert float(((x @ w - y)[:, None] * x).mean(0).norm() ** 2) == pytest.approx(delta_sqr, rel=1e-3)


def test_ema_bias_correction_and_checkpoint_round_trip() -> None:
    ema = NoiseScaleEMA(smoothing=0.9)
    assert ema.stats is None
    assert ema.noise_scale is None
    ema.update(GradientStats(grad_sqr=2.0, grad_var=10.0))
    assert ema.stats == GradientStats(grad_sqr=pytest.approx(2.0), grad_var=pytest.approx(10.0))  # type: ignore[arg-type]
    ema.update(GradientStats(grad_sqr=4.0, grad_var=10.0))
    # weights 0.1·0.9 and 0.1, normalised by 1 − 0.9²: (0.09·2 + 0.1·4) / 0.19
    assert ema.stats is not None
    assert ema.stats.grad_sqr == pytest.approx((0.09 * 2 + 0.1 * 4) / 0.19)
    ema.update(GradientStats(grad_sqr=math.nan, grad_var=1.0))  # skipped
    assert ema.count == 2
    restored = NoiseScaleEMA(smoothing=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.stats == ema.stats
    assert restored.count == 2
    restored.reset()
    assert restored.stats is None


def test_ema_memory_is_counted_in_samples() -> None:
    """A measurement over twice the first one's samples weighs as two at the first's batch size (AdaptDL's β^s)."""
    by_samples, by_steps = NoiseScaleEMA(smoothing=0.9), NoiseScaleEMA(smoothing=0.9)
    by_samples.update(GradientStats(grad_sqr=1.0, grad_var=10.0, batch_size=32))
    by_samples.update(GradientStats(grad_sqr=3.0, grad_var=30.0, batch_size=64))
    by_steps.update(GradientStats(grad_sqr=1.0, grad_var=10.0, batch_size=32))
    for _ in range(2):
        by_steps.update(GradientStats(grad_sqr=3.0, grad_var=30.0, batch_size=32))
    assert by_samples.stats is not None
    assert by_steps.stats is not None
    assert by_samples.stats.grad_sqr == pytest.approx(by_steps.stats.grad_sqr)
    assert by_samples.stats.grad_var == pytest.approx(by_steps.stats.grad_var)
    assert by_samples.stats.grad_sqr == pytest.approx((0.81 * 0.1 * 1.0 + 0.19 * 3.0) / (1 - 0.81 * 0.9))
    # The reference batch size is part of the state; a checkpoint without it takes the next measurement's.
    restored = NoiseScaleEMA(smoothing=0.9)
    restored.load_state_dict(by_samples.state_dict())
    restored.update(GradientStats(grad_sqr=3.0, grad_var=30.0, batch_size=64))
    by_samples.update(GradientStats(grad_sqr=3.0, grad_var=30.0, batch_size=64))
    assert restored.stats == by_samples.stats
    old = {key: value for key, value in by_samples.state_dict().items() if key != "reference"}
    restored.load_state_dict(old)
    restored.update(GradientStats(grad_sqr=3.0, grad_var=30.0, batch_size=64))  # now the reference: decay 0.9
    assert restored._weight == pytest.approx(0.9 * by_samples._weight + 0.1)
    # Estimates from two norms carry the samples they were measured over.
    assert estimate_gradient_stats(GradientNormSample(3.0, 16, 1.5, 64)).batch_size == 64


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NoiseScaleEMA(smoothing=1.0), "`smoothing` must be in [0, 1)"),
        (lambda: NoiseScaleEMA(smoothing=-0.1), "`smoothing` must be in [0, 1)"),
        (lambda: GradientNormSample(1.0, 16, 1.0, 16), "0 < small_batch < big_batch"),
        (lambda: GradientNormSample(1.0, 0, 1.0, 16), "0 < small_batch < big_batch"),
    ],
)
def test_invalid_arguments(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build()  # type: ignore[operator]
