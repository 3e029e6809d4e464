"""Property tests of hash sharding: buckets are balanced within a binomial tail bound, and stable.

Balance. If the hash behaves like a uniformly random function, the size X of one of s buckets holding
n distinct keys is Binomial(n, 1/s), with mean mu = n/s and variance <= mu. Bernstein's inequality gives
P(X - mu >= t) <= exp(-t**2 / (2 * (mu + t / 3))) and the Chernoff lower tail P(mu - X >= t) <=
exp(-t**2 / (2 * mu)). A union bound over the s buckets with total failure probability delta = 1e-6,
with L = ln(s / delta), gives

    max bucket <= mu + L / 3 + sqrt(L**2 / 9 + 2 * mu * L)
    min bucket >= mu - sqrt(2 * mu * L)

each failing with probability <= 1e-6 per example. The keys are n distinct ints (arbitrary start and
stride, so also consecutive ids), distinct strs, or a mix whose strs cannot read as ints (the encoding
makes ``7`` and ``"7"`` alike, see `lightning_patterns.data.sharding.hashed`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from lightning_patterns.data.sharding.hashed import bucket_of, stable_hash

DELTA = 1e-6
MAX_KEYS = 20_000


def upper_bound(n: int, s: int) -> float:
    """Bernstein + union bound on the largest of s buckets of n uniformly hashed keys (see module doc)."""
    mu, log_term = n / s, math.log(s / DELTA)
    return mu + log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * mu * log_term)


def lower_bound(n: int, s: int) -> float:
    """Chernoff + union bound on the smallest of s buckets of n uniformly hashed keys (see module doc)."""
    mu = n / s
    return mu - math.sqrt(2 * mu * math.log(s / DELTA))


@st.composite
def distinct_keys(draw: st.DrawFn) -> list[Any]:
    """n <= 20,000 distinct keys whose canonical encodings are distinct too."""
    n = draw(st.integers(1, MAX_KEYS))
    kind = draw(st.sampled_from(["ints", "strs", "mixed"]))
    start = draw(st.integers(-(2**70), 2**70))
    stride = draw(st.integers(1, 10**6))
    ints = [start + stride * i for i in range(n)]
    if kind == "ints":
        return ints
    prefix = "k" + draw(st.text(max_size=8))  # a leading letter: never reads as an int
    strs = [f"{prefix}/{i}" for i in range(n)]
    if kind == "strs":
        return strs
    return [ints[i] if i % 2 else strs[i] for i in range(n)]


@given(distinct_keys(), st.one_of(st.sampled_from([2, 3, 7, 16, 64, 256]), st.integers(1, 512)))
@example(list(range(MAX_KEYS)), 16)
@example([f"user-{i}" for i in range(MAX_KEYS)], 100)
def test_largest_and_smallest_bucket_within_binomial_tail_bound(keys: list[Any], num_shards: int) -> None:
    """For n keys into s buckets: max <= n/s + Bernstein tail, min >= n/s - Chernoff tail (delta = 1e-6)."""
    counts = np.bincount([bucket_of(key, num_shards) for key in keys], minlength=num_shards)
    assert counts.size == num_shards  # every bucket index is in range(num_shards)
    assert counts.sum() == len(keys)
    assert counts.max() <= upper_bound(len(keys), num_shards)
    assert counts.min() >= lower_bound(len(keys), num_shards)


def test_bound_is_meaningful() -> None:
    # Guard against a vacuous bound: at 20,000 keys in 16 buckets the slack is under 20% of the mean.
    assert upper_bound(20_000, 16) < 1.2 * 20_000 / 16
    assert lower_bound(20_000, 16) > 0.8 * 20_000 / 16


@given(st.one_of(st.integers(), st.text(), st.binary()), st.integers(1, 10**6))
def test_bucket_is_stable_and_in_range(key: Any, num_shards: int) -> None:
    """The same key gives the same bucket on every call, and it lies in range(num_shards)."""
    bucket = bucket_of(key, num_shards)
    assert 0 <= bucket < num_shards
    assert bucket == bucket_of(key, num_shards)
    assert bucket == stable_hash(key) % num_shards


@given(st.integers(-(2**63), 2**63 - 1), st.integers(1, 10**6))
def test_equal_ints_of_different_types_share_a_bucket(value: int, num_shards: int) -> None:
    """As documented: int, numpy integer scalars, 0-d arrays and tensors, and the decimal str, hash alike."""
    bucket = bucket_of(value, num_shards)
    same = [np.int64(value), np.array(value, dtype=np.int64), torch.tensor(value, dtype=torch.int64), str(value)]
    if -(2**31) <= value < 2**31:
        same.append(np.int32(value))
    if 0 <= value < 2**64:
        same.append(np.uint64(value))
    assert all(bucket_of(key, num_shards) == bucket for key in same)


@given(st.text(), st.integers(1, 10**6))
def test_str_and_its_utf8_bytes_share_a_bucket(value: str, num_shards: int) -> None:
    assert bucket_of(value, num_shards) == bucket_of(value.encode("utf-8"), num_shards)


@given(st.one_of(st.integers(), st.text()))
def test_hash_is_the_documented_blake2b(key: Any) -> None:
    """The documented format (BLAKE2b-64 of the canonical bytes, little-endian): the same on every machine."""
    data = key.encode("utf-8") if isinstance(key, str) else str(key).encode("ascii")
    assert stable_hash(key) == int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_bools_hash_as_ints() -> None:
    assert bucket_of(True, 7) == bucket_of(1, 7) == bucket_of(np.bool_(True), 7)
    assert bucket_of(False, 7) == bucket_of(0, 7)
