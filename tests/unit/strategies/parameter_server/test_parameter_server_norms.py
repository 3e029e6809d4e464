"""The gradient norms the servers measure per bucket, and the sample a worker forms from them."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_patterns.strategies.parameter_server.norms import BucketNorms, measure_bucket, norm_sample, total_norms


def _gradients(workers: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=generator) for _ in range(workers)]


def test_a_bucket_measures_each_workers_gradient_and_their_average_however_it_was_pushed() -> None:
    grads = _gradients(3, 50)
    average = sum(grads) / 3
    small = sum(float(g.double() @ g.double()) for g in grads)
    # The CPU divides by W before pushing; a GPU worker pushes its gradient as is and the server divides.
    divided = measure_bucket([g / 3 for g in grads], [True] * 3, average, [8, 8, 16])
    undivided = measure_bucket(grads, [False] * 3, average, [8, 8, 16])
    for norms in (divided, undivided):
        assert norms.small_sqr == pytest.approx(small, rel=1e-6)
        assert norms.big_sqr == pytest.approx(float(average.double() @ average.double()), rel=1e-12)
        assert norms.inverse_batch == pytest.approx((1 / 8 + 1 / 8 + 1 / 16) / 3)


def test_the_round_total_is_the_same_whatever_order_the_replies_arrived_in() -> None:
    buckets = {(s, b): BucketNorms(0.1 * (s + 1) + 1e-9 * b, 1.0 / (b + 3), 0.25) for s in range(2) for b in range(7)}
    arrived = dict(reversed(list(buckets.items())))
    total = total_norms(buckets, 14)
    assert total == total_norms(arrived, 14)  # exactly: every worker reports the same floats
    assert total is not None
    assert total.small_sqr == pytest.approx(sum(b.small_sqr for b in buckets.values()))
    assert total.inverse_batch == 0.25
    # A bucket not measured (or not arrived): no sample rather than a wrong one.
    assert total_norms({k: v for k, v in buckets.items() if k != (1, 3)}, 14) is None
    assert total_norms({**buckets, (0, 0): BucketNorms(1.0, 1.0, 0.0)}, 14) is None


def test_the_sample_is_unscaled_and_averaged_over_workers_at_the_harmonic_batch() -> None:
    grads = _gradients(2, 40, seed=1)
    scale = 2.0**12
    scaled = [g * scale for g in grads]  # what a GradScaler's backward leaves, and the workers push
    norms = measure_bucket([g / 2 for g in scaled], [True, True], (scaled[0] + scaled[1]) / 2, [8, 24])
    sample = norm_sample(norms, num_workers=2, inverse_scale=1 / scale)
    assert sample is not None
    assert sample.small_sqr == pytest.approx(sum(float(g @ g) for g in grads) / 2, rel=1e-6)
    average = (grads[0] + grads[1]) / 2
    assert sample.big_sqr == pytest.approx(float(average @ average), rel=1e-6)
    assert sample.small_batch == pytest.approx(12.0)  # 1 / mean(1/8, 1/24)
    assert sample.big_batch == pytest.approx(24.0)


def test_no_sample_with_one_worker_or_an_overflowed_gradient() -> None:
    assert norm_sample(BucketNorms(2.0, 1.0, 0.125), num_workers=1, inverse_scale=1.0) is None
    assert norm_sample(BucketNorms(math.inf, 1.0, 0.125), num_workers=2, inverse_scale=1.0) is None
    assert norm_sample(BucketNorms(2.0, math.nan, 0.125), num_workers=2, inverse_scale=1.0) is None
    assert norm_sample(BucketNorms(2.0, 1.0, 0.0), num_workers=2, inverse_scale=1.0) is None
