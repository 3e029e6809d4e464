"""Class-balanced batches: at least ``min_per_class`` samples of every class in each batch, streaming.

:class:`ClassBalancer` reorders the samples one DataLoader worker will yield so that every batch holds at
least ``k = min_per_class`` samples of each of ``C = num_classes`` classes. It never changes how many
batches there are or how large each one is (every rank must yield the same number of batches, or DDP
hangs); it only chooses which of the worker's samples go into which batch. Each sample is used exactly
once, and it is deterministic (no random numbers), so a resumed run re-plans the same batches.

Algorithm (greedy, oldest first). Positions ``0..n-1`` are the worker's samples in arrival order; batch
``j`` ends at ``end_j`` (``(j+1)·batch_size`` except for a partial last batch) and may only use positions
below its *window* ``W_j = min(n, end_j + lookahead)``, so the dataset needs at most
``batch_size + lookahead`` samples resident. For batch ``j``:

1. *quota*: take the ``k`` oldest unused positions of each class in the window (fewer if there are not);
2. *fill*: take the oldest unused positions in the window, whatever their class, until the batch is full.
   Once the window reaches the end (``W_j = n``) the fill keeps a *reserve*: it takes a class only while
   ``k`` of it remain for every later batch, and breaks the reserve only when nothing else is left.

Tail. A batch holding fewer than ``k`` samples of some class is a *tail* batch, counted in
:attr:`BatchPlan.tail`. A partial last batch smaller than ``k·C`` always is one. Let ``Q(t)`` be the
number of batches from ``t`` on with at least ``k·C`` samples, ``j0`` the first batch whose window reaches
the end (``end_j0 + lookahead >= n``) and ``count_c[a, b)`` the samples of class ``c`` at positions
``a..b-1``. Then, for batches with at least ``k·C`` samples:

- (early batches) batch ``j < j0`` is balanced if, for every class ``c`` and every ``t <= j``,
  ``count_c[t·batch_size, W_j) >= k·(j - t + 1)``: every stretch from a batch boundary to the window end
  holds ``k`` per batch. (Fill positions of batch ``i`` lie below ``(i+1)·batch_size`` since it takes the
  oldest, so before batch ``j`` class ``c`` has used at most ``max_t count_c[0, t·batch_size) + k·(j-t)``.)
- (end batches) every batch ``j >= j0`` is balanced if, for every class ``c`` and every ``t <= j0``,
  ``count_c[t·batch_size, n) >= k·Q(t)``: from every batch boundary up to ``j0``, class ``c`` still has ``k``
  samples for each remaining batch. (By the same bound at least ``k·Q(j0)`` remain at ``j0``, and the
  reserve keeps that true: the fill never runs short, since the surplus over the reserve is at least the
  free room of the batch.)

So tail batches happen only where a class is too rare within the look-ahead, or when a class runs out near
the end of the worker's samples; with ``lookahead >= n - batch_size`` (``j0 = 0``) the only condition left
is ``check_class_counts`` with ``num_batches = Q(0)``, and there is no tail at all.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["BatchPlan", "ClassBalancer", "check_class_counts"]

log = logging.getLogger(__name__)

_Positions = npt.NDArray[np.int64]


def _as_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``, else a TypeError or ValueError that names it."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name}={number!r} must be at least {minimum}")
    return number


def check_class_counts(
    class_counts: Sequence[int] | npt.NDArray[np.integer], *, num_batches: int, min_per_class: int
) -> None:
    """Raise if some class has too few samples to give ``min_per_class`` of it to each batch.

    Args:
        class_counts: samples of each class (index = class) that one rank or worker will yield.
        num_batches: batches that must each hold ``min_per_class`` of every class.
        min_per_class: the least number of samples of each class per batch.

    Raises:
        ValueError: naming the first class short of ``num_batches × min_per_class`` samples (and the others).
    """
    num_batches = _as_int("num_batches", num_batches, 0)
    min_per_class = _as_int("min_per_class", min_per_class, 1)
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or (counts.size and not np.issubdtype(counts.dtype, np.integer)):
        raise ValueError(f"class_counts must be a 1-D sequence of ints, got {class_counts!r}")
    need = num_batches * min_per_class
    short = np.flatnonzero(counts < need)
    if short.size == 0:
        return
    first = int(short[0])
    also = f" (also short: classes {', '.join(str(int(c)) for c in short[1:])})" if short.size > 1 else ""
    raise ValueError(
        f"class {first} has {int(counts[first])} samples but {num_batches} batches × "
        f"min_per_class={min_per_class} need {need}{also}: lower min_per_class or batch_size, "
        f"or add samples of class {first}"
    )


@dataclass(frozen=True)
class BatchPlan:
    """Which of a worker's sample positions go into each batch.

    Attributes:
        batches: one sorted array of positions per batch; together a permutation of ``0..n-1``.
        tail: indices of the batches holding fewer than ``min_per_class`` samples of some class.
    """

    batches: list[_Positions]
    tail: tuple[int, ...]

    @property
    def tail_batches(self) -> int:
        """How many batches are tail batches."""
        return len(self.tail)

    def order(self) -> _Positions:
        """All positions, batch after batch: the new order in which to yield the worker's samples."""
        if not self.batches:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(self.batches)


