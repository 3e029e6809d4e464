"""Class-aware epoch streams: every rank and DataLoader worker gets enough samples of every class.

Class-balanced batches (``min_per_class = k``) need every worker to hold, for each class ``c``, at least
``k`` samples per batch of at least ``k·C`` samples (:func:`class_quota`). The plain stream of
:mod:`~lightning_patterns.data.sharding.assignment` cuts contiguous runs of shards per rank: with shards
split by label (``hash_key="label"``) a rank then sees only some classes. What a worker holds is computed
from each shard's label histogram ``hist[s, c]`` (recorded by the writer in the manifest, or counted from
the label column):

- **Plain spans** ``(s, a, b)`` in file order: a whole shard holds exactly ``hist[s]``; a part of ``L``
  samples holds at least ``max(0, L - (size[s] - hist[s, c]))`` of class ``c`` (:func:`span_class_counts`,
  a lower bound, exact for whole shards and for shards of one class).
- **Class-sorted spans** (:func:`class_stream`): each shard is read in *class order* (its samples sorted by
  label, stably), so local positions ``cum[s, c] <= i < cum[s, c + 1]`` (``cum`` the running sum of
  ``hist[s]``) are exactly its class-``c`` samples and every span's classes are known exactly.

:func:`class_stream` builds the class-sorted epoch stream in ``m`` *rounds*: class ``c``'s samples (its runs
in every shard, in manifest order, or permuted per epoch with ``shuffle``) are cut into ``m`` blocks of
``floor((i+1)·n_c/m) - floor(i·n_c/m)`` samples, and round ``i`` is block ``i`` of class 0, then of class 1,
and so on. Any stretch of the stream thus holds each class in proportion to its share of the dataset, up
to one block at either end, so the contiguous rank and worker split of the plan (steps 2 to 4, unchanged)
gives every worker its share of every class. The class of stream position ``p`` depends only on the class
totals ``n_c`` and ``m``, never on the epoch or the shuffle, so each worker's class counts are the same in
every epoch: a check at construction holds for the whole run. With ``m = min(ceil(N / batch_size),
MAX_ROUNDS)`` a round is about one batch, and the stream has at most ``pieces + C·m`` spans, where
``pieces`` is the number of non-empty (shard, class) runs, each cut into spans of ``span_samples``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_ROUNDS",
    "class_quota",
    "class_stream",
    "histogram_table",
    "segment_class_counts",
    "span_class_counts",
]

_IntArray = npt.NDArray[np.int64]
_Table = tuple[_IntArray, _IntArray, _IntArray]

# Rounds of the class-sorted stream at most: bounds its spans (and memory) to `pieces + C * MAX_ROUNDS`.
MAX_ROUNDS = 2**16


def histogram_table(class_counts: Sequence[Sequence[int]], sizes: _IntArray) -> _IntArray:
    """``hist[s, c]`` as an int64 array, rows padded with zeros to the longest; each row must sum to ``sizes[s]``.

    Raises:
        ValueError: a row count differs from the number of shards, a count is negative, or a row does not sum to
            its shard's size; the message names the shard.
    """
    if len(class_counts) != sizes.size:
        raise ValueError(
            f"Expected class_counts with one row per shard ({sizes.size}), got {len(class_counts)} rows; pass each "
            "shard's label histogram in manifest order."
        )
    width = max((len(row) for row in class_counts), default=0)
    hist = np.zeros((sizes.size, width), dtype=np.int64)
    for s, row in enumerate(class_counts):
        hist[s, : len(row)] = row
    bad = np.flatnonzero((hist < 0).any(axis=1) | (hist.sum(axis=1) != sizes))
    if bad.size:
        s = int(bad[0])
        raise ValueError(
            f"Expected class_counts[{s}] to be counts >= 0 summing to shard_sizes[{s}]={int(sizes[s])}, got "
            f"{list(class_counts[s])!r}."
        )
    return hist


def class_quota(num_samples: int, batch_size: int, min_per_class: int, num_classes: int) -> int:
    """Samples of each class a worker yielding ``num_samples`` needs: ``min_per_class`` per batch that must hold them.

    Batches are ``batch_size`` samples but the last; a batch smaller than ``min_per_class·num_classes`` cannot hold
    ``min_per_class`` of every class and is exempt (it is a tail batch of the balancer).
    """
    batches = -(-num_samples // batch_size)
    if batches == 0:
        return 0
    last = num_samples - (batches - 1) * batch_size
    return min_per_class * (batches - 1 + (last >= min_per_class * num_classes))


def span_class_counts(
    spans: Sequence[tuple[int, int, int]], sizes: _IntArray, hist: _IntArray, *, class_sorted: bool
) -> _IntArray:
    """Samples of each class that ``spans`` hold: exact for class-sorted spans, else a lower bound (module docs)."""
    num_classes = hist.shape[1]
    if not spans:
        return np.zeros(num_classes, dtype=np.int64)
    table = np.asarray(spans, dtype=np.int64).reshape(-1, 3)
    shard, start, stop = table[:, 0], table[:, 1:2], table[:, 2:3]
    rows = hist[shard]
    if class_sorted:
        cum = np.zeros((shard.size, num_classes + 1), dtype=np.int64)
        np.cumsum(rows, axis=1, out=cum[:, 1:])
        held = np.minimum(stop, cum[:, 1:]) - np.maximum(start, cum[:, :-1])
    else:
        held = np.maximum(0, (stop - start) - (sizes[shard][:, None] - rows))
    counts: _IntArray = np.maximum(held, 0).sum(axis=0)
    return counts


def _span_weights(
    shard: _IntArray, start: _IntArray, stop: _IntArray, sizes: _IntArray, cum: _IntArray, c: int, class_sorted: bool
) -> _IntArray:
    """Samples of class ``c`` in each span (parallel arrays): exact when class-sorted, else a lower bound.

    ``cum[s]`` is the running sum of shard ``s``'s histogram, from ``0``.
    """
    below, above = cum[shard, c], cum[shard, c + 1]
    if class_sorted:
        held: _IntArray = np.minimum(stop, above) - np.maximum(start, below)
    else:
        held = (stop - start) - (sizes[shard] - (above - below))
    return np.maximum(held, 0)


def segment_class_counts(
    stream: tuple[_IntArray, _IntArray, _IntArray],
    segments: Sequence[tuple[int, int]],
    sizes: _IntArray,
    hist: _IntArray,
    *,
    class_sorted: bool,
) -> _IntArray:
    """Samples of each class in each stretch ``[lo, hi)`` of stream positions, as :func:`span_class_counts` counts.

    Equal to :func:`span_class_counts` of the spans each stretch covers, computed with prefix sums per class
    (``O(C · spans + stretches)``), never building the stretches' span lists.

    Returns:
        ``counts[i, c]`` for stretch ``i`` and class ``c``.
    """
    shard, start, stop = stream
    lengths = stop - start
    ends = np.cumsum(lengths)
    begins = ends - lengths
    num_classes = hist.shape[1]
    counts = np.zeros((len(segments), num_classes), dtype=np.int64)
    if not segments or not ends.size:
        return counts
    lo = np.asarray([segment[0] for segment in segments], dtype=np.int64)
    hi = np.asarray([segment[1] for segment in segments], dtype=np.int64)
    # Spans wholly inside a stretch: [first_full, end_full); the spans straddling its ends are cut below.
    first_full = np.searchsorted(begins, lo, side="left")
    end_full = np.maximum(np.searchsorted(ends, hi, side="right"), first_full)
    cum = np.zeros((sizes.size, num_classes + 1), dtype=np.int64)
    np.cumsum(hist, axis=1, out=cum[:, 1:])
    for c in range(num_classes):
        prefix = np.concatenate([[0], np.cumsum(_span_weights(shard, start, stop, sizes, cum, c, class_sorted))])
        counts[:, c] = prefix[end_full] - prefix[first_full]
    cuts: list[tuple[int, int, int]] = []
    owners: list[int] = []
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        if b <= a:
            continue
        k = int(np.searchsorted(ends, a, side="right"))
        if begins[k] < a:  # a span straddles the stretch's start
            cuts.append((k, a, min(b, int(ends[k]))))
            owners.append(i)
        last = int(np.searchsorted(ends, b, side="right"))
        if last < ends.size and begins[last] < b and not (last == k and begins[k] < a):
            cuts.append((last, max(a, int(begins[last])), b))
            owners.append(i)
    for i, (k, a, b) in zip(owners, cuts, strict=True):
        piece = (int(shard[k]), int(start[k]) + a - int(begins[k]), int(start[k]) + b - int(begins[k]))
        counts[i] += span_class_counts([piece], sizes, hist, class_sorted=class_sorted)
    return counts


def _block_bounds(n: int, rounds: int) -> _IntArray:
    """``floor(i·n / rounds)`` for ``i = 0 .. rounds``, without overflowing int64."""
    i = np.arange(rounds + 1, dtype=np.int64)
    return i * (n // rounds) + (i * (n % rounds)) // rounds


def class_stream(
    sizes: _IntArray,
    hist: _IntArray,
    *,
    rounds: int,
    span_samples: int | None,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> _Table:
    """The class-sorted epoch stream (module docs) as three arrays: shard, start, stop (class-order positions).

    Args:
        sizes: samples of each shard.
        hist: ``hist[s, c]``, each row summing to ``sizes[s]`` (see :func:`histogram_table`).
        rounds: ``m``, the number of rounds, ``>= 1``.
        span_samples: cut each (shard, class) run into spans of at most this many samples; ``None``: whole runs.
        shuffle: permute each class's runs, per epoch.
        seed: seed of the permutation.
        epoch: epoch of the permutation.
    """
    cum = np.zeros((sizes.size, hist.shape[1] + 1), dtype=np.int64)
    np.cumsum(hist, axis=1, out=cum[:, 1:])
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 1]))) if shuffle else None
    parts: list[tuple[_IntArray, ...]] = []
    for c in range(hist.shape[1]):
        shard = np.flatnonzero(hist[:, c] > 0).astype(np.int64)
        if shard.size == 0:
            continue
        start, stop = cum[shard, c], cum[shard, c + 1]
        if span_samples is not None:
            pieces = -(-(stop - start) // span_samples)
            piece = np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            shard, start, stop = (
                np.repeat(shard, pieces),
                np.repeat(start, pieces) + piece * span_samples,
                np.repeat(stop, pieces),
            )
            stop = np.minimum(stop, start + span_samples)
        if rng is not None and shard.size > 1:
            order = rng.permutation(shard.size)
            shard, start, stop = shard[order], start[order], stop[order]
        lengths = stop - start
        ends = np.cumsum(lengths)
        bounds = _block_bounds(int(ends[-1]), rounds)
        # Cut the class's sequence at every run end and every block bound: each segment lies in one run and one block.
        points = np.sort(np.concatenate([[0], ends, bounds]))
        points = points[np.concatenate([[True], points[1:] != points[:-1]])]  # np.union1d, without its hashing
        lo, hi = points[:-1], points[1:]
        block = np.searchsorted(bounds, lo, side="right") - 1
        run = np.searchsorted(ends, lo, side="right")
        first = start[run] + lo - (ends[run] - lengths[run])
        parts.append((block, np.full(lo.size, c, dtype=np.int64), lo, shard[run], first, first + (hi - lo)))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    block, klass, lo, shard, start, stop = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.lexsort((lo, klass, block))
    return shard[order], start[order], stop[order]
