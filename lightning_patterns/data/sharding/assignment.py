"""Which samples each rank and DataLoader worker yields in an epoch: a pure function, no communication.

Samples are numbered globally in manifest order: sample ``g = offset[s] + i`` is the ``i``-th sample of
shard ``s``, where ``offset[s]`` is the sum of the sizes of the shards before ``s``. A *span*
``(shard, start, stop)`` is the contiguous run ``start <= i < stop`` of one shard.

The plan for one epoch is built in four steps, all of which every process computes on its own from the
same arguments (so ranks agree without talking to each other):

1. **Epoch stream.** Each non-empty shard becomes one span (or several of at most ``span_samples``
   samples, so that one huge shard can still be shuffled). With ``shuffle=True`` the order of the spans
   is permuted by ``numpy.random.Generator(PCG64(SeedSequence([seed, epoch])))``: the same on every
   machine and Python version (Python's ``hash()`` is never used).
2. **Rank split.** With ``N`` samples in the stream and ``W`` ranks, every rank gets exactly
   :func:`samples_per_rank` samples ``P``: ``N // W`` with ``drop_last=True`` (the last ``N % W <= W - 1``
   samples of the stream are dropped), else ``ceil(N / W)``, where the stream is read cyclically so the
   ``W * P - N <= W - 1`` padding samples repeat the start of the stream. Rank ``r`` takes the
   contiguous stream positions ``[r * P, (r + 1) * P)``. Equal ``P`` means equal batch counts on every
   rank however uneven the shards are, so DDP never waits at the end of an epoch for a rank that ran out.
3. **Worker split.** The rank's ``P`` samples are cut into ``ceil(P / batch_size)`` batches, dealt to the
   workers as contiguous blocks: worker counts differ by at most one batch, and only the last worker
   that gets anything may hold a partial batch. ``num_workers=0`` means one worker, the main process.
4. **Window shuffle.** With ``shuffle=True`` a worker permutes its samples within consecutive windows
   of ``shuffle_window`` samples, seeded by ``(seed, epoch, rank, worker_id)``. This plays the role of a
   bounded shuffle buffer while staying a pure function: resuming after ``k`` yielded samples is just
   skipping ``k`` entries of :meth:`WorkerPlan.indices`.

Each worker therefore reads one contiguous segment of the (cyclic) stream. If every span in the stream
holds at least ``m`` samples, a segment of ``n`` samples fully contains at most ``n // m`` spans and
touches at most two more at its ends, so a worker opens at most ``n // m + 2`` shards. (The window
shuffle interleaves reads from the spans of one window, so up to ``shuffle_window // m + 2`` of them
are in use at a time.)

Resuming with another world size or worker count: :meth:`WorkerPlan.remaining_spans` gives what a
worker has not yet yielded, and :func:`plan_spans` splits such an *explicit* list of spans (gathered
rank-major from every worker) instead of a whole manifest, re-planning the rest of the epoch for the
new topology with the same guarantees.

Example:
    >>> plan = plan_worker([3, 0, 5], world_size=2, rank=1, num_workers=0, worker_id=0,
    ...                    epoch=0, seed=0, shuffle=False, drop_last=False)
    >>> plan.spans
    ((2, 1, 5),)
    >>> plan.indices().tolist()
    [4, 5, 6, 7]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Span",
    "WorkerPlan",
    "epoch_spans",
    "plan_epoch",
    "plan_spans",
    "plan_worker",
    "samples_per_rank",
]

Span = tuple[int, int, int]
"""``(shard, start, stop)``: samples ``start <= i < stop`` of shard ``shard`` (local indices)."""

_IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class WorkerPlan:
    """The samples one DataLoader worker of one rank yields in one epoch.

    Attributes:
        rank: The rank this plan is for.
        worker_id: The DataLoader worker this plan is for (``0`` when ``num_workers=0``).
        spans: The spans the worker reads, in read order, before the window shuffle.
        span_offsets: The global index of each span's first sample (``offset[shard] + start``).
        shuffle_window: Window of the within-worker shuffle; ``0`` when there is none.
        window_entropy: Entropy for ``numpy.random.SeedSequence`` seeding the window shuffle.
    """

    rank: int
    worker_id: int
    spans: tuple[Span, ...]
    span_offsets: tuple[int, ...]
    shuffle_window: int = 0
    window_entropy: tuple[int, ...] = ()

    # The span totals below are cached: a reader asks for them once per window. cached_property stores them in the
    # instance __dict__, which a frozen dataclass allows; __eq__ and __hash__ compare the fields only.

    @cached_property
    def num_samples(self) -> int:
        """How many samples the worker yields."""
        return sum(stop - start for _, start, stop in self.spans)

    @cached_property
    def _lengths(self) -> _IntArray:
        """Samples in each span."""
        return _read_only(np.fromiter((stop - start for _, start, stop in self.spans), np.int64, len(self.spans)))

    @cached_property
    def _ends(self) -> _IntArray:
        """The read position just past each span: the cumsum of :attr:`_lengths`."""
        return _read_only(np.cumsum(self._lengths))

    @cached_property
    def _firsts(self) -> _IntArray:
        """:attr:`span_offsets` as an array."""
        return _read_only(np.asarray(self.span_offsets, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the fields only, as before the caches existed: the caches are rebuilt on first use.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def shard_ids(self) -> tuple[int, ...]:
        """The distinct shards the worker reads, in the order it first reads them."""
        return tuple(dict.fromkeys(shard for shard, _, _ in self.spans))

    @property
    def shards_opened(self) -> int:
        """How many distinct shards the worker reads."""
        return len(self.shard_ids)

    def span_indices(self) -> _IntArray:
        """Global sample indices in read order, before the window shuffle."""
        return self.read_indices(0, self.num_samples)

    def read_indices(self, lo: int, hi: int) -> _IntArray:
        """Global sample indices of read positions ``[lo, hi)`` (before the window shuffle), by span arithmetic."""
        if hi <= lo or not self.spans:
            return np.zeros(0, dtype=np.int64)
        lengths, ends, firsts = self._lengths, self._ends, self._firsts
        positions = np.arange(lo, hi, dtype=np.int64)
        span = np.searchsorted(ends, positions, side="right")
        # Within span j, read position p holds firsts[j] + (p - start of span j in the read order).
        return firsts[span] + positions - (ends[span] - lengths[span])

    def indices(self) -> _IntArray:
        """Global sample indices in the order the worker yields them.

        Position ``p`` holds a sample from the same window ``p // shuffle_window`` as in
        :meth:`span_indices`, so the shuffle never moves a sample further than one window.
        """
        return self.indices_between(0, self.num_samples)

    def indices_between(self, lo: int, hi: int) -> _IntArray:
        """Global sample indices at yield positions ``[lo, hi)``, computing only the windows they touch.

        Memory is proportional to ``hi - lo`` (plus a window), not to the worker's whole plan, so a reader
        can walk a long plan a window at a time.
        """
        hi = min(hi, self.num_samples)
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        window = self.shuffle_window
        if window <= 1:
            return self.read_indices(lo, hi)
        first, last = lo // window, (hi - 1) // window
        base = first * window
        read = self.read_indices(base, min((last + 1) * window, self.num_samples))
        order = np.concatenate([self.window_order(k) + (k * window - base) for k in range(first, last + 1)])
        picked: _IntArray = read[order[lo - base : hi - base]]
        return picked

    def window_order(self, k: int) -> _IntArray:
        """Read-order positions of window ``k`` in yield order, relative to the window's start.

        Each window is permuted by its own generator, seeded by ``(window_entropy, k)``, so any window can be
        computed without the ones before it.
        """
        window = self.shuffle_window
        size = min(window, self.num_samples - k * window) if window > 1 else 1
        if window <= 1 or size <= 1:
            return np.arange(max(size, 0), dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self.window_entropy, k])))
        return rng.permutation(size).astype(np.int64)

    def yield_order(self) -> _IntArray:
        """Read-order positions in yield order: ``indices() == span_indices()[yield_order()]``."""
        n = self.num_samples
        window = self.shuffle_window
        if window <= 1 or n <= 1:
            return np.arange(n, dtype=np.int64)
        windows = -(-n // window)
        return np.concatenate([self.window_order(k) + k * window for k in range(windows)])

    def remaining_spans(self, consumed: int) -> list[Span]:
        """The spans this worker has not yet yielded after yielding its first ``consumed`` samples.

        Samples of the window in progress come first, as single runs in read order, then the rest of
        the worker's spans. Gather these from every worker of every rank (rank-major) and pass them to
        :func:`plan_spans` to finish the epoch on another world size or number of workers. With
        ``drop_last=False`` a padding repeat may be yielded once more than in an uninterrupted epoch.

        Args:
            consumed: How many of :meth:`indices` the worker has yielded, ``0 <= consumed <= num_samples``.

        Returns:
            The remaining spans ``(shard, start, stop)`` in read order.

        Raises:
            ValueError: If ``consumed`` is out of range.
        """
        n = self.num_samples
        if not 0 <= consumed <= n:
            raise ValueError(
                f"Expected 0 <= consumed <= num_samples, got consumed={consumed!r} with num_samples={n!r}."
            )
        window = self.shuffle_window
        boundary = consumed if window <= 1 else min(-(-consumed // window) * window, n)
        spans: list[Span] = []
        if boundary > consumed:
            # The window in progress: its not-yet-yielded positions, grouped into consecutive runs.
            k = consumed // window
            left = np.sort(self.window_order(k)[consumed - k * window : boundary - k * window] + k * window)
            breaks = np.flatnonzero(np.diff(left) != 1) + 1
            for run in np.split(left, breaks):
                spans.extend(self._slice(int(run[0]), int(run[-1]) + 1))
        spans.extend(self._slice(boundary, n))
        return spans

    def _slice(self, lo: int, hi: int) -> list[Span]:
        """The spans of read-order positions ``[lo, hi)``."""
        out: list[Span] = []
        for k, front, back in _cuts(self._ends, lo, hi):
            shard, start, stop = self.spans[k]
            out.append((shard, start + front, stop - back))
        return out


def _read_only(array: _IntArray) -> _IntArray:
    array.flags.writeable = False  # cached and shared by every call: no caller may change it
    return array


def _cuts(ends: _IntArray, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """The spans that read positions ``[lo, hi)`` touch, as ``(k, front, back)``.

    Positions ``[lo, hi)`` hold span ``k`` less ``front`` samples at its start and ``back`` at its end;
    ``ends`` is the cumsum of the span lengths (the read position just past each span).
    """
    if lo >= hi:
        return
    first = int(np.searchsorted(ends, lo, side="right"))
    last = int(np.searchsorted(ends, hi - 1, side="right"))
    for k in range(first, last + 1):
        span_begin = int(ends[k - 1]) if k else 0
        yield k, max(0, lo - span_begin), max(0, int(ends[k]) - hi)


def samples_per_rank(total: int, world_size: int, drop_last: bool) -> int:
    """How many samples every rank yields in an epoch of ``total`` samples.

    Args:
        total: Samples in the epoch, ``>= 0``.
        world_size: Number of ranks, ``>= 1``.
        drop_last: Drop the last ``total % world_size`` samples (``total // world_size`` per rank)
            instead of padding with up to ``world_size - 1`` repeats (``ceil(total / world_size)``).

    Returns:
        The number of samples each rank yields; the same for every rank.

    Raises:
        ValueError: If ``total < 0`` or ``world_size < 1``.
    """
    if total < 0:
        raise ValueError(f"Expected total >= 0 samples, got total={total!r}.")
    _check_world(world_size, 0)
    return total // world_size if drop_last else -(-total // world_size)


def epoch_spans(
    shard_sizes: Sequence[int],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    span_samples: int | None = None,
) -> list[Span]:
    """The epoch stream: non-empty spans in the order they are read this epoch.

    Args:
        shard_sizes: Number of samples in each shard, in manifest order; empty shards are allowed.
        epoch: Epoch number, ``>= 0``; with ``shuffle=True`` each epoch gets its own order.
        seed: Seed shared by every process, ``>= 0``.
        shuffle: Permute the spans with ``PCG64(SeedSequence([seed, epoch]))``; else manifest order.
        span_samples: Split shards into spans of at most this many samples, so that a huge shard is
            shuffled at span granularity. ``None`` keeps whole shards.

    Returns:
        The spans ``(shard, start, stop)`` of the stream, in order.

    Raises:
        ValueError: On a negative shard size, epoch or seed, or ``span_samples < 1``.
    """
    _check_stream(epoch, seed, span_samples)
    sizes = _sizes_array(shard_sizes)
    shard, start, stop = _epoch_arrays(sizes, epoch=epoch, seed=seed, shuffle=shuffle, span_samples=span_samples)
    return list(zip(shard.tolist(), start.tolist(), stop.tolist(), strict=True))


def plan_worker(
    shard_sizes: Sequence[int],
    *,
    world_size: int,
    rank: int,
    num_workers: int,
    worker_id: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    batch_size: int = 1,
    shuffle_window: int = 1024,
    span_samples: int | None = None,
) -> WorkerPlan:
    """The samples that worker ``worker_id`` of rank ``rank`` yields in ``epoch``.

    Costs ``O(num_spans + samples of this worker)``; call it in every worker at the start of an epoch.

    Args:
        shard_sizes: Number of samples in each shard, in manifest order; empty shards are allowed.
        world_size: Number of ranks, ``>= 1``.
        rank: This process's global rank, ``0 <= rank < world_size``.
        num_workers: The DataLoader's ``num_workers``, ``>= 0``; ``0`` means the main process only.
        worker_id: This DataLoader worker, ``0 <= worker_id < max(num_workers, 1)``.
        epoch: Epoch number, ``>= 0``.
        seed: Seed shared by every process, ``>= 0``.
        shuffle: Shuffle the span order per epoch and the samples within windows per worker.
        drop_last: Drop up to ``world_size - 1`` samples instead of padding with as many repeats.
        batch_size: Samples per batch, ``>= 1``; workers get whole batches except the last one.
        shuffle_window: Window of the within-worker shuffle; ``0`` or ``1`` disables it.
        span_samples: Split shards into spans of at most this many samples; ``None`` keeps whole shards.

    Returns:
        The worker's plan.

    Raises:
        ValueError: If any argument is out of range; the message names it.
    """
    _check_split(world_size, rank, num_workers, worker_id, batch_size, shuffle_window)
    sizes = _sizes_array(shard_sizes)  # convert a long list once
    _check_stream(epoch, seed, span_samples)
    table = _epoch_arrays(sizes, epoch=epoch, seed=seed, shuffle=shuffle, span_samples=span_samples)
    return _plan(
        table,
        _offsets(sizes),
        world_size=world_size,
        rank=rank,
        num_workers=num_workers,
        worker_id=worker_id,
        entropy=(seed, epoch),
        window=shuffle_window if shuffle else 0,
        drop_last=drop_last,
        batch_size=batch_size,
    )


def plan_spans(
    spans: Sequence[Span],
    shard_sizes: Sequence[int],
    *,
    world_size: int,
    rank: int,
    num_workers: int,
    worker_id: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    batch_size: int = 1,
    shuffle_window: int = 1024,
) -> WorkerPlan:
    """Like :func:`plan_worker`, but splits an explicit stream of spans, taken in the order given.

    This is the building block for elastic resumption: pass the spans that remain of an epoch and
    plan them for a new ``world_size`` or ``num_workers``; every guarantee of :func:`plan_worker`
    then holds for the remaining samples. The spans are not reordered here; ``shuffle`` only enables
    the within-worker window shuffle.

    Args:
        spans: The stream, ``(shard, start, stop)`` with ``0 <= start <= stop <= shard_sizes[shard]``.
        shard_sizes: Number of samples in each shard, in manifest order, for the global numbering.
        world_size: Number of ranks, ``>= 1``.
        rank: This process's global rank, ``0 <= rank < world_size``.
        num_workers: The DataLoader's ``num_workers``, ``>= 0``.
        worker_id: This DataLoader worker, ``0 <= worker_id < max(num_workers, 1)``.
        epoch: Epoch number, ``>= 0``; seeds the window shuffle.
        seed: Seed shared by every process, ``>= 0``; seeds the window shuffle.
        shuffle: Shuffle within windows of ``shuffle_window`` samples.
        drop_last: Drop up to ``world_size - 1`` samples instead of padding with as many repeats.
        batch_size: Samples per batch, ``>= 1``.
        shuffle_window: Window of the within-worker shuffle; ``0`` or ``1`` disables it.

    Returns:
        The worker's plan.

    Raises:
        ValueError: If any argument or span is out of range; the message names it.
    """
    _check_split(world_size, rank, num_workers, worker_id, batch_size, shuffle_window)
    _check_seed(epoch, seed)
    sizes = _sizes_array(shard_sizes)
    offsets = _offsets(sizes)
    table = _span_arrays(spans, sizes)
    return _plan(
        table,
        offsets,
        world_size=world_size,
        rank=rank,
        num_workers=num_workers,
        worker_id=worker_id,
        entropy=(seed, epoch),
        window=shuffle_window if shuffle else 0,
        drop_last=drop_last,
        batch_size=batch_size,
    )


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    world_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    batch_size: int = 1,
    shuffle_window: int = 1024,
    span_samples: int | None = None,
) -> list[list[WorkerPlan]]:
    """Every worker's plan for one epoch, indexed ``[rank][worker_id]``; see :func:`plan_worker`.

    Args:
        shard_sizes: Number of samples in each shard, in manifest order; empty shards are allowed.
        world_size: Number of ranks, ``>= 1``.
        num_workers: The DataLoader's ``num_workers``, ``>= 0``; ``0`` gives one plan per rank.
        epoch: Epoch number, ``>= 0``.
        seed: Seed shared by every process, ``>= 0``.
        shuffle: Shuffle the span order per epoch and the samples within windows per worker.
        drop_last: Drop up to ``world_size - 1`` samples instead of padding with as many repeats.
        batch_size: Samples per batch, ``>= 1``.
        shuffle_window: Window of the within-worker shuffle; ``0`` or ``1`` disables it.
        span_samples: Split shards into spans of at most this many samples; ``None`` keeps whole shards.

    Returns:
        ``plans[rank][worker_id]`` for every rank and worker.

    Raises:
        ValueError: If any argument is out of range; the message names it.
    """
    _check_split(world_size, 0, num_workers, 0, batch_size, shuffle_window)
    sizes = _sizes_array(shard_sizes)  # convert a long list once
    _check_stream(epoch, seed, span_samples)
    table = _epoch_arrays(sizes, epoch=epoch, seed=seed, shuffle=shuffle, span_samples=span_samples)
    offsets = _offsets(sizes)
    return [
        [
            _plan(
                table,
                offsets,
                world_size=world_size,
                rank=rank,
                num_workers=num_workers,
                worker_id=worker_id,
                entropy=(seed, epoch),
                window=shuffle_window if shuffle else 0,
                drop_last=drop_last,
                batch_size=batch_size,
            )
            for worker_id in range(max(num_workers, 1))
        ]
        for rank in range(world_size)
    ]


# --- validation -----------------------------------------------------------------------------------


def _check_world(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise ValueError(f"Expected world_size >= 1, got world_size={world_size!r}; pass the number of processes.")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"Expected 0 <= rank < world_size, got rank={rank!r} with world_size={world_size!r}; "
            "pass the process's global rank."
        )


def _check_split(
    world_size: int, rank: int, num_workers: int, worker_id: int, batch_size: int, shuffle_window: int
) -> None:
    _check_world(world_size, rank)
    if num_workers < 0:
        raise ValueError(f"Expected num_workers >= 0, got num_workers={num_workers!r}; use 0 for the main process.")
    if not 0 <= worker_id < max(num_workers, 1):
        raise ValueError(
            f"Expected 0 <= worker_id < max(num_workers, 1), got worker_id={worker_id!r} with "
            f"num_workers={num_workers!r}; pass `torch.utils.data.get_worker_info().id` (0 in the main process)."
        )
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1, got batch_size={batch_size!r}.")
    if shuffle_window < 0:
        raise ValueError(f"Expected shuffle_window >= 0, got shuffle_window={shuffle_window!r}; use 0 to disable it.")


def _check_seed(epoch: int, seed: int) -> None:
    if epoch < 0:
        raise ValueError(f"Expected epoch >= 0, got epoch={epoch!r}.")
    if seed < 0:
        raise ValueError(f"Expected seed >= 0, got seed={seed!r}; numpy's SeedSequence takes non-negative seeds.")


def _check_stream(epoch: int, seed: int, span_samples: int | None) -> None:
    _check_seed(epoch, seed)
    if span_samples is not None and span_samples < 1:
        raise ValueError(
            f"Expected span_samples >= 1 or None, got span_samples={span_samples!r}; use None for whole shards."
        )


def _sizes_array(shard_sizes: Sequence[int] | _IntArray) -> _IntArray:
    sizes = np.asarray(shard_sizes, dtype=np.int64).reshape(-1)
    if sizes.size and int(sizes.min()) < 0:
        bad = int(np.flatnonzero(sizes < 0)[0])
        raise ValueError(
            f"Expected shard sizes >= 0, got shard_sizes[{bad}]={int(sizes[bad])!r}; "
            "a shard size is its number of samples."
        )
    return sizes


def _offsets(sizes: _IntArray) -> _IntArray:
    return np.cumsum(sizes) - sizes


# --- span tables ----------------------------------------------------------------------------------

_Table = tuple[_IntArray, _IntArray, _IntArray]
"""Spans as three parallel arrays: shard, start, stop."""


# The helpers below take sizes already checked by _sizes_array, and arguments checked by _check_stream.


def _epoch_arrays(sizes: _IntArray, *, epoch: int, seed: int, shuffle: bool, span_samples: int | None) -> _Table:
    shard = np.flatnonzero(sizes > 0).astype(np.int64)
    lengths = sizes[shard]
    if span_samples is None:
        start = np.zeros_like(shard)
        stop = lengths
    else:
        pieces = -(-lengths // span_samples)
        total = int(pieces.sum())
        first_piece = np.cumsum(pieces) - pieces
        shard = np.repeat(shard, pieces)
        piece = np.arange(total, dtype=np.int64) - np.repeat(first_piece, pieces)
        start = piece * span_samples
        stop = np.minimum(start + span_samples, np.repeat(lengths, pieces))
    if shuffle and shard.size > 1:
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(shard.size)
        shard, start, stop = shard[order], start[order], stop[order]
    return shard, start, stop


def _span_arrays(spans: Sequence[Span], sizes: _IntArray) -> _Table:
    table = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
    shard, start, stop = table[:, 0], table[:, 1], table[:, 2]
    bad = (shard < 0) | (shard >= sizes.size) | (start < 0) | (stop < start)
    if sizes.size:
        bad |= stop > sizes[np.clip(shard, 0, sizes.size - 1)]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"Expected spans (shard, start, stop) with 0 <= shard < {sizes.size} and "
            f"0 <= start <= stop <= shard_sizes[shard], got spans[{i}]={tuple(int(v) for v in table[i])!r}."
        )
    keep = stop > start
    return shard[keep], start[keep], stop[keep]


# --- the split ------------------------------------------------------------------------------------


def _worker_bounds(per_rank: int, num_workers: int, worker_id: int, batch_size: int) -> tuple[int, int]:
    """The worker's ``[begin, end)`` within its rank's ``per_rank`` samples, in whole batches."""
    workers = max(num_workers, 1)
    batches = -(-per_rank // batch_size)
    base, extra = divmod(batches, workers)
    first = worker_id * base + min(worker_id, extra)
    last = first + base + (1 if worker_id < extra else 0)
    return min(first * batch_size, per_rank), min(last * batch_size, per_rank)


def _plan(
    table: _Table,
    offsets: _IntArray,
    *,
    world_size: int,
    rank: int,
    num_workers: int,
    worker_id: int,
    entropy: tuple[int, int],
    window: int,
    drop_last: bool,
    batch_size: int,
) -> WorkerPlan:
    shard, start, stop = table
    ends = np.cumsum(stop - start)
    total = int(ends[-1]) if ends.size else 0
    per_rank = samples_per_rank(total, world_size, drop_last)
    begin, end = _worker_bounds(per_rank, num_workers, worker_id, batch_size)
    begin, end = begin + rank * per_rank, end + rank * per_rank
    spans: list[Span] = []
    firsts: list[int] = []
    # Positions past the stream's end wrap to its start (padding); a segment is at most `total` long
    # because per_rank <= total, so it wraps at most once.
    while end > begin:
        lo = begin % total
        hi = min(total, lo + (end - begin))
        for k, front, back in _cuts(ends, lo, hi):
            s0 = int(start[k]) + front
            spans.append((int(shard[k]), s0, int(stop[k]) - back))
            firsts.append(int(offsets[shard[k]]) + s0)
        begin += hi - lo
    return WorkerPlan(
        rank=rank,
        worker_id=worker_id,
        spans=tuple(spans),
        span_offsets=tuple(firsts),
        shuffle_window=window if window > 1 else 0,
        window_entropy=(*entropy, rank, worker_id) if window > 1 else (),
    )
