"""Goodput: the step-time fit, efficiency, AdaScale's gain, and the optimiser on models with a known optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_patterns.adaptive.goodput import (
    StepTimeModel,
    StepTimes,
    adascale_gain,
    best_batch_size,
    efficiency,
    fit_step_time,
)


def test_efficiency_is_one_at_the_base_batch_and_falls_with_the_batch() -> None:
    sizes = np.array([32, 64, 128, 1024])
    eff = efficiency(sizes, noise_scale=100.0, base_batch_size=32)
    assert eff[0] == pytest.approx(1.0)
    assert np.all(np.diff(eff) < 0)
    assert eff[-1] == pytest.approx((100 + 32) / (100 + 1024))
    assert np.all(efficiency(sizes, noise_scale=math.inf, base_batch_size=32) == 1.0)


def test_adascale_gain_between_one_and_the_scale_and_equal_to_its_two_forms() -> None:
    grad_sqr, grad_var, base = 2.0, 300.0, 32
    noise_scale = grad_var / grad_sqr
    for scale in (1.0, 2.0, 8.0, 32.0):
        gain = float(adascale_gain(scale, noise_scale, base))
        sigma2 = grad_var / base  # the variance of a base-batch gradient
        assert gain == pytest.approx((sigma2 + grad_sqr) / (sigma2 / scale + grad_sqr))
        assert 1.0 <= gain <= scale + 1e-12
    assert float(adascale_gain(1.0, noise_scale, base)) == pytest.approx(1.0)
    assert float(adascale_gain(8.0, math.inf, base)) == 8.0
    assert float(adascale_gain(8.0, 0.0, base)) == pytest.approx(1.0)


def test_fit_recovers_the_model_from_exact_times() -> None:
    truth = StepTimeModel(alpha=2e-3, beta=5e-5, gamma=4e-3)
    micro = [16, 64, 256, 64, 16]
    accumulation = [1, 1, 1, 4, 2]
    seconds = [float(truth.step_time(m, k)) for m, k in zip(micro, accumulation, strict=True)]
    fitted = fit_step_time(micro, accumulation, seconds, prior_weight=1e-6)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=1e-3)
    assert fitted.beta == pytest.approx(truth.beta, rel=1e-3)
    assert fitted.gamma == pytest.approx(truth.gamma, rel=1e-3)


def test_fit_with_one_configuration_reproduces_it_and_is_optimistic_about_larger_batches() -> None:
    fitted = fit_step_time([32], [1], [0.010], weights=[50])
    assert float(fitted.step_time(32, 1)) == pytest.approx(0.010, rel=1e-3)
    assert fitted.gamma == pytest.approx(0.0, abs=1e-6)
    assert fitted.alpha == pytest.approx(0.005, rel=1e-2)  # the prior: half of a micro-step fixed
    assert float(fitted.throughput(64, 1)) > float(fitted.throughput(32, 1))


def test_fit_keeps_coefficients_nonnegative() -> None:
    # Times that fall with the batch would need beta < 0: the fit clamps it to 0 instead.
    fitted = fit_step_time([16, 32, 64], [1, 1, 1], [0.03, 0.02, 0.01])
    assert min(fitted.alpha, fitted.beta, fitted.gamma) >= 0.0


def test_known_optimum_of_a_synthetic_model() -> None:
    """R = K = 1, γ = 0: goodput ∝ m / ((α + β m)(B + m)) peaks at m* = sqrt(α B / β)."""
    alpha, beta = 1.0, 0.01
    for noise_scale in (100.0, 400.0, 2500.0):
        best = best_batch_size(StepTimeModel(alpha, beta, 0.0), noise_scale, base_batch_size=1, max_batch_size=5000)
        optimum = math.sqrt(alpha * noise_scale / beta)
        assert abs(best.micro_batch_size - optimum) <= 1, (noise_scale, best)
        assert best.accumulation == 1


def test_goodput_of_the_choice_is_throughput_times_efficiency() -> None:
    model = StepTimeModel(alpha=1e-3, beta=1e-5, gamma=2e-3)
    best = best_batch_size(model, 500.0, base_batch_size=64, max_batch_size=2048, max_accumulation=4, replicas=2)
    assert best.batch_size == 2 * best.micro_batch_size * best.accumulation
    assert best.throughput == pytest.approx(float(model.throughput(best.micro_batch_size, best.accumulation, 2)))
    assert best.efficiency == pytest.approx(float(efficiency(best.batch_size, 500.0, 64)))
    assert best.goodput == pytest.approx(best.throughput * best.efficiency)


def test_memory_limit_turns_a_large_batch_into_accumulation() -> None:
    """The optimum is far above what fits: the optimiser reaches it with micro-batches of at most the limit."""
    model = StepTimeModel(alpha=1.0, beta=0.01, gamma=5.0)
    free = best_batch_size(model, 10_000.0, base_batch_size=32, max_batch_size=4096, max_accumulation=8)
    limited = best_batch_size(
        model, 10_000.0, base_batch_size=32, max_batch_size=4096, max_micro_batch_size=64, max_accumulation=8
    )
    assert free.micro_batch_size > 64
    assert limited.micro_batch_size <= 64
    assert limited.accumulation > 1
    assert limited.goodput <= free.goodput


def test_extreme_noise_scales_pick_the_ends() -> None:
    model = StepTimeModel(alpha=1e-3, beta=1e-5, gamma=0.0)
    assert best_batch_size(model, math.inf, base_batch_size=32, max_batch_size=1024).batch_size == 1024
    tiny = best_batch_size(model, 1e-9, base_batch_size=32, max_batch_size=1024, min_batch_size=32)
    assert tiny.batch_size == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_batch_size": 0}, "`base_batch_size` must be at least 1"),
        ({"max_accumulation": 0}, "`max_accumulation` must be at least 1"),
        ({"min_accumulation": 0}, "`min_accumulation` must be at least 1"),
        ({"replicas": 0}, "`replicas` must be at least 1"),
        ({"noise_scale": -1.0}, "`noise_scale` must be >= 0"),
        ({"min_batch_size": 100, "max_batch_size": 50}, "No batch size fits"),
        ({"min_accumulation": 3, "max_accumulation": 2}, "No batch size fits"),
    ],
)
def test_invalid_optimiser_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "model": StepTimeModel(1e-3, 1e-5, 0.0),
        "noise_scale": 10.0,
        "base_batch_size": 32,
        "max_batch_size": 256,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        best_batch_size(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], [], []), "of one length >= 1"),
        (([32], [1, 2], [0.1]), "of one length >= 1"),
        (([0], [1], [0.1]), "micro_batch_size >= 1"),
        (([32], [1], [0.0]), "seconds > 0"),
    ],
)
def test_invalid_fit_arguments(args: tuple[list[float], list[float], list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_step_time(*args)


def test_step_times_fit_the_medians_so_slow_steps_do_not_move_the_model() -> None:
    """A few slow steps (another job, a collection) leave the fit at the typical step; a mean would not."""
    true = StepTimeModel(alpha=2e-3, beta=5e-6, gamma=4e-4)
    times = StepTimes(window=50)
    for m in (16, 128):
        typical = float(true.step_time(m, 2))
        for step in range(50):
            times.add(m, 2, typical * (20.0 if step % 10 == 0 else 1.0))  # every tenth step 20x slower
    model = times.model()
    assert model is not None
    for m in (16, 128, 512):
        assert float(model.step_time(m, 2)) == pytest.approx(float(true.step_time(m, 2)), rel=0.02)  # prior: α vs γ
    means = fit_step_time([16, 128], [2, 2], [float(true.step_time(m, 2)) * 2.9 for m in (16, 128)])
    assert float(means.step_time(512, 2)) > 2 * float(true.step_time(512, 2))  # what the old means gave


def test_step_times_keep_the_recent_window_and_round_trip_checkpoints() -> None:
    times = StepTimes(window=3)
    assert times.model() is None
    for seconds in (9.0, 1.0, 2.0, 3.0):
        times.add(32, 1, seconds)
    assert times.summary() == [(32, 1, 2.0, 3)]  # 9.0 dropped: only the 3 most recent count
    restored = StepTimes(window=3)
    restored.load_state_dict(times.state_dict())
    assert restored.summary() == times.summary()
    restored.load_state_dict([[32, 1, 10.0, 4]])  # a checkpoint of the older format: seconds summed, steps
    assert restored.summary() == [(32, 1, 2.5, 1)]
    with pytest.raises(ValueError, match="`window` must be at least 1"):
        StepTimes(window=0)


def test_no_more_accumulation_than_memory_or_the_measurement_needs() -> None:
    """A micro-batch that fits is never split: K = 1 (DDP), or exactly the 2 one process measures from."""
    model = StepTimeModel(alpha=2e-3, beta=1.6e-5, gamma=4e-4)  # the demo model on the 2-core CPU
    for noise_scale in (30.0, 500.0, 5000.0):
        for replicas, least in ((2, 1), (1, 2)):
            best = best_batch_size(
                model, noise_scale, 32, 1024, max_accumulation=4, replicas=replicas, min_accumulation=least
            )
            assert best.accumulation == least, (noise_scale, replicas, best)
    # Only a memory limit below the optimum makes more micro-batches worth it (they amortise γ).
    limited = best_batch_size(model, math.inf, 32, 1024, max_micro_batch_size=100, max_accumulation=4)
    assert (limited.micro_batch_size, limited.accumulation) == (100, 4)


def test_with_fixed_costs_dominant_the_pick_is_the_largest_batch_still_efficient_enough() -> None:
    """β → 0: throughput ∝ M, so goodput ∝ M·E(M) grows with M and the optimiser takes the largest batch allowed;
    with a per-sample cost the optimum falls back to sqrt(α·B/β), where E is still (B + M₀)/(B + m*)."""
    overhead_only = StepTimeModel(alpha=2e-3, beta=0.0, gamma=0.0)
    for noise_scale in (10.0, 100.0, 1000.0):
        assert best_batch_size(overhead_only, noise_scale, 32, 1024).batch_size == 1024
    model = StepTimeModel(alpha=2e-3, beta=1.6e-5, gamma=0.0)
    best = best_batch_size(model, 100.0, 32, 1024)
    assert abs(best.batch_size - math.sqrt(2e-3 * 100.0 / 1.6e-5)) <= 1  # 112
    assert best.efficiency == pytest.approx((100 + 32) / (100 + best.batch_size))
