"""Interval arithmetic over global sample indices, for :mod:`lightning_patterns.testing.balance`.

A worker's plan is a list of spans, each a contiguous run of global sample indices ``[first, first + length)``.
Counting duplicates, losses and padding from spans instead of from materialised indices keeps a check of a
manifest with billions of samples as cheap as one with thousands: the cost grows with the number of spans.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["DeliveredSet", "union_length"]

_IntArray = npt.NDArray[np.int64]


def union_length(starts: Sequence[int] | _IntArray, stops: Sequence[int] | _IntArray) -> int:
    """The number of indices covered by at least one interval ``[starts[i], stops[i])``.

    Example:
        >>> union_length([0, 5, 2], [3, 7, 4])
        6
    """
    a = np.asarray(starts, dtype=np.int64)
    b = np.asarray(stops, dtype=np.int64)
    keep = b > a
    a, b = a[keep], b[keep]
    if not a.size:
        return 0
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    # Sorted by start, the earlier intervals cover [a_i, max(b_0 .. b_{i-1})) of what lies at or after a_i, so
    # interval i adds only what reaches past that.
    reach = np.maximum.accumulate(b)
    before = np.concatenate([[a[0]], reach[:-1]])
    return int(np.maximum(0, b - np.maximum(a, before)).sum())


class DeliveredSet:
    """The indices delivered so far, as sorted disjoint intervals; :meth:`add` says how many were already in.

    Example:
        >>> seen = DeliveredSet()
        >>> seen.add(0, 10), seen.add(5, 12), seen.add(20, 21), len(seen)
        (0, 5, 0, 13)
    """

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        for start, stop in intervals:
            self.add(start, stop)

    def __len__(self) -> int:
        return sum(stop - start for start, stop in zip(self._starts, self._stops, strict=True))

    def add(self, start: int, stop: int) -> int:
        """Add ``[start, stop)`` and return how many of its indices were already delivered."""
        if stop <= start:
            return 0
        # The intervals that overlap or touch [start, stop): merge them into one.
        lo = bisect.bisect_left(self._stops, start)
        hi = bisect.bisect_right(self._starts, stop)
        overlap = sum(max(0, min(stop, self._stops[k]) - max(start, self._starts[k])) for k in range(lo, hi))
        if lo < hi:
            start = min(start, self._starts[lo])
            stop = max(stop, self._stops[hi - 1])
        self._starts[lo:hi] = [start]
        self._stops[lo:hi] = [stop]
        return overlap