class ClassBalancer:
    """Plans batches with at least ``min_per_class`` samples of every class, reading a bounded look-ahead.

    See the module documentation for the algorithm and the exact conditions under which a batch may fall
    short (a *tail* batch).

    Args:
        batch_size: samples per batch (a partial last batch may be smaller).
        min_per_class: the least number of samples of each class in every batch.
        num_classes: labels are class indices in ``0..num_classes-1``.
        lookahead: how many samples past the end of a batch it may draw from; the dataset then needs at
            most ``batch_size + lookahead`` samples resident.

    Raises:
        ValueError: if an argument is out of range, or ``batch_size < min_per_class × num_classes``.

    Example:
        >>> balancer = ClassBalancer(batch_size=4, min_per_class=2, num_classes=2)
        >>> plan = balancer.plan_batches(np.array([0, 0, 0, 0, 1, 1, 1, 1]))
        >>> [batch.tolist() for batch in plan.batches], plan.tail_batches
        ([[0, 1, 4, 5], [2, 3, 6, 7]], 0)
    """

    def __init__(self, batch_size: int, min_per_class: int, num_classes: int, lookahead: int = 4096) -> None:
        self.batch_size = _as_int("batch_size", batch_size, 1)
        self.min_per_class = _as_int("min_per_class", min_per_class, 1)
        self.num_classes = _as_int("num_classes", num_classes, 1)
        self.lookahead = _as_int("lookahead", lookahead, 0)
        need = self.min_per_class * self.num_classes
        if self.batch_size < need:
            raise ValueError(
                f"batch_size={self.batch_size} cannot hold min_per_class={self.min_per_class} samples of each "
                f"of {self.num_classes} classes (needs at least {need}): raise batch_size to {need} or lower "
                "min_per_class"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, min_per_class={self.min_per_class}, "
            f"num_classes={self.num_classes}, lookahead={self.lookahead})"
        )

    # ------------------------------------------------------------------ public operations

    def batch_sizes(self, num_batches: int, last_batch_size: int | None = None) -> list[int]:
        """The sizes of ``num_batches`` batches: ``batch_size`` each, the last ``last_batch_size`` if given.

        Raises:
            ValueError: if ``num_batches < 0`` or ``last_batch_size`` is not in ``1..batch_size``.
        """
        num_batches = _as_int("num_batches", num_batches, 0)
        if num_batches == 0:
            if last_batch_size is not None:
                raise ValueError(f"last_batch_size={last_batch_size!r} needs num_batches >= 1, got 0")
            return []
        last = self.batch_size if last_batch_size is None else _as_int("last_batch_size", last_batch_size, 1)
        if last > self.batch_size:
            raise ValueError(
                f"last_batch_size={last} exceeds batch_size={self.batch_size}: pass a size in 1..{self.batch_size}"
            )
        return [self.batch_size] * (num_batches - 1) + [last]

    def plan_batches(
        self,
        labels: Sequence[int] | npt.NDArray[np.integer],
        *,
        num_batches: int | None = None,
        last_batch_size: int | None = None,
    ) -> BatchPlan:
        """Plan the batches of a worker whose samples, in arrival order, have these labels.

        Args:
            labels: the class of each of the worker's ``n`` samples, positions ``0..n-1``.
            num_batches: defaults to ``ceil(n / batch_size)``.
            last_batch_size: defaults to what is left, ``n - (num_batches - 1) × batch_size``.

        Returns:
            The batches (each sorted, together a permutation of ``0..n-1``) and the tail batches.

        Raises:
            ValueError: if a label is not a class index, or the batch sizes do not add up to ``n``.
        """
        array = self._check_labels(labels, offset=0)
        n = array.size
        if num_batches is None:
            num_batches = math.ceil(n / self.batch_size)
        num_batches = _as_int("num_batches", num_batches, 0)
        if last_batch_size is None and num_batches:
            last_batch_size = n - (num_batches - 1) * self.batch_size
            if not 1 <= last_batch_size <= self.batch_size:
                raise ValueError(
                    f"{n} labels cannot make num_batches={num_batches} batches of batch_size={self.batch_size} "
                    f"(that takes {(num_batches - 1) * self.batch_size + 1} to {num_batches * self.batch_size}): "
                    f"pass num_batches={math.ceil(n / self.batch_size)}"
                )
        sizes = self.batch_sizes(num_batches, last_batch_size)
        if sum(sizes) != n:
            raise ValueError(
                f"num_batches={num_batches} with last_batch_size={last_batch_size} makes {sum(sizes)} samples, "
                f"but there are {n} labels: the sizes must add up to the number of labels"
            )
        batches = list(self._iterate(iter((array,)), sizes))
        return BatchPlan(batches, self._tail(array, batches, sizes))

    def iter_batches(
        self,
        label_chunks: Iterable[Sequence[int] | npt.NDArray[np.integer]],
        *,
        num_batches: int,
        last_batch_size: int | None = None,
    ) -> Iterator[_Positions]:
        """Plan batches as the labels arrive: the streaming form of :meth:`plan_batches`.

        Chunks are read only as far as the window of the next batch needs (``lookahead`` samples past its
        end), so labels can be read window by window while shards are fetched. The batches are exactly
        those :meth:`plan_batches` gives, whatever the chunking.

        Args:
            label_chunks: the labels of positions ``0, 1, …`` in consecutive chunks of any size.
            num_batches: how many batches to yield.
            last_batch_size: size of the last batch; defaults to ``batch_size``. The chunks must hold
                exactly ``(num_batches - 1) × batch_size + last_batch_size`` labels.

        Yields:
            The sorted positions of each batch in turn.

        Raises:
            ValueError: if a label is not a class index, or the chunks hold too few or too many labels.
        """
        sizes = self.batch_sizes(num_batches, last_batch_size)
        return self._iterate(iter(label_chunks), sizes)

    # ------------------------------------------------------------------ internals

    def _check_labels(self, labels: Sequence[int] | npt.NDArray[np.integer], offset: int) -> _Positions:
        array = np.asarray(labels)
        if array.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {array.shape}")
        if array.size == 0:
            return np.empty(0, dtype=np.int64)
        if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
        bad = np.flatnonzero((array < 0) | (array >= self.num_classes))
        if bad.size:
            at = int(bad[0])
            raise ValueError(
                f"labels must be class indices in 0..{self.num_classes - 1} (num_classes={self.num_classes}), "
                f"got {array[at].item()!r} at position {offset + at}"
            )
        return array.astype(np.int64, copy=False)

    def _iterate(
        self, chunks: Iterator[Sequence[int] | npt.NDArray[np.integer]], sizes: list[int]
    ) -> Iterator[_Positions]:
        k, num_classes = self.min_per_class, self.num_classes
        n = sum(sizes)
        quota_size = k * num_classes
        # Batches (after the current one, once decremented) that must hold k of every class: the reserve.
        quota_left = sum(size >= quota_size for size in sizes)
        # Unused positions of each class, oldest first; only positions < `received` are known.
        pending: list[_Positions] = [np.empty(0, dtype=np.int64) for _ in range(num_classes)]
        received = end = 0
        for size in sizes:
            end += size
            window = min(n, end + self.lookahead)
            if received < window:
                received = self._receive(chunks, pending, received, window, n)
            need = k if size >= quota_size else 0
            if need:
                quota_left -= 1
            in_window = [int(p.searchsorted(window)) for p in pending]
            take = [min(need, avail) for avail in in_window]
            room = size - sum(take)
            if room:
                # In the end phase every unused sample is in the window: keep k of each class per later batch.
                caps = (
                    [max(0, len(p) - t - k * quota_left) for p, t in zip(pending, take, strict=True)]
                    if window == n
                    else in_window
                )
                room = self._fill(
                    pending, take, [min(a - t, c) for a, t, c in zip(in_window, take, caps, strict=True)], room
                )
                if room:  # the reserve cannot be kept: take the oldest of the rest
                    log.debug("class balance: reserve broken for %d samples, tail batches follow", room)
                    self._fill(pending, take, [a - t for a, t in zip(in_window, take, strict=True)], room)
            batch = np.sort(np.concatenate([p[:t] for p, t in zip(pending, take, strict=True)]))
            pending = [p[t:] for p, t in zip(pending, take, strict=True)]
            yield batch
        if any(np.asarray(extra).size for extra in chunks):
            raise ValueError(
                f"label_chunks hold more than the {n} labels that {len(sizes)} batches take: pass num_batches and "
                "last_batch_size that match the worker's samples"
            )

    @staticmethod
    def _fill(pending: list[_Positions], take: list[int], limits: list[int], room: int) -> int:
        """Add up to ``room`` of the oldest candidates (``limits[c]`` after ``take[c]``) to ``take``.

        Returns:
            The room left when the candidates run out.
        """
        segments = [p[t : t + min(limit, room)] for p, t, limit in zip(pending, take, limits, strict=True)]
        candidates = np.concatenate(segments)
        if candidates.size <= room:
            for c, segment in enumerate(segments):
                take[c] += segment.size
            return room - candidates.size
        # The room-th oldest candidate; positions are distinct, so exactly `room` are at or below it.
        threshold = np.partition(candidates, room - 1)[room - 1]
        for c, segment in enumerate(segments):
            take[c] += int(segment.searchsorted(threshold, side="right"))
        return 0

    def _receive(
        self,
        chunks: Iterator[Sequence[int] | npt.NDArray[np.integer]],
        pending: list[_Positions],
        received: int,
        window: int,
        n: int,
    ) -> int:
        """Read chunks until labels up to ``window`` are known; append their positions to ``pending``."""
        new: list[list[_Positions]] = [[p] for p in pending]
        while received < window:
            chunk = next(chunks, None)
            if chunk is None:
                raise ValueError(
                    f"label_chunks ended after {received} labels, but the batches take {n}: pass num_batches "
                    "and last_batch_size that match the worker's samples"
                )
            labels = self._check_labels(chunk, offset=received)
            if received + labels.size > n:
                raise ValueError(
                    f"label_chunks hold more than the {n} labels that the batches take: pass num_batches and "
                    "last_batch_size that match the worker's samples"
                )
            order = np.argsort(labels, kind="stable") + received
            bounds = np.cumsum(np.bincount(labels, minlength=self.num_classes))[:-1]
            for c, positions in enumerate(np.split(order, bounds)):
                if positions.size:
                    new[c].append(positions)
            received += labels.size
        for c, parts in enumerate(new):
            if len(parts) > 1:
                pending[c] = np.concatenate(parts)
        return received

    def _tail(self, labels: _Positions, batches: list[_Positions], sizes: list[int]) -> tuple[int, ...]:
        if not batches:
            return ()
        batch_of = np.repeat(np.arange(len(batches)), sizes)
        order = np.concatenate(batches)
        counts = np.bincount(batch_of * self.num_classes + labels[order], minlength=len(batches) * self.num_classes)
        short = counts.reshape(len(batches), self.num_classes).min(axis=1) < self.min_per_class
        return tuple(int(j) for j in np.flatnonzero(short))
