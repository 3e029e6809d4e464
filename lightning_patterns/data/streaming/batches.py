"""Which positions of a worker's plan form each batch, and when each shard may be let go.

Without class balancing a batch is the next ``batch_size`` positions of the plan. With it, a
:class:`~lightning_patterns.data.batching.ClassBalancer` regroups the positions so that every batch holds
``min_per_class`` samples of each class; it needs the labels of a bounded look-ahead, which are read
(label column only) from the shards as they arrive. Either way a shard stays resident until every
position that needs it has been gathered and, when balancing, its labels have been read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.batching import ClassBalancer
from lightning_patterns.data.sharding.assignment import WorkerPlan

__all__ = ["BatchPositions", "PlanIndices", "ShardUse", "shard_use_of"]

_IntArray = npt.NDArray[np.int64]
_LABEL_CHUNK = 1024
# Positions per cached block of an unshuffled plan (its "windows" are only a unit of computation).
_UNSHUFFLED_WINDOW = 4096
_COUNT_CHUNK = 65536


class PlanIndices:
    """Global sample indices of a worker's plan, computed a window at a time and kept only while in use.

    The plan of a worker can be long (its share of an epoch); holding its indices whole would make memory
    grow with the dataset. Windows of the within-worker shuffle can each be computed alone, so only those
    around the current batch (and a balancer's look-ahead) are kept.

    Args:
        plan: the worker's plan.
        keep: windows kept in memory at most (least recently used ones are dropped and recomputed if needed).
    """

    def __init__(self, plan: WorkerPlan, keep: int = 16) -> None:
        self.plan = plan
        self.window = plan.shuffle_window if plan.shuffle_window > 1 else _UNSHUFFLED_WINDOW
        self._keep = keep
        self._windows: OrderedDict[int, _IntArray] = OrderedDict()

    def _window(self, k: int) -> _IntArray:
        found = self._windows.get(k)
        if found is None:
            found = self.plan.indices_between(k * self.window, (k + 1) * self.window)
            self._windows[k] = found
            while len(self._windows) > self._keep:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(k)
        return found

    def at(self, positions: _IntArray) -> _IntArray:
        """The global indices at yield ``positions`` (any order)."""
        if positions.size == 0:
            return np.zeros(0, dtype=np.int64)
        windows = positions // self.window
        first, last = int(windows.min()), int(windows.max())
        if first == last:
            return self._window(first)[positions - first * self.window]
        out = np.empty(positions.size, dtype=np.int64)
        for k in np.unique(windows).tolist():
            mask = windows == k
            out[mask] = self._window(k)[positions[mask] - k * self.window]
        return out

    def between(self, lo: int, hi: int) -> _IntArray:
        """The global indices at yield positions ``[lo, hi)``."""
        return self.at(np.arange(lo, hi, dtype=np.int64))


def only_shard(shards: _IntArray) -> int | None:
    """The one shard all these entries name, or ``None`` if they name several (or none)."""
    if shards.size == 0:
        return None
    first = int(shards[0])
    if first == int(shards[-1]) and bool(np.all(shards == first)):
        return first
    return None


class ShardUse:
    """Counts what each shard is still needed for, and releases it when nothing is left.

    Args:
        pending: per shard, how many of the plan's positions will still be gathered from it.
        last_position: per shard, a yield position at or after the last one that needs it (``-1``: unused).
        needs_labels: whether labels are read ahead of gathering (class balancing).
        release: called once per shard when it is no longer needed.
    """

    def __init__(
        self,
        pending: _IntArray,
        last_position: _IntArray,
        needs_labels: bool,
        release: Callable[[int], None],
    ) -> None:
        self._pending = pending
        self._last_position = last_position
        self._release = release
        self._released: set[int] = set()
        self._needs_labels = needs_labels
        self._labels_read = 0
        used = np.flatnonzero(last_position >= 0)
        # Shards in the order their labels are all read, to find those a label read frees.
        self._by_last = used[np.argsort(last_position[used], kind="stable")]
        self._next_by_last = 0

    def gathered(self, shards: _IntArray) -> None:
        """Positions of these shards were put into a batch (one entry per position)."""
        shard = only_shard(shards)
        if shard is not None:  # the common case, per batch: skip np.unique's sort
            self._pending[shard] -= shards.size
            self._check([shard])
            return
        touched, counts = np.unique(shards, return_counts=True)
        self._pending[touched] -= counts
        self._check(touched.tolist())

    def gathered_rows(self, shard: int, count: int) -> None:
        """``count`` positions of ``shard`` were put into a batch."""
        self._pending[shard] -= count
        if self._pending[shard] <= 0:
            self._check([shard])

    def labels_read(self, upto: int) -> None:
        """Labels of positions ``< upto`` have been read."""
        self._labels_read = upto
        freed = []
        while self._next_by_last < self._by_last.size:
            shard = int(self._by_last[self._next_by_last])
            if self._last_position[shard] >= upto:
                break
            freed.append(shard)
            self._next_by_last += 1
        self._check(freed)

    def _check(self, shards: list[int]) -> None:
        for shard in shards:
            labels_done = not self._needs_labels or self._last_position[shard] < self._labels_read
            if shard not in self._released and self._pending[shard] <= 0 and labels_done:
                self._released.add(shard)
                self._release(shard)


class BatchPositions:
    """The batches of one worker's plan, as arrays of positions into it.

    Args:
        num_positions: samples in the worker's plan.
        step: samples per batch (the decode chunk when yielding single samples).
        first_position: plain batches start here (positions before it were yielded before a resume).
        skip_batches: balanced batches already yielded before a resume.
        balancer: regroups positions into class-balanced batches, or ``None``.
    """

    def __init__(
        self,
        num_positions: int,
        step: int,
        *,
        first_position: int,
        skip_batches: int,
        balancer: ClassBalancer | None,
    ) -> None:
        self.num_positions = num_positions
        self.step = step
        self.first_position = min(first_position, num_positions)
        self.skip_batches = skip_batches
        self.balancer = balancer

    @property
    def first_needed(self) -> int:
        """The first position whose shard is needed: labels are read from the start when balancing."""
        return 0 if self.balancer is not None else self.first_position

    def batches(
        self, read_labels: Callable[[int, int], _IntArray], on_labels: Callable[[int], None]
    ) -> Iterator[tuple[_IntArray, bool]]:
        """``(positions, skipped)`` for every batch; skipped batches were yielded before a resume.

        Args:
            read_labels: labels of positions ``[start, stop)`` (called only with a balancer).
            on_labels: told ``upto`` once the labels of positions ``< upto`` have been read.
        """
        if self.balancer is None:
            for begin in range(self.first_position, self.num_positions, self.step):
                yield np.arange(begin, min(begin + self.step, self.num_positions), dtype=np.int64), False
            return
        num_batches = -(-self.num_positions // self.step)
        last = self.num_positions - (num_batches - 1) * self.step if num_batches else None
        chunks = self._label_chunks(read_labels, on_labels)
        batches = self.balancer.iter_batches(chunks, num_batches=num_batches, last_batch_size=last)
        # A resumed balanced epoch replays the plan from the start (it is deterministic) and skips what was
        # yielded: the labels of the skipped part must be read again, the samples need not be.
        for index, positions in enumerate(batches):
            yield positions, index < self.skip_batches

    def _label_chunks(
        self, read_labels: Callable[[int, int], _IntArray], on_labels: Callable[[int], None]
    ) -> Iterator[_IntArray]:
        for begin in range(0, self.num_positions, _LABEL_CHUNK):
            end = min(begin + _LABEL_CHUNK, self.num_positions)
            labels = read_labels(begin, end)
            on_labels(end)
            yield labels


def shard_use_of(
    plan: WorkerPlan, num_shards: int, offsets: _IntArray, first_position: int
) -> tuple[_IntArray, _IntArray, list[int]]:
    """What each shard is needed for, from the plan's spans alone (no per-sample arrays).

    Returns:
        ``pending`` (positions at or after ``first_position`` per shard), ``last_position`` (a yield position at
        or after the last one of each shard, conservatively the end of the window holding its last read
        position) and the shards in the order they are first read, skipping those only read before
        ``first_position``.
    """
    pending = np.zeros(num_shards, dtype=np.int64)
    last_position = np.full(num_shards, -1, dtype=np.int64)
    window = plan.shuffle_window if plan.shuffle_window > 1 else 1
    n = plan.num_samples
    read_end = 0
    for shard, start, stop in plan.spans:
        pending[shard] += stop - start
        read_end += stop - start
        last_position[shard] = min(-(-read_end // window) * window, n) - 1
    # Positions yielded before a resume are not gathered again: count them out, a chunk at a time.
    for lo in range(0, first_position, _COUNT_CHUNK):
        done = plan.indices_between(lo, min(lo + _COUNT_CHUNK, first_position))
        shards = np.searchsorted(offsets, done, side="right") - 1
        pending -= np.bincount(shards, minlength=num_shards)
    first_window_start = (first_position // window) * window
    read_position = 0
    schedule: list[int] = []
    seen: set[int] = set()
    for shard, start, stop in plan.spans:
        read_position += stop - start
        if read_position > first_window_start and shard not in seen and pending[shard] > 0:
            seen.add(shard)
            schedule.append(shard)
    return pending, last_position, schedule
