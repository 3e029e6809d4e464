"""Property tests of class coverage in the plan (`assignment` with `min_per_class`, and `class_stream`).

Each test draws shards with label histograms laid out as a writer makes them (split by label, as with
``hash_key="label"``; class-sorted data cut by size; mixed), with rare classes and empty shards, a labelling
of every shard consistent with its histogram, and a job (1-8 ranks, 0-4 workers, k = 1-2, 1-10 classes). It
checks the guarantees of "Class coverage" in `lightning_patterns.data.sharding.assignment`:

1. when `check_class_coverage` passes, `plan` succeeds in every epoch, and every worker of every rank holds at
   least its quota of every class (counted from the actual labels, through the class order of class-sorted
   plans);
2. the plan's other guarantees still hold: every sample once up to padding, the same samples and batches on
   every rank, workers within one batch of each other;
3. a class-sorted plan gives each worker the same class counts in every epoch, and its stream is built in
   rounds: at the end of round ``i`` exactly ``floor((i + 1)·n_c/m)`` samples of class ``c`` have passed, and
   each span lies in one class run of one shard;
4. the lower bound used for plain spans never exceeds the true count, for any labelling, and the prefix-sum
   counts of stretches of a stream equal the counts of the spans they cover;
5. when the check fails, the error names ranks and classes that really fall short.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.data.sharding.assignment import (
    PlanConfig,
    WorkerPlan,
    check_class_coverage,
    epoch_spans,
    plan,
    plan_epoch,
)
from lightning_patterns.data.sharding.class_stream import (
    class_quota,
    class_stream,
    histogram_table,
    segment_class_counts,
    span_class_counts,
)
from lightning_patterns.data.sharding.topology import Topology
from lightning_patterns.exceptions import ClassCoverageError

Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Case:
    histograms: list[list[int]]
    labels: list[Labels]  # each shard's labels in file order, consistent with its histogram
    world_size: int
    num_workers: int
    config: PlanConfig

    @property
    def sizes(self) -> list[int]:
        return [len(shard) for shard in self.labels]


def _layout(draw: st.DrawFn, num_classes: int, rng: np.random.Generator) -> list[list[int]]:
    kind = draw(st.sampled_from(["by_label", "sorted", "mixed"]))
    per_class = [int(n) for n in rng.integers(0, 300, num_classes)]
    if draw(st.booleans()):  # a rare class
        per_class[int(rng.integers(num_classes))] = int(rng.integers(0, 12))
    if kind == "by_label":  # every class in one or two shards, like hash sharding by the label
        num_shards = draw(st.integers(1, 2 * num_classes + 2))
        hist = np.zeros((num_shards, num_classes), dtype=np.int64)
        for c, n in enumerate(per_class):
            owners = rng.choice(num_shards, size=min(num_shards, int(rng.integers(1, 3))), replace=False)
            split = np.sort(rng.integers(0, n + 1, owners.size - 1))
            for owner, part in zip(owners, np.diff(np.concatenate([[0], split, [n]])), strict=True):
                hist[owner, c] += part
    elif kind == "sorted":  # class-sorted samples cut into shards of about equal size
        labels = np.repeat(np.arange(num_classes), per_class)
        cuts = np.sort(rng.integers(0, labels.size + 1, draw(st.integers(0, 12))))
        hist = np.stack(
            [np.bincount(part, minlength=num_classes) for part in np.split(labels, cuts)]
            or [np.zeros(num_classes, dtype=np.int64)]
        )
    else:
        hist = np.stack(
            [
                rng.multinomial(int(rng.integers(0, 400)), np.ones(num_classes) / num_classes)
                for _ in range(draw(st.integers(1, 10)))
            ]
        )
    return [[int(v) for v in row] for row in hist]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    num_classes = draw(st.integers(1, 10))
    k = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    histograms = _layout(draw, num_classes, rng)
    labels = [rng.permutation(np.repeat(np.arange(num_classes), row)).astype(np.int64) for row in histograms]
    config = PlanConfig(
        [sum(row) for row in histograms],
        batch_size=k * num_classes + draw(st.integers(0, 24)),
        seed=draw(st.integers(0, 2**32)),
        shuffle=draw(st.booleans()),
        drop_last=draw(st.booleans()),
        shuffle_window=draw(st.sampled_from([0, 7, 64])),
        span_samples=draw(st.sampled_from([None, None, 5, 64])),
        class_counts=histograms,
        min_per_class=k,
    )
    return Case(histograms, labels, draw(st.integers(1, 8)), draw(st.integers(0, 4)), config)


def _offsets(sizes: list[int]) -> Labels:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def true_labels(case: Case, worker: WorkerPlan) -> Labels:
    """The labels a worker yields, read as the dataset reads them (class order mapped to file order)."""
    indices = worker.indices()
    offsets = _offsets(case.sizes)
    shards = np.searchsorted(offsets, indices, side="right") - 1
    local = indices - offsets[shards]
    out = np.empty(indices.size, dtype=np.int64)
    for s in np.unique(shards).tolist():
        mask = shards == s
        order = np.argsort(case.labels[s], kind="stable") if worker.class_sorted else np.arange(case.sizes[s])
        out[mask] = case.labels[s][order[local[mask]]]
    return out


def _quota(case: Case, worker: WorkerPlan) -> int:
    return class_quota(worker.num_samples, case.config.batch_size, case.config.min_per_class, case.config.num_classes)


@given(cases(), st.integers(0, 2**16))
def test_a_passing_check_means_every_worker_holds_its_quota_in_every_epoch(case: Case, epoch: int) -> None:
    try:
        check_class_coverage(case.config, world_size=case.world_size, num_workers=case.num_workers)
    except ClassCoverageError:
        return
    for e in (0, epoch):
        plans = plan_epoch(case.config, e, world_size=case.world_size, num_workers=case.num_workers)
        for workers in plans:
            for worker in workers:
                counts = np.bincount(true_labels(case, worker), minlength=case.config.num_classes)
                assert counts.min(initial=_quota(case, worker)) >= _quota(case, worker), (worker.rank, counts)


@given(cases(), st.integers(0, 2**16))
def test_balanced_plans_keep_exactly_once_and_equal_batches(case: Case, epoch: int) -> None:
    try:
        plans = plan_epoch(case.config, epoch, world_size=case.world_size, num_workers=case.num_workers)
    except ClassCoverageError:
        return
    total = sum(case.sizes)
    per_rank = [sum(w.num_samples for w in workers) for workers in plans]
    batch = case.config.batch_size
    assert len(set(per_rank)) == 1
    assert len({sum(-(-w.num_samples // batch) for w in workers) for workers in plans}) == 1
    for workers in plans:
        batches = [-(-w.num_samples // batch) for w in workers]
        assert max(batches) - min(batches) <= 1
    seen = Counter(int(i) for workers in plans for w in workers for i in w.indices())
    if case.config.drop_last:
        assert max(seen.values(), default=1) == 1
        assert total - len(seen) <= case.world_size - 1
    else:
        assert set(seen) == set(range(total))
        assert sum(seen.values()) - total <= case.world_size - 1
    # Each process plans its own worker alone and agrees with the whole-epoch plan.
    rank, worker = case.world_size - 1, max(case.num_workers, 1) - 1
    alone = plan(case.config, Topology(case.world_size, rank, case.num_workers, worker), epoch)
    assert alone == plans[rank][worker]


@given(cases(), st.integers(1, 2**16))
def test_class_sorted_streams_are_rounds_of_exact_class_runs(case: Case, epoch: int) -> None:
    sizes = np.asarray(case.sizes, dtype=np.int64)
    hist = histogram_table(case.histograms, sizes)
    cum = np.concatenate([np.zeros((sizes.size, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
    rounds = max(1, -(-int(sizes.sum()) // case.config.batch_size))
    streams = [
        class_stream(
            sizes,
            hist,
            rounds=rounds,
            span_samples=case.config.span_samples,
            shuffle=case.config.shuffle,
            seed=case.config.seed,
            epoch=e,
        )
        for e in (0, epoch)
    ]
    classes_by_epoch = []
    for shard, start, stop in streams:
        # Every span lies inside one class run of one shard, and together they cover every sample once.
        klass = np.array(
            [int(np.searchsorted(cum[s], a, side="right")) - 1 for s, a in zip(shard, start, strict=True)],
            dtype=np.int64,
        )
        assert np.all(stop > start)
        assert np.all(stop <= cum[shard, klass + 1])
        covered = Counter((int(s), i) for s, a, b in zip(shard, start, stop, strict=True) for i in range(a, b))
        assert len(covered) == int(sizes.sum()) == sum(covered.values())
        positions = np.repeat(klass, stop - start)
        classes_by_epoch.append(positions)
        # Rounds: after round i, exactly floor((i + 1) * n_c / m) samples of class c have passed.
        totals = hist.sum(axis=0)
        ends = np.cumsum([sum(((i + 1) * n) // rounds - (i * n) // rounds for n in totals) for i in range(rounds)])
        for i, end in enumerate(ends.tolist()):
            assert np.bincount(positions[:end], minlength=totals.size).tolist() == [
                ((i + 1) * int(n)) // rounds for n in totals
            ]
    # The class of every stream position is the same in every epoch: so are each worker's class counts.
    assert np.array_equal(classes_by_epoch[0], classes_by_epoch[1])


@given(cases(), st.data())
def test_the_plain_lower_bound_never_exceeds_the_true_count(case: Case, data: st.DataObject) -> None:
    sizes = np.asarray(case.sizes, dtype=np.int64)
    hist = histogram_table(case.histograms, sizes)
    spans = []
    for s, size in enumerate(case.sizes):
        if size:
            a = data.draw(st.integers(0, size - 1))
            spans.append((s, a, data.draw(st.integers(a, size))))
    bound = span_class_counts(spans, sizes, hist, class_sorted=False)
    truth = sum(
        (np.bincount(case.labels[s][a:b], minlength=hist.shape[1]) for s, a, b in spans),
        np.zeros(hist.shape[1], dtype=np.int64),
    )
    assert np.all(bound <= truth)
    whole = [(s, 0, size) for s, size in enumerate(case.sizes) if size]
    assert span_class_counts(whole, sizes, hist, class_sorted=False).tolist() == hist.sum(axis=0).tolist()


@given(cases())
def test_a_failing_check_names_ranks_and_classes_that_fall_short(case: Case) -> None:
    try:
        check_class_coverage(case.config, world_size=case.world_size, num_workers=case.num_workers)
    except ClassCoverageError as err:
        message = str(err)
    else:
        return
    assert f"min_per_class={case.config.min_per_class}" in message
    assert f"world_size={case.world_size}, num_workers={case.num_workers}" in message
    assert "rank " in message
    assert "class " in message
    named = {int(rank) for rank in re.findall(r"rank (\d+)", message)}
    assert named
    assert named <= set(range(case.world_size))
    if not case.config.shuffle:  # then every epoch is epoch 0: planning it fails as the check said
        with pytest.raises(ClassCoverageError):
            plan_epoch(case.config, 0, world_size=case.world_size, num_workers=case.num_workers)


@given(cases(), st.booleans(), st.data())
def test_stretch_counts_equal_the_counts_of_the_spans_they_cover(
    case: Case, sorted_: bool, data: st.DataObject
) -> None:
    sizes = np.asarray(case.sizes, dtype=np.int64)
    hist = histogram_table(case.histograms, sizes)
    if sorted_:
        rounds = data.draw(st.integers(1, 50))
        stream = class_stream(
            sizes, hist, rounds=rounds, span_samples=case.config.span_samples, shuffle=True, seed=1, epoch=2
        )
    else:
        spans = epoch_spans(case.config, 3)
        stream = tuple(np.asarray([span[i] for span in spans], dtype=np.int64) for i in range(3))  # type: ignore[assignment]
    total = int((stream[2] - stream[1]).sum())
    bounds = sorted(data.draw(st.lists(st.integers(0, total), min_size=2, max_size=12)))
    segments = list(itertools.pairwise(bounds))
    got = segment_class_counts(stream, segments, sizes, hist, class_sorted=sorted_)
    begins = np.concatenate([[0], np.cumsum(stream[2] - stream[1])])
    for (lo, hi), counts in zip(segments, got, strict=True):
        covered = [
            (int(s), int(a) + max(lo, int(b0)) - int(b0), int(a) + min(hi, int(b1)) - int(b0))
            for s, a, b0, b1 in zip(stream[0], stream[1], begins[:-1], begins[1:], strict=True)
            if max(lo, int(b0)) < min(hi, int(b1))
        ]
        assert counts.tolist() == span_class_counts(covered, sizes, hist, class_sorted=sorted_).tolist()
