"""Which samples each rank and DataLoader worker yields in an epoch: a pure function, no communication.

Samples are numbered globally in manifest order: sample ``g = offset[s] + i`` is the ``i``-th sample of
shard ``s``, where ``offset[s]`` is the sum of the sizes of the shards before ``s``. A *span*
``(shard, start, stop)`` is the contiguous run ``start <= i < stop`` of one shard.

:func:`plan` gives one worker's samples from a :class:`PlanConfig` (the shard sizes and the batching and
shuffling settings), a :class:`~lightning_patterns.data.sharding.topology.Topology` (which rank and worker)
and the epoch; :func:`plan_epoch` gives every worker's at once. The plan is built in four steps, all of
which every process computes on its own from the same arguments (so ranks agree without talking to each
other):

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

Class coverage. With ``min_per_class = k`` and each shard's label histogram (``class_counts``), step 1
makes sure every worker of every rank holds at least ``k`` samples of each class per batch that must
hold them (:func:`~lightning_patterns.data.sharding.class_stream.class_quota`): it keeps the plain stream
when its spans guarantee that (a lower bound from the histograms), else it uses the class-sorted stream of
:mod:`~lightning_patterns.data.sharding.class_stream`, in which every stretch holds each class in
proportion; each worker's class counts are then the same in every epoch. If neither covers every worker,
:func:`plan` raises :class:`~lightning_patterns.exceptions.ClassCoverageError` naming the ranks, workers
and classes that fall short; :func:`check_class_coverage` raises it up front, at construction. Steps 2 to 4
are the same for both streams, so every guarantee above holds either way.

Resuming with another world size or worker count: :meth:`WorkerPlan.remaining_spans` gives what a
worker has not yet yielded, and ``plan(..., resume=spans)`` takes such an *explicit* list of spans
(gathered rank-major from every worker) as the stream instead of step 1, re-planning the rest of the
epoch for the new topology with the same guarantees.

Example:
    >>> config = PlanConfig(shard_sizes=(3, 0, 5))
    >>> worker = plan(config, Topology(world_size=2, rank=1), epoch=0)
    >>> worker.spans
    ((2, 1, 5),)
    >>> worker.indices().tolist()
    [4, 5, 6, 7]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.sharding.class_stream import (
    MAX_ROUNDS,
    class_quota,
    class_stream,
    histogram_table,
    segment_class_counts,
)
from lightning_patterns.data.sharding.topology import Topology, check_rank
from lightning_patterns.exceptions import ClassCoverageError

__all__ = [
    "PlanConfig",
    "Span",
    "WorkerPlan",
    "check_class_coverage",
    "epoch_spans",
    "plan",
    "plan_epoch",
    "samples_per_rank",
]

Span = tuple[int, int, int]
"""``(shard, start, stop)``: samples ``start <= i < stop`` of shard ``shard`` (local indices)."""

_IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PlanConfig:
    """Everything besides the topology and the epoch that decides which samples a worker yields.

    Args:
        shard_sizes: Samples in each shard, in manifest order; empty shards are allowed. Any sequence of
            ints; kept as a tuple, so that two configs compare equal when they plan the same samples.
        batch_size: Samples per batch, ``>= 1``; workers get whole batches except the last one.
        seed: Seed shared by every process, ``>= 0``.
        shuffle: Shuffle the span order per epoch and the samples within windows per worker.
        drop_last: Drop up to ``world_size - 1`` samples instead of padding with as many repeats.
        shuffle_window: Window of the within-worker shuffle; ``0`` or ``1`` disables it.
        span_samples: Split shards into spans of at most this many samples, so that a huge shard is
            shuffled at span granularity; ``None`` keeps whole shards.
        class_counts: Each shard's label histogram (samples of class ``0, 1, ...``; rows sum to the shard
            sizes), kept as a tuple of tuples padded to the number of classes; ``None`` when unknown.
        min_per_class: Samples of each class every batch must be able to hold (``0``: no class requirement);
            needs ``class_counts``. See "Class coverage" in the module docs.

    Raises:
        ValueError: If any value is out of range; the message names it.
    """

    shard_sizes: Sequence[int]
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = False
    drop_last: bool = False
    shuffle_window: int = 1024
    span_samples: int | None = None
    class_counts: Sequence[Sequence[int]] | None = None
    min_per_class: int = 0

    def __post_init__(self) -> None:
        sizes = _sizes_array(self.shard_sizes)
        object.__setattr__(self, "shard_sizes", tuple(sizes.tolist()))
        if self.batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1, got batch_size={self.batch_size!r}.")
        if self.seed < 0:
            raise ValueError(
                f"Expected seed >= 0, got seed={self.seed!r}; numpy's SeedSequence takes non-negative seeds."
            )
        if self.shuffle_window < 0:
            raise ValueError(
                f"Expected shuffle_window >= 0, got shuffle_window={self.shuffle_window!r}; use 0 to disable it."
            )
        if self.span_samples is not None and self.span_samples < 1:
            raise ValueError(
                f"Expected span_samples >= 1 or None, got span_samples={self.span_samples!r}; "
                "use None for whole shards."
            )
        if self.class_counts is not None:
            table = histogram_table(self.class_counts, sizes)
            object.__setattr__(self, "class_counts", tuple(tuple(row) for row in table.tolist()))
        if isinstance(self.min_per_class, bool) or not isinstance(self.min_per_class, int) or self.min_per_class < 0:
            raise ValueError(f"Expected min_per_class >= 0, got min_per_class={self.min_per_class!r}; 0 disables it.")
        if self.min_per_class and self.class_counts is None:
            raise ValueError(
                f"min_per_class={self.min_per_class} needs class_counts (each shard's label histogram) to plan "
                "every rank's classes; pass them, or min_per_class=0."
            )
        if self.min_per_class * self.num_classes > self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} cannot hold min_per_class={self.min_per_class} samples of each of "
                f"{self.num_classes} classes: raise batch_size to {self.min_per_class * self.num_classes} or lower "
                "min_per_class."
            )

    @property
    def num_classes(self) -> int:
        """Classes in ``class_counts`` (``0`` without them)."""
        return len(self.class_counts[0]) if self.class_counts else 0

    def to_state(self) -> dict[str, Any]:
        """A plain dict of builtins, for state dicts and checkpoints."""
        state = asdict(self)
        state["shard_sizes"] = list(self.shard_sizes)
        if self.class_counts is not None:
            state["class_counts"] = [list(row) for row in self.class_counts]
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PlanConfig:
        """Rebuild from :meth:`to_state`'s dict."""
        return cls(**state)


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
        class_sorted: The spans count positions in each shard's *class order* (its samples sorted stably by
            label, see :mod:`~lightning_patterns.data.sharding.class_stream`), not in file order; so do the
            indices. A reader maps local position ``i`` of shard ``s`` to ``argsort(labels_s, stable)[i]``.
    """

    rank: int
    worker_id: int
    spans: tuple[Span, ...]
    span_offsets: tuple[int, ...]
    shuffle_window: int = 0
    window_entropy: tuple[int, ...] = ()
    class_sorted: bool = False

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
        :func:`plan` (as ``resume``) to finish the epoch on another world size or number of workers. With
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
    check_rank(0, world_size)
    return total // world_size if drop_last else -(-total // world_size)


def epoch_spans(config: PlanConfig, epoch: int) -> list[Span]:
    """The epoch stream (step 1): the non-empty spans in the order they are read in ``epoch``.

    Args:
        config: The shard sizes and the shuffle settings (``shuffle``, ``seed``, ``span_samples``).
        epoch: Epoch number, ``>= 0``; with ``shuffle=True`` each epoch gets its own order.

    Returns:
        The spans ``(shard, start, stop)`` of the stream, in order.

    Raises:
        ValueError: If ``epoch < 0``.
    """
    shard, start, stop = _stream(config, epoch, None)[0]
    return list(zip(shard.tolist(), start.tolist(), stop.tolist(), strict=True))


def plan(config: PlanConfig, topology: Topology, epoch: int, resume: Sequence[Span] | None = None) -> WorkerPlan:
    """The samples that one worker yields in ``epoch``.

    Costs ``O(num_spans + samples of this worker)``; call it in every worker at the start of an epoch.

    Args:
        config: The shard sizes and the batching and shuffling settings.
        topology: Which rank of how many, and which DataLoader worker of how many.
        epoch: Epoch number, ``>= 0``; seeds the span order and the window shuffle.
        resume: The spans that remain of an interrupted epoch, gathered rank-major from every worker of
            the job that stopped (:meth:`WorkerPlan.remaining_spans`), with
            ``0 <= start <= stop <= shard_sizes[shard]``. They are the stream, in the order given (not
            reordered; ``shuffle`` only enables the window shuffle), and every guarantee of a whole epoch
            holds for them. ``None`` plans the whole epoch. Not with ``min_per_class`` (class-balanced
            epochs resume by replaying their plan on the same topology).

    Returns:
        The worker's plan.

    Raises:
        ValueError: If ``epoch < 0`` or a span of ``resume`` is out of range; the message names it.
        ClassCoverageError: With ``min_per_class``, if no stream gives every worker enough of every class.
    """
    stream, offsets, class_sorted = _covering_stream(config, epoch, resume, topology.world_size, topology.num_workers)
    return _split(stream, offsets, config, topology, epoch, class_sorted)


def plan_epoch(
    config: PlanConfig, epoch: int, *, world_size: int, num_workers: int, resume: Sequence[Span] | None = None
) -> list[list[WorkerPlan]]:
    """Every worker's :func:`plan`, indexed ``[rank][worker_id]``; the stream is computed once.

    Args:
        config: The shard sizes and the batching and shuffling settings.
        epoch: Epoch number, ``>= 0``.
        world_size: Number of ranks, ``>= 1``.
        num_workers: The DataLoader's ``num_workers``, ``>= 0``; ``0`` gives one plan per rank.
        resume: The spans that remain of an interrupted epoch (see :func:`plan`); ``None`` for the whole epoch.

    Returns:
        ``plans[rank][worker_id]`` for every rank and worker.

    Raises:
        ValueError: If any argument is out of range; the message names it.
    """
    Topology(world_size, 0, num_workers, 0)  # check the job's shape even when it plans nothing
    stream, offsets, class_sorted = _covering_stream(config, epoch, resume, world_size, num_workers)
    return _split_all(stream, offsets, config, epoch, world_size, num_workers, class_sorted)


def check_class_coverage(config: PlanConfig, *, world_size: int, num_workers: int) -> None:
    """Raise unless every epoch can give every worker its ``min_per_class`` share of each class.

    The class-sorted stream gives every worker the same class counts in every epoch, so checking it once
    covers the whole run; without ``shuffle`` the plain stream is the same in every epoch, and it is
    accepted too. Call this at construction, so that a job that cannot be balanced fails before it starts.

    Args:
        config: The plan's settings, with ``class_counts`` and ``min_per_class``; nothing is checked when
            ``min_per_class`` is ``0``.
        world_size: Number of ranks, ``>= 1``.
        num_workers: The DataLoader's ``num_workers``, ``>= 0``.

    Raises:
        ClassCoverageError: Naming the ranks, workers and classes that would fall short, with what they
            would get and what they need.
    """
    Topology(world_size, 0, num_workers, 0)
    if not config.min_per_class:
        return
    sizes, hist, offsets = _class_inputs(config)
    stream = _class_sorted_stream(config, sizes, hist, 0)
    short = _shortfalls(stream, offsets, config, world_size, num_workers, class_sorted=True)
    if short and not config.shuffle:
        plain = _stream(config, 0, None)[0]
        if not _shortfalls(plain, offsets, config, world_size, num_workers, class_sorted=False):
            return
    if short:
        raise ClassCoverageError(_coverage_message(config, world_size, num_workers, short))


# --- the stream (step 1) --------------------------------------------------------------------------

_Table = tuple[_IntArray, _IntArray, _IntArray]
"""Spans as three parallel arrays: shard, start, stop."""


def _sizes_array(shard_sizes: Sequence[int] | _IntArray) -> _IntArray:
    sizes = np.asarray(shard_sizes, dtype=np.int64).reshape(-1)
    if sizes.size and int(sizes.min()) < 0:
        bad = int(np.flatnonzero(sizes < 0)[0])
        raise ValueError(
            f"Expected shard sizes >= 0, got shard_sizes[{bad}]={int(sizes[bad])!r}; "
            "a shard size is its number of samples."
        )
    return sizes


def _stream(config: PlanConfig, epoch: int, resume: Sequence[Span] | None) -> tuple[_Table, _IntArray]:
    """The stream as a span table, and each shard's global offset."""
    if epoch < 0:
        raise ValueError(f"Expected epoch >= 0, got epoch={epoch!r}.")
    sizes = np.asarray(config.shard_sizes, dtype=np.int64).reshape(-1)  # checked by PlanConfig
    table = _epoch_arrays(sizes, config, epoch) if resume is None else _span_arrays(resume, sizes)
    return table, np.cumsum(sizes) - sizes


