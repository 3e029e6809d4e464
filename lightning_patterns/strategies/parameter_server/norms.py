"""The two gradient norms of a synchronous round, measured where the servers sum the workers' pushes.

The gradient noise scale (:mod:`lightning_patterns.adaptive.noise_scale`) needs, each step, the mean over workers of
each worker's squared gradient norm and the squared norm of their average. Each server already holds every worker's
push of each of its buckets and sums them, so when the workers ask (``Push.samples > 0``) it also measures, per
bucket ``k`` (its chunks of the dense parameters), and puts the three floats in the bucket's reply header (``SUM`` or
``PARAMS``): no extra message, no extra round trip.

    small_k = Σ_w |g_w,k|²          (each worker's gradient as computed, before the division by W)
    big_k   = |(1/W) Σ_w g_w,k|²     (the averaged gradient, before unscaling and clipping)
    inverse_batch = (1/W) Σ_w 1/b_w  (the same in every reply)

A worker adds them up over all buckets of all servers, in (server, bucket) order so every worker gets the same
floats (:func:`total_norms`), and :func:`norm_sample` turns them into the protocol's sample:
``small_sqr = Σ_k small_k / W``, ``big_sqr = Σ_k big_k`` (both times ``1 / scale²`` under a ``GradScaler``,
whose scaled gradients are what travels), ``small_batch = 1 / inverse_batch`` (the harmonic mean of the workers'
batches) and ``big_batch = W · small_batch``.

Sparse tables (``sparse_modules``) travel on their own messages and are not part of the norms.

Example:
    >>> grads = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])]  # two workers, pushed divided by W = 2
    >>> pushed = [g / 2 for g in grads]
    >>> norms = measure_bucket(pushed, [True, True], pushed[0] + pushed[1], [4, 4])
    >>> norms
    BucketNorms(small_sqr=14.0, big_sqr=5.0, inverse_batch=0.25)
    >>> norm_sample(norms, num_workers=2, inverse_scale=1.0)
    GradientNormSample(small_sqr=7.0, small_batch=4.0, big_sqr=5.0, big_batch=8.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_patterns.adaptive.noise_scale import GradientNormSample

__all__ = ["BucketNorms", "measure_bucket", "norm_sample", "total_norms"]


@dataclass(frozen=True)
class BucketNorms:
    """What a server measured of one bucket of a round (or their sum over buckets).

    Attributes:
        small_sqr: the sum over workers of the squared norm of each worker's gradient (undivided).
        big_sqr: the squared norm of the workers' averaged gradient.
        inverse_batch: the mean over workers of ``1 / samples``; ``0`` means "not measured".
    """

    small_sqr: float
    big_sqr: float
    inverse_batch: float


def _squared_norm(tensor: torch.Tensor) -> float:
    wide = tensor.reshape(-1).to(torch.float64)  # float32 sums of squares lose digits over millions of elements
    return float(torch.dot(wide, wide))


def measure_bucket(
    pushed: Sequence[torch.Tensor], divided: Sequence[bool], average: torch.Tensor, samples: Sequence[int]
) -> BucketNorms:
    """The norms of one bucket from every worker's push and their average (float64 sums).

    Args:
        pushed: each worker's pushed bucket.
        divided: per worker, whether it divided its push by the number of workers already.
        average: the averaged bucket the server computed.
        samples: each worker's samples in the round (all ``> 0``).
    """
    workers = len(pushed)
    small = sum(_squared_norm(g) * (workers * workers if d else 1) for g, d in zip(pushed, divided, strict=True))
    inverse_batch = sum(1.0 / s for s in samples) / workers
    return BucketNorms(small, _squared_norm(average), inverse_batch)


def total_norms(buckets: Mapping[tuple[int, int], BucketNorms], expected: int) -> BucketNorms | None:
    """The sums over ``(server, bucket)`` in key order; ``None`` unless all ``expected`` buckets were measured."""
    if len(buckets) != expected or expected == 0 or any(b.inverse_batch <= 0 for b in buckets.values()):
        return None
    ordered = [buckets[key] for key in sorted(buckets)]
    return BucketNorms(
        math.fsum(b.small_sqr for b in ordered), math.fsum(b.big_sqr for b in ordered), ordered[0].inverse_batch
    )


def norm_sample(total: BucketNorms, num_workers: int, inverse_scale: float) -> GradientNormSample | None:
    """The protocol's sample of a round; ``None`` with fewer than two workers or non-finite norms (an overflow).

    Args:
        total: the round's norms summed over every bucket of every server.
        num_workers: workers in the round.
        inverse_scale: ``1 / scale`` of the ``GradScaler`` whose scaled gradients were pushed (``1.0``: none).
    """
    if num_workers < 2 or total.inverse_batch <= 0:
        return None
    factor = inverse_scale * inverse_scale
    small_sqr, big_sqr = total.small_sqr / num_workers * factor, total.big_sqr * factor
    if not (math.isfinite(small_sqr) and math.isfinite(big_sqr)):
        return None
    small_batch = 1.0 / total.inverse_batch
    return GradientNormSample(small_sqr, small_batch, big_sqr, num_workers * small_batch)
