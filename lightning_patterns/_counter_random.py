"""Counter-based random numbers: values that are a pure function of ``(seed, stream, index)``, in numpy.

A generator object (``np.random.Generator``) gives values in the order they are drawn, so the value of row
9,999,999 of a table costs drawing the ten million before it, and the rows a process sees depend on which
others it drew. Here the value for an index is computed from the index alone, with SplitMix64's finaliser (a
bijection of 64-bit integers with full avalanche: every input bit flips each output bit with probability about
one half), so:

- a row of a huge table (an embedding row, a latent factor of the synthetic click-through model) is created on
  first use, anywhere, in any order, and is the same everywhere;
- the numbers are the same on every machine, numpy version and run (integer arithmetic modulo 2**64 only).

Two families: :func:`counter_uniform` and :func:`counter_normal` give doubles, one mixed 64-bit word per uniform
(two per normal), for the synthetic data's generating model; :func:`counter_uniform32` and
:func:`counter_normal32` give ``float32`` from 32-bit halves of each word (a uniform per half, a *pair* of normals
per word, Box–Muller's cosine and sine), a quarter of the mixing and single-precision transcendentals, for the
initial rows a parameter server creates whenever a batch first touches them (about 10× faster per row: creating
rows is most of a pull of a large, mostly untouched table). The integers are the same everywhere; the
transcendental functions are numpy's, correctly rounded to within an ulp (a CPU with other SIMD kernels may
differ in the last bit).

This is not a cryptographic generator; it is the mixer of Java's ``SplittableRandom`` and of ``splitmix64.c``
(Steele, Lea and Flood, *Fast splittable pseudorandom number generators*, OOPSLA 2014).
"""

from __future__ import annotations

import numpy as np