def _epoch_arrays(sizes: _IntArray, config: PlanConfig, epoch: int) -> _Table:
    shard = np.flatnonzero(sizes > 0).astype(np.int64)
    lengths = sizes[shard]
    span_samples = config.span_samples
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
    if config.shuffle and shard.size > 1:
        seeds = np.random.SeedSequence([config.seed, epoch])
        order = np.random.Generator(np.random.PCG64(seeds)).permutation(shard.size)
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
            f"Expected resume spans (shard, start, stop) with 0 <= shard < {sizes.size} and "
            f"0 <= start <= stop <= shard_sizes[shard], got resume[{i}]={tuple(int(v) for v in table[i])!r}."
        )
    keep = stop > start
    return shard[keep], start[keep], stop[keep]


# --- class coverage (step 1 with min_per_class) -----------------------------------------------------

_Shortfall = tuple[int, int, int, int, int]
"""``(rank, worker_id, class, samples it would get, samples it needs)``."""


def _class_inputs(config: PlanConfig) -> tuple[_IntArray, _IntArray, _IntArray]:
    sizes = np.asarray(config.shard_sizes, dtype=np.int64).reshape(-1)
    hist = np.asarray(config.class_counts, dtype=np.int64).reshape(sizes.size, config.num_classes)
    return sizes, hist, np.cumsum(sizes) - sizes


