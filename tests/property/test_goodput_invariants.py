"""Invariants of the goodput optimiser over random step-time models and limits (Hypothesis)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.adaptive.goodput import StepTimeModel, adascale_gain, best_batch_size, efficiency

models = st.builds(
    StepTimeModel,
    alpha=st.floats(1e-5, 1e-1),
    beta=st.floats(1e-8, 1e-3),
    gamma=st.floats(0.0, 1e-1),
)
noise_scales = st.one_of(st.floats(0.0, 1e6), st.just(math.inf))


@st.composite
def limits(draw: st.DrawFn) -> dict[str, int]:
    """Limits that some configuration satisfies: one ``(m, K)`` is drawn first and the batch range put around it."""
    replicas = draw(st.integers(1, 4))
    max_micro = draw(st.integers(1, 512))
    feasible = replicas * draw(st.integers(1, max_micro)) * draw(st.integers(1, 8))
    return {
        "replicas": replicas,
        "base_batch_size": draw(st.integers(1, 256)),
        "min_batch_size": draw(st.integers(1, feasible)),
        "max_batch_size": draw(st.integers(feasible, 4 * feasible)),
        "max_micro_batch_size": max_micro,
        "max_accumulation": 8,
    }


@given(models, noise_scales, limits())
def test_choice_respects_every_limit(model: StepTimeModel, noise_scale: float, limit: dict[str, int]) -> None:
    best = best_batch_size(model, noise_scale, **limit)
    assert limit["min_batch_size"] <= best.batch_size <= limit["max_batch_size"]
    assert 1 <= best.micro_batch_size <= limit["max_micro_batch_size"]
    assert 1 <= best.accumulation <= limit["max_accumulation"]
    assert best.batch_size == limit["replicas"] * best.micro_batch_size * best.accumulation


@given(models, limits(), st.floats(0.0, 1e5), st.floats(1.0, 100.0))
def test_chosen_batch_never_shrinks_as_the_noise_scale_grows(
    model: StepTimeModel, limit: dict[str, int], noise_scale: float, factor: float
) -> None:
    low = best_batch_size(model, noise_scale, **limit)
    high = best_batch_size(model, noise_scale * factor + 1e-3, **limit)
    assert high.batch_size >= low.batch_size


@given(models, noise_scales, limits())
def test_choice_beats_every_valid_configuration(
    model: StepTimeModel, noise_scale: float, limit: dict[str, int]
) -> None:
    best = best_batch_size(model, noise_scale, **limit)
    replicas = limit["replicas"]
    for m in range(1, limit["max_micro_batch_size"] + 1, 7):
        for k in range(1, limit["max_accumulation"] + 1):
            total = replicas * m * k
            if limit["min_batch_size"] <= total <= limit["max_batch_size"]:
                eff = efficiency(total, noise_scale, limit["base_batch_size"])
                other = float(model.throughput(m, k, replicas) * eff)
                assert other <= best.goodput * (1 + 1e-12)


@given(st.floats(1.0, 1e3), st.floats(0.0, 1e6), st.integers(1, 1024))
def test_gain_is_between_one_and_the_scale(scale: float, noise_scale: float, base: int) -> None:
    gain = float(adascale_gain(scale, noise_scale, base))
    assert 1.0 - 1e-9 <= gain <= scale * (1 + 1e-9)


@given(st.floats(0.0, 1e6), st.integers(1, 512))
def test_efficiency_is_monotone(noise_scale: float, base: int) -> None:
    sizes = np.arange(base, base + 2048, 17)
    eff = efficiency(sizes, noise_scale, base)
    assert eff[0] == 1.0
    assert np.all(np.diff(eff) <= 0)
    assert np.all(eff > 0)