__all__ = ["counter_normal", "counter_normal32", "counter_uniform", "counter_uniform32", "mix64", "stream_key"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, SplitMix64's increment
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of ``values + gamma`` (``uint64`` in, ``uint64`` out, element-wise).

    >>> int(mix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF  # splitmix64.c's first output
    True
    """
    z = np.asarray(values, dtype=np.uint64) + _GAMMA  # arrays wrap modulo 2**64 silently, as intended
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, *stream: int) -> np.uint64:
    """One 64-bit key for a seed and a path of stream numbers (``stream_key(seed, TABLE, 3)``)."""
    key = mix64(np.array([seed & _MASK], dtype=np.uint64))
    for part in stream:
        key = mix64(key ^ np.uint64(part & _MASK))
    return np.uint64(key[0])


def _bits(key: np.uint64, indices: np.ndarray, width: int) -> np.ndarray:
    """``[len(indices), width]`` independent 64-bit words for each index under ``key``."""
    rows = mix64(np.asarray(indices, dtype=np.int64).astype(np.uint64) ^ key)
    columns = np.arange(width, dtype=np.uint64) * _GAMMA
    return mix64(rows[:, None] + columns[None, :])


def _unit_interval(words: np.ndarray) -> np.ndarray:
    """Doubles in ``[0, 1)`` from the top 53 bits of each word."""
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def counter_uniform(key: np.uint64, indices: np.ndarray, width: int) -> np.ndarray:
    """Uniform doubles in ``[0, 1)``, shape ``[len(indices), width]``; row ``i`` depends on ``indices[i]`` only."""
    return _unit_interval(_bits(key, indices, width))


def counter_normal(key: np.uint64, indices: np.ndarray, width: int) -> np.ndarray:
    """Standard normal doubles, shape ``[len(indices), width]``; row ``i`` depends on ``key`` and ``indices[i]`` only.

    Box–Muller on two uniforms per value.

    >>> key = stream_key(0, 1)
    >>> a = counter_normal(key, np.array([5, 7]), 3)
    >>> b = counter_normal(key, np.array([7]), 3)
    >>> bool((a[1] == b[0]).all()), a.shape
    (True, (2, 3))
    """
    words = _bits(key, indices, 2 * width)
    first = 1.0 - _unit_interval(words[:, :width])  # (0, 1]: the logarithm stays finite
    second = _unit_interval(words[:, width:])
    return np.sqrt(-2.0 * np.log(first)) * np.cos(2.0 * np.pi * second)


def _mix64_inplace(words: np.ndarray) -> None:
    """:func:`mix64` of a ``uint64`` array, in place (one scratch array instead of one per operation)."""
    scratch = np.empty_like(words)
    words += _GAMMA
    for shift, multiplier in zip(_SHIFTS, (_M1, _M2, None), strict=True):
        np.right_shift(words, shift, out=scratch)
        words ^= scratch
        if multiplier is not None:
            words *= multiplier


def _halves(key: np.uint64, indices: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the 32-bit halves (``uint64`` holding 32 bits) of ``[len(indices), words]`` mixed words."""
    rows = mix64(np.asarray(indices, dtype=np.int64).reshape(-1).astype(np.uint64) ^ key)
    mixed = rows[:, None] + np.arange(words, dtype=np.uint64)[None, :] * _GAMMA
    _mix64_inplace(mixed)
    return mixed & _LOW32, mixed >> np.uint64(32)


def counter_uniform32(key: np.uint64, indices: np.ndarray, width: int) -> np.ndarray:
    """Uniform ``float32`` in ``[0, 1)``, ``[len(indices), width]``; row ``i`` depends on ``key`` and ``indices[i]``.

    24 random bits each: value ``2j`` from the low half of word ``j``, value ``2j + 1`` from its high half.

    >>> key = stream_key(0, 1)
    >>> a = counter_uniform32(key, np.array([5, 7]), 3)
    >>> bool((a[1] == counter_uniform32(key, np.array([7]), 3)[0]).all()), a.dtype, bool(((0 <= a) & (a < 1)).all())
    (True, dtype('float32'), True)
    """
    low, high = _halves(key, indices, (width + 1) // 2)
    values = np.empty((low.shape[0], low.shape[1], 2), dtype=np.float32)
    # The top 24 bits of each half: exactly representable, so the value stays below 1 in float32.
    values[..., 0] = low >> np.uint64(8)
    values[..., 1] = high >> np.uint64(8)
    values *= np.float32(1.0 / (1 << 24))
    return values.reshape(low.shape[0], -1)[:, :width]


def counter_normal32(key: np.uint64, indices: np.ndarray, width: int) -> np.ndarray:
    """Standard normal ``float32``, shape ``[len(indices), width]``, row ``i`` a function of ``key`` and ``indices[i]``.

    Box–Muller on the halves of one word per pair of values: radius ``sqrt(-2 ln u)`` from the high half (``u`` in
    ``(0, 1]``, in double precision, so the tails reach 6.7 standard deviations), angle from the low half; value
    ``2j`` is the radius times the cosine, ``2j + 1`` times the sine (two independent normals).

    >>> key = stream_key(0, 1)
    >>> a = counter_normal32(key, np.array([5, 7]), 3)
    >>> bool((a[1] == counter_normal32(key, np.array([7]), 3)[0]).all()), a.shape, a.dtype
    (True, (2, 3), dtype('float32'))
    """
    low, high = _halves(key, indices, (width + 1) // 2)
    uniform = (high.astype(np.float64) + 1.0) * (1.0 / (1 << 32))
    radius = np.sqrt(-2.0 * np.log(uniform)).astype(np.float32)
    angle = low.astype(np.float32) * np.float32(2.0 * np.pi / (1 << 32))
    values = np.empty((low.shape[0], low.shape[1], 2), dtype=np.float32)
    np.cos(angle, out=values[..., 0])
    np.sin(angle, out=values[..., 1])
    values *= radius[..., None]
    return values.reshape(low.shape[0], -1)[:, :width]