def _class_sorted_stream(config: PlanConfig, sizes: _IntArray, hist: _IntArray, epoch: int) -> _Table:
    rounds = max(1, min(-(-int(sizes.sum()) // config.batch_size), MAX_ROUNDS))
    return class_stream(
        sizes,
        hist,
        rounds=rounds,
        span_samples=config.span_samples,
        shuffle=config.shuffle,
        seed=config.seed,
        epoch=epoch,
    )


def _covering_stream(
    config: PlanConfig, epoch: int, resume: Sequence[Span] | None, world_size: int, num_workers: int
) -> tuple[_Table, _IntArray, bool]:
    """The epoch's stream, its shard offsets, and whether it is class-sorted (see "Class coverage")."""
    stream, offsets = _stream(config, epoch, resume)
    if not config.min_per_class:
        return stream, offsets, False
    if resume is not None:
        raise ValueError(
            "A class-balanced plan (min_per_class > 0) cannot be re-planned from resume spans: resume it by "
            "replaying the epoch's plan on the topology that saved it."
        )
    if not _shortfalls(stream, offsets, config, world_size, num_workers, class_sorted=False):
        return stream, offsets, False
    sizes, hist, _ = _class_inputs(config)
    stream = _class_sorted_stream(config, sizes, hist, epoch)
    short = _shortfalls(stream, offsets, config, world_size, num_workers, class_sorted=True)
    if short:
        raise ClassCoverageError(_coverage_message(config, world_size, num_workers, short))
    return stream, offsets, True


def _shortfalls(
    stream: _Table, offsets: _IntArray, config: PlanConfig, world_size: int, num_workers: int, *, class_sorted: bool
) -> list[_Shortfall]:
    """Every (rank, worker, class) whose samples (exact when class-sorted, else a lower bound) fall short."""
    sizes, hist, _ = _class_inputs(config)
    k, num_classes = config.min_per_class, config.num_classes
    lengths = stream[2] - stream[1]
    total = int(lengths.sum())
    per_rank = samples_per_rank(total, world_size, config.drop_last)
    slots: list[tuple[int, int, int]] = []  # (rank, worker, samples)
    segments: list[tuple[int, int]] = []
    owners: list[int] = []
    for rank in range(world_size):
        for worker in range(max(num_workers, 1)):
            begin, end = _worker_bounds(per_rank, num_workers, worker, config.batch_size)
            begin, end = begin + rank * per_rank, end + rank * per_rank
            slots.append((rank, worker, end - begin))
            # As in _split: positions past the stream's end wrap to its start, at most once.
            while end > begin:
                lo = begin % total
                hi = min(total, lo + (end - begin))
                segments.append((lo, hi))
                owners.append(len(slots) - 1)
                begin += hi - lo
    per_segment = segment_class_counts(stream, segments, sizes, hist, class_sorted=class_sorted)
    have = np.zeros((len(slots), num_classes), dtype=np.int64)
    np.add.at(have, np.asarray(owners, dtype=np.int64), per_segment)
    short: list[_Shortfall] = []
    for (rank, worker, samples), counts in zip(slots, have, strict=True):
        need = class_quota(samples, config.batch_size, k, num_classes)
        short.extend((rank, worker, int(c), int(counts[c]), need) for c in np.flatnonzero(counts < need))
    return short


def _coverage_message(config: PlanConfig, world_size: int, num_workers: int, short: list[_Shortfall]) -> str:
    by_worker: dict[tuple[int, int], list[str]] = {}
    for rank, worker, klass, have, need in short:
        by_worker.setdefault((rank, worker), []).append(f"class {klass} ({have} of {need})")
    shown = [
        f"rank {rank}" + (f" worker {worker}" if num_workers else "") + ": " + ", ".join(classes)
        for (rank, worker), classes in list(by_worker.items())[:8]
    ]
    more = f"; and {len(by_worker) - 8} more" if len(by_worker) > 8 else ""
    classes = sorted({klass for _, _, klass, _, _ in short})
    totals = np.asarray(config.class_counts, dtype=np.int64).reshape(-1, config.num_classes).sum(axis=0)
    # What the whole epoch needs of each class: the quotas of every worker together.
    per_rank = samples_per_rank(sum(config.shard_sizes), world_size, config.drop_last)
    needed = world_size * sum(
        class_quota(end - begin, config.batch_size, config.min_per_class, config.num_classes)
        for begin, end in (
            _worker_bounds(per_rank, num_workers, worker, config.batch_size) for worker in range(max(num_workers, 1))
        )
    )
    scarce = [c for c in classes if totals[c] < needed]
    overall = (
        "In all, "
        + " and ".join(f"class {c} has {int(totals[c])} samples" for c in scarce)
        + f" but {needed // config.min_per_class} batches × min_per_class={config.min_per_class} need {needed}. "
        if scarce
        else ""
    )
    return (
        f"min_per_class={config.min_per_class} with batch_size={config.batch_size} needs every DataLoader worker of "
        f"every rank (world_size={world_size}, num_workers={num_workers}) to hold {config.min_per_class} samples of "
        f"each of {config.num_classes} classes per batch, but some cannot, even with the classes spread evenly over "
        f"them (samples of the class they would get, of those they need): {'; '.join(shown)}{more}. {overall}Lower "
        f"min_per_class or batch_size, use fewer ranks or workers, or add samples of class "
        f"{', '.join(map(str, classes))}."
    )


# --- the split (steps 2 to 4) ---------------------------------------------------------------------


def _worker_bounds(per_rank: int, num_workers: int, worker_id: int, batch_size: int) -> tuple[int, int]:
    """The worker's ``[begin, end)`` within its rank's ``per_rank`` samples, in whole batches."""
    workers = max(num_workers, 1)
    batches = -(-per_rank // batch_size)
    base, extra = divmod(batches, workers)
    first = worker_id * base + min(worker_id, extra)
    last = first + base + (1 if worker_id < extra else 0)
    return min(first * batch_size, per_rank), min(last * batch_size, per_rank)


def _split_all(
    stream: _Table,
    offsets: _IntArray,
    config: PlanConfig,
    epoch: int,
    world_size: int,
    num_workers: int,
    class_sorted: bool,
) -> list[list[WorkerPlan]]:
    ends = np.cumsum(stream[2] - stream[1])  # once for every worker
    return [
        [
            _split(
                stream, offsets, config, Topology(world_size, rank, num_workers, worker_id), epoch, class_sorted, ends
            )
            for worker_id in range(max(num_workers, 1))
        ]
        for rank in range(world_size)
    ]


def _split(
    stream: _Table,
    offsets: _IntArray,
    config: PlanConfig,
    topology: Topology,
    epoch: int,
    class_sorted: bool = False,
    ends: _IntArray | None = None,
) -> WorkerPlan:
    shard, start, stop = stream
    ends = np.cumsum(stop - start) if ends is None else ends
    total = int(ends[-1]) if ends.size else 0
    rank = topology.rank
    per_rank = samples_per_rank(total, topology.world_size, config.drop_last)
    begin, end = _worker_bounds(per_rank, topology.num_workers, topology.worker_id, config.batch_size)
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
    window = config.shuffle_window if config.shuffle and config.shuffle_window > 1 else 0
    return WorkerPlan(
        rank=rank,
        worker_id=topology.worker_id,
        spans=tuple(spans),
        span_offsets=tuple(firsts),
        shuffle_window=window,
        window_entropy=(config.seed, epoch, rank, topology.worker_id) if window else (),
        class_sorted=class_sorted,
    )
