"""Which positions of a worker's plan form each batch, and when each shard may be let go.

Without class balancing a batch is the next ``batch_size`` positions of the plan. With it, a
:class:`~lightning_patterns.data.batching.ClassBalancer` regroups the positions so that every batch holds
``min_per_class`` samples of each class; it needs the labels of a bounded look-ahead, which are read
(label column only) from the shards as they arrive. Either way a shard stays resident until every
position that needs it has been gathered and, when balancing, its labels have been read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.batching import ClassBalancer

__all__ = ["BatchPositions", "ShardUse"]

_IntArray = npt.NDArray[np.int64]
_LABEL_CHUNK = 1024


class ShardUse:
    """Counts what each shard is still needed for, and releases it when nothing is left.

    Args:
        shard_of: the shard of every position of the plan.
        gathered_from: the first position that will be gathered (earlier ones were yielded before a resume).
        num_shards: shards in the dataset.
        needs_labels: whether labels are read ahead of gathering (class balancing).
        release: called once per shard when it is no longer needed.
    """

    def __init__(
        self,
        shard_of: _IntArray,
        gathered_from: _IntArray | None,
        num_shards: int,
        needs_labels: bool,
        release: Callable[[int], None],
    ) -> None:
        self._shard_of = shard_of
        counted = shard_of if gathered_from is None else shard_of[gathered_from]
        self._pending = np.bincount(counted, minlength=num_shards)
        self._release = release
        self._released: set[int] = set()
        self._labels_read = shard_of.size if not needs_labels else 0
        reversed_shards, reversed_first = np.unique(shard_of[::-1], return_index=True)
        self._last_position = np.full(num_shards, -1, dtype=np.int64)
        self._last_position[reversed_shards] = shard_of.size - 1 - reversed_first

    def gathered(self, positions: _IntArray) -> None:
        """The positions were put into a batch."""
        shards, counts = np.unique(self._shard_of[positions], return_counts=True)
        self._pending[shards] -= counts
        self._check(shards)

    def labels_read(self, upto: int) -> None:
        """Labels of positions ``< upto`` have been read."""
        before, self._labels_read = self._labels_read, upto
        self._check(np.unique(self._shard_of[before:upto]))

    def _check(self, shards: _IntArray) -> None:
        for shard in shards.tolist():
            if (
                shard not in self._released
                and self._pending[shard] <= 0
                and self._last_position[shard] < self._labels_read
            ):
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
        read_labels: labels of positions ``[start, stop)`` (used only with a balancer).
    """

    def __init__(
        self,
        num_positions: int,
        step: int,
        *,
        first_position: int,
        skip_batches: int,
        balancer: ClassBalancer | None,
        read_labels: Callable[[int, int], _IntArray],
    ) -> None:
        self.num_positions = num_positions
        self.step = step
        self.first_position = min(first_position, num_positions)
        self.skip_batches = skip_batches
        self.balancer = balancer
        self._read_labels = read_labels
        self.on_labels: Callable[[int], None] = lambda upto: None

    @property
    def first_needed(self) -> int:
        """The first position whose shard is needed: labels are read from the start when balancing."""
        return 0 if self.balancer is not None else self.first_position

    def __iter__(self) -> Iterator[tuple[_IntArray, bool]]:
        """``(positions, skipped)`` for every batch; skipped batches were yielded before a resume."""
        if self.balancer is None:
            for begin in range(self.first_position, self.num_positions, self.step):
                yield np.arange(begin, min(begin + self.step, self.num_positions), dtype=np.int64), False
            return
        num_batches = -(-self.num_positions // self.step)
        last = self.num_positions - (num_batches - 1) * self.step if num_batches else None
        batches = self.balancer.iter_batches(self._label_chunks(), num_batches=num_batches, last_batch_size=last)
        # A resumed balanced epoch replays the plan from the start (it is deterministic) and skips what was
        # yielded: the labels of the skipped part must be read again, the samples need not be.
        for index, positions in enumerate(batches):
            yield positions, index < self.skip_batches

    def _label_chunks(self) -> Iterator[_IntArray]:
        for begin in range(0, self.num_positions, _LABEL_CHUNK):
            end = min(begin + _LABEL_CHUNK, self.num_positions)
            labels = self._read_labels(begin, end)
            self.on_labels(end)
            yield labels
