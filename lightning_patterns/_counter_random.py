"""Counter-based random numbers: values that are a pure function of ``(seed, stream, index)``, in numpy.

A generator object (``np.random.Generator``) gives values in the order they are drawn, so the value of row
9,999,999 of a table costs drawing the ten million before it, and the rows a process sees depend on which
others it drew. Here the value for an index is computed from the index alone, with SplitMix64's finaliser (a
bijection of 64-bit integers with full avalanche: every input bit flips each output bit with probability about
one half), so:

- a row of a huge table (an embedding row, a latent factor of the synthetic click-through model) is created on
  first use, anywhere, in any order, and is the same everywhere;
- the numbers are the same on every machine, numpy version and run (integer arithmetic modulo 2**64 only).

This is not a cryptographic generator; it is the mixer of Java's ``SplittableRandom`` and of ``splitmix64.c``
(Steele, Lea and Flood, *Fast splittable pseudorandom number generators*, OOPSLA 2014).
"""

from __future__ import annotations

import numpy as np

__all__ = ["counter_normal", "counter_uniform", "mix64", "stream_key"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, SplitMix64's increment
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


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
