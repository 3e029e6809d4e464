"""Assembling a batch from opened shards, at the cost of the batch's own copy and little else.

A batch is a few contiguous *runs* of rows (``(shard, start, stop)``): one run when it lies inside a shard,
two or more when it crosses shard boundaries. :func:`gather_runs` reads one run with one slice per field
(:meth:`~lightning_patterns.data.shards.ShardReader.read_range`), and several runs straight into one output
buffer of the batch's size (no per-run arrays and no concatenation). :func:`run_batches` cuts an unshuffled
plan into such runs from its spans alone, with no per-sample index arrays; :func:`gather_indices` handles
any order (a window shuffle, class balancing) with one fancy-index copy per shard and field.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.sharding.assignment import WorkerPlan
from lightning_patterns.data.shards.reader import ShardReader

__all__ = ["Run", "gather_indices", "gather_runs", "run_batches"]

Run = tuple[int, int, int]
"""``(shard, start, stop)``: rows ``start <= i < stop`` of a shard, in order."""

_IntArray = npt.NDArray[np.int64]


def run_batches(plan: WorkerPlan, step: int, first_position: int) -> Iterator[list[Run]]:
    """The batches of an unshuffled plan from ``first_position`` on, each as the runs of rows it reads.

    Args:
        plan: a worker's plan whose yield order is its read order (no window shuffle).
        step: samples per batch.
        first_position: the first position to yield (positions before it were yielded before a resume).
    """
    spans = plan.spans
    ends: list[int] = []
    total = 0
    for _, start, stop in spans:
        total += stop - start
        ends.append(total)
    span = bisect.bisect_right(ends, first_position)
    position = first_position
    while position < total:
        end = min(position + step, total)
        runs: list[Run] = []
        while position < end:
            shard, start, stop = spans[span]
            begin = ends[span] - (stop - start)  # the position of the span's first row
            take = min(end, ends[span]) - position
            row = start + (position - begin)
            if take > 0:
                runs.append((shard, row, row + take))
            position += take
            if position == ends[span]:
                span += 1
        yield runs


def gather_runs(get: Callable[[int], ShardReader], runs: list[Run]) -> dict[str, Any]:
    """The batch made of ``runs``: one slice per field for a single run, one output buffer for several."""
    if len(runs) == 1:
        shard, start, stop = runs[0]
        return get(shard).read_range(start, stop)
    size = sum(stop - start for _, start, stop in runs)
    out: dict[str, Any] | None = None
    at = 0
    for shard, start, stop in runs:
        reader = get(shard)
        if out is None:
            out = reader.empty_batch(size)
        reader.copy_rows(start, stop, out, at)
        at += stop - start
    assert out is not None
    return _as_batch(out)


def gather_indices(get: Callable[[int], ShardReader], shards: _IntArray, local: _IntArray) -> dict[str, Any]:
    """The batch of rows ``local[i]`` of shards ``shards[i]``, in that order (any order, repeats allowed)."""
    first = int(shards[0])
    if first == int(shards[-1]) and bool(np.all(shards == first)):
        reader = get(first)
        start = int(local[0])
        if int(local[-1]) - start == local.size - 1 and bool(np.all(np.diff(local) == 1)):
            return reader.read_range(start, start + local.size)
        return reader.read_batch(local)
    out: dict[str, Any] | None = None
    for shard in np.unique(shards).tolist():
        where = np.flatnonzero(shards == shard)
        reader = get(shard)
        if out is None:
            out = reader.empty_batch(shards.size)
        reader.take_rows(local[where], out, where)
    assert out is not None
    return _as_batch(out)


def _as_batch(out: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for name, value in out.items()}
