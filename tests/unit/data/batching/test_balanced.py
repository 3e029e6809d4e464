"""Unit tests of `lightning_patterns.data.batching.balanced`: messages, exact plans, sizes and the tail."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import pytest

import lightning_patterns.data.batching as batching
from lightning_patterns.data.batching import BatchPlan, ClassBalancer, check_class_counts


def test_all_is_sorted_and_exported() -> None:
    assert batching.__all__ == sorted(batching.__all__)
    assert all(hasattr(batching, name) for name in batching.__all__)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"batch_size": 10, "min_per_class": 2, "num_classes": 10},
            ValueError,
            "batch_size=10 cannot hold min_per_class=2 samples of each of 10 classes (needs at least 20): "
            "raise batch_size to 20 or lower min_per_class",
        ),
        ({"batch_size": 0, "min_per_class": 1, "num_classes": 1}, ValueError, "batch_size=0 must be at least 1"),
        ({"batch_size": 4, "min_per_class": 0, "num_classes": 1}, ValueError, "min_per_class=0 must be at least 1"),
        ({"batch_size": 4, "min_per_class": 1, "num_classes": 0}, ValueError, "num_classes=0 must be at least 1"),
        (
            {"batch_size": 4, "min_per_class": 1, "num_classes": 2, "lookahead": -1},
            ValueError,
            "lookahead=-1 must be at least 0",
        ),
        ({"batch_size": 2.5, "min_per_class": 1, "num_classes": 2}, TypeError, "batch_size must be an int, got 2.5"),
        (
            {"batch_size": 4, "min_per_class": True, "num_classes": 2},
            TypeError,
            "min_per_class must be an int, got True",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        ClassBalancer(**kwargs)


def test_valid_arguments_and_repr() -> None:
    balancer = ClassBalancer(batch_size=np.int64(20), min_per_class=2, num_classes=10, lookahead=0)  # type: ignore[arg-type]
    assert repr(balancer) == "ClassBalancer(batch_size=20, min_per_class=2, num_classes=10, lookahead=0)"


@pytest.mark.parametrize(
    ("counts", "num_batches", "k", "message"),
    [
        (
            [20, 20, 20, 12],
            5,
            3,
            "class 3 has 12 samples but 5 batches × min_per_class=3 need 15: lower min_per_class or batch_size, "
            "or add samples of class 3",
        ),
        (
            np.array([1, 9, 0, 9]),
            2,
            1,
            "class 0 has 1 samples but 2 batches × min_per_class=1 need 2 (also short: classes 2): ",
        ),
    ],
)
def test_check_class_counts_names_the_short_class(counts: Any, num_batches: int, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_class_counts(counts, num_batches=num_batches, min_per_class=k)


def test_check_class_counts_passes_at_the_bound() -> None:
    check_class_counts([15, 16], num_batches=5, min_per_class=3)
    check_class_counts(np.array([0, 0]), num_batches=0, min_per_class=3)
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        check_class_counts(np.array([1.5, 2.0]), num_batches=1, min_per_class=1)


def test_example_one_of_each_class_per_batch() -> None:
    # The book's case: batch 3, 3 classes, k=1. Arrival order is class-sorted; each batch gets 0, 1 and 2.
    labels = np.array([0, 0, 1, 1, 2, 2])
    plan = ClassBalancer(batch_size=3, min_per_class=1, num_classes=3).plan_batches(labels)
    assert [b.tolist() for b in plan.batches] == [[0, 2, 4], [1, 3, 5]]
    assert plan.tail == ()
    assert plan.order().tolist() == [0, 2, 4, 1, 3, 5]


def test_example_fill_takes_the_oldest() -> None:
    # Quota: one 0 and one 1; the other two slots take the oldest left (positions 1 and 2).
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 0])
    plan = ClassBalancer(batch_size=4, min_per_class=1, num_classes=2).plan_batches(labels)
    assert [b.tolist() for b in plan.batches] == [[0, 1, 2, 5], [3, 4, 6, 7]]
    assert plan.tail_batches == 0


def test_example_lookahead_bounds_the_reach() -> None:
    # Class 1 only at the end: with lookahead 0 the first batch cannot reach it and is a tail batch.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    near = ClassBalancer(batch_size=4, min_per_class=1, num_classes=2, lookahead=0).plan_batches(labels)
    assert [b.tolist() for b in near.batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert near.tail == (0,)
    far = ClassBalancer(batch_size=4, min_per_class=1, num_classes=2, lookahead=4).plan_batches(labels)
    assert [b.tolist() for b in far.batches] == [[0, 1, 2, 5], [3, 4, 6, 7]]
    assert far.tail == ()


def test_reserve_keeps_k_for_the_last_batch() -> None:
    # Plain oldest-first would put both 1s in batch 0 (positions 0, 1) and leave batch 1 without a 1.
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    plan = ClassBalancer(batch_size=4, min_per_class=1, num_classes=2).plan_batches(labels)
    assert [b.tolist() for b in plan.batches] == [[0, 2, 3, 4], [1, 5, 6, 7]]
    assert plan.tail == ()


def test_class_that_runs_out_makes_a_counted_tail() -> None:
    labels = np.array([0, 1, 0, 0, 0, 0])  # one sample of class 1 for two batches
    plan = ClassBalancer(batch_size=3, min_per_class=1, num_classes=2).plan_batches(labels)
    assert sorted(plan.order().tolist()) == list(range(6))
    assert plan.tail == (1,)


def test_partial_last_batch_sizes_are_kept_and_a_small_one_is_tail() -> None:
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(3), 34))[:101]  # 101 = 12 × 8 + 5
    balancer = ClassBalancer(batch_size=8, min_per_class=2, num_classes=3, lookahead=16)
    plan = balancer.plan_batches(labels)
    assert [b.size for b in plan.batches] == [8] * 12 + [5]
    assert np.array_equal(np.sort(plan.order()), np.arange(101))
    assert plan.tail == (12,)  # 5 < 2 × 3: the last batch cannot be balanced
    explicit = balancer.plan_batches(labels, num_batches=13, last_batch_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(plan.batches, explicit.batches, strict=True))


def test_empty_labels_make_no_batches() -> None:
    plan = ClassBalancer(batch_size=2, min_per_class=1, num_classes=2).plan_batches(np.array([], dtype=np.int64))
    assert plan == BatchPlan([], ())
    assert plan.order().size == 0


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        ([0, 1, 2, 3], {}, "labels must be class indices in 0..2 (num_classes=3), got 3 at position 3"),
        ([0, -1], {}, "got -1 at position 1"),
        ([0.0, 1.0], {}, "labels must be integer class indices, got dtype float64"),
        ([[0, 1]], {}, "labels must be 1-D, got shape (1, 2)"),
        ([0, 1, 2, 0, 1], {"num_batches": 1}, "5 labels cannot make num_batches=1 batches of batch_size=4"),
        ([0, 1, 2, 0, 1], {"num_batches": 2, "last_batch_size": 2}, "makes 6 samples, but there are 5 labels"),
        ([0, 1, 2, 0, 1], {"num_batches": 2, "last_batch_size": 5}, "last_batch_size=5 exceeds batch_size=4"),
    ],
)
def test_plan_batches_rejects_bad_input(labels: Any, kwargs: dict[str, Any], message: str) -> None:
    balancer = ClassBalancer(batch_size=4, min_per_class=1, num_classes=3)
    with pytest.raises(ValueError, match=re.escape(message)):
        balancer.plan_batches(labels, **kwargs)


def test_iter_batches_matches_plan_batches_whatever_the_chunks() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 1000)
    balancer = ClassBalancer(batch_size=32, min_per_class=2, num_classes=5, lookahead=64)
    plan = balancer.plan_batches(labels)
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=40, replace=False))
    streamed = list(balancer.iter_batches(np.split(labels, cuts), num_batches=32, last_batch_size=8))
    assert all(np.array_equal(a, b) for a, b in zip(plan.batches, streamed, strict=True))


def test_iter_batches_reads_only_the_window_it_needs() -> None:
    read: list[int] = []

    def chunks() -> Any:
        for start in range(0, 100, 10):
            read.append(start)
            yield np.arange(start, start + 10) % 2

    balancer = ClassBalancer(batch_size=10, min_per_class=1, num_classes=2, lookahead=15)
    batches = balancer.iter_batches(chunks(), num_batches=10)
    next(batches)
    assert read == [0, 10, 20]  # the first window ends at 10 + 15 = 25


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([[0, 1, 0]], "label_chunks ended after 3 labels, but the batches take 4"),
        ([[0, 1, 0, 1, 0]], "label_chunks hold more than the 4 labels"),
        ([[0, 1, 0, 1], [1]], "label_chunks hold more than the 4 labels"),
    ],
)
def test_iter_batches_rejects_a_wrong_number_of_labels(chunks: list[list[int]], message: str) -> None:
    balancer = ClassBalancer(batch_size=2, min_per_class=1, num_classes=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        list(balancer.iter_batches(chunks, num_batches=2))


def test_batch_sizes_validation() -> None:
    balancer = ClassBalancer(batch_size=4, min_per_class=1, num_classes=2)
    assert balancer.batch_sizes(3, 1) == [4, 4, 1]
    assert balancer.batch_sizes(0) == []
    with pytest.raises(ValueError, match=re.escape("last_batch_size=2 needs num_batches >= 1, got 0")):
        balancer.batch_sizes(0, 2)
    with pytest.raises(ValueError, match=re.escape("num_batches=-1 must be at least 0")):
        balancer.batch_sizes(-1)


def test_default_lookahead_gives_balanced_batches_on_shuffled_data() -> None:
    labels = np.random.default_rng(2).integers(0, 10, 50_000)
    plan = ClassBalancer(batch_size=256, min_per_class=2, num_classes=10).plan_batches(labels)
    assert plan.tail == ()
    counts = np.stack([np.bincount(labels[b], minlength=10) for b in plan.batches])
    assert counts.min() >= 2


def test_speed_200k_labels() -> None:
    labels = np.random.default_rng(3).integers(0, 10, 200_000)
    balancer = ClassBalancer(batch_size=256, min_per_class=2, num_classes=10)
    best = min(_timed(balancer, labels) for _ in range(3))
    assert best < 0.5, f"planning 200,000 labels took {best:.3f} s"


def _timed(balancer: ClassBalancer, labels: np.ndarray) -> float:
    start = time.perf_counter()
    balancer.plan_batches(labels)
    return time.perf_counter() - start
