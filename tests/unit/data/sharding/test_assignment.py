"""Unit tests of `lightning_patterns.data.sharding.assignment`: concrete plans and invalid arguments."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.sharding import PlanConfig, Topology
from lightning_patterns.data.sharding.assignment import (
    Span,
    WorkerPlan,
    check_class_coverage,
    epoch_spans,
    plan,
    plan_epoch,
    samples_per_rank,
)
from lightning_patterns.exceptions import ClassCoverageError

BASE: dict[str, Any] = {
    "world_size": 2,
    "rank": 0,
    "num_workers": 2,
    "worker_id": 0,
    "epoch": 0,
    "seed": 0,
    "shuffle": False,
    "drop_last": False,
}
_TOPOLOGY = ("world_size", "rank", "num_workers", "worker_id")
_TOP = Topology(world_size=1, rank=0)


def _plan(sizes: Sequence[int], resume: Sequence[Span] | None = None, **overrides: Any) -> WorkerPlan:
    """`plan` from one flat set of keyword arguments: the topology's, the epoch, and the config's."""
    kwargs = {**BASE, **overrides}
    topology = Topology(**{name: kwargs.pop(name) for name in _TOPOLOGY})
    epoch = kwargs.pop("epoch")
    return plan(PlanConfig(sizes, **kwargs), topology, epoch, resume)


def _every(sizes: Sequence[int], *, world_size: int, num_workers: int, **config: Any) -> list[list[WorkerPlan]]:
    return plan_epoch(PlanConfig(sizes, **config), 0, world_size=world_size, num_workers=num_workers)


def test_example_uneven_shards_two_ranks_two_workers() -> None:
    # 8 samples: shard 0 is 0..2, shard 1 is empty, shard 2 is 3..7. Each rank takes 4, each worker 2.
    plans = _every([3, 0, 5], world_size=2, num_workers=2)
    assert [[p.indices().tolist() for p in rank] for rank in plans] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert plans[0][1].spans == ((0, 2, 3), (2, 0, 1))
    assert plans[0][1].span_offsets == (2, 3)
    assert plans[0][1].shard_ids == (0, 2)
    assert plans[0][1].shards_opened == 2
    assert plans[1][1].spans == ((2, 3, 5),)
    assert plans[1][1].num_samples == 2


def test_example_padding_repeats_the_start_of_the_stream() -> None:
    # 5 samples on 3 ranks: ceil(5/3) = 2 each, the one extra position wraps to sample 0.
    plans = _every([5], world_size=3, num_workers=0)
    assert [rank[0].indices().tolist() for rank in plans] == [[0, 1], [2, 3], [4, 0]]
    assert plans[2][0].spans == ((0, 4, 5), (0, 0, 1))


def test_example_drop_last_drops_the_tail() -> None:
    plans = _every([5], world_size=3, num_workers=0, drop_last=True)
    assert [rank[0].indices().tolist() for rank in plans] == [[0], [1], [2]]


def test_example_fewer_samples_than_ranks() -> None:
    plans = _every([1], world_size=4, num_workers=0)
    assert [rank[0].indices().tolist() for rank in plans] == [[0], [0], [0], [0]]
    dropped = _every([1], world_size=4, num_workers=0, drop_last=True)
    assert all(rank[0].num_samples == 0 and rank[0].shards_opened == 0 for rank in dropped)


def test_example_workers_get_whole_batches() -> None:
    # 10 samples, batch 3 -> 4 batches over 3 workers: 2, 1, 1 batches; the last worker's is partial.
    plans = _every([10], world_size=1, num_workers=3, batch_size=3)
    assert [p.indices().tolist() for p in plans[0]] == [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9]]
    # More workers than batches: the extra workers get nothing.
    plans = _every([4], world_size=1, num_workers=4, batch_size=2)
    assert [p.num_samples for p in plans[0]] == [2, 2, 0, 0]


def test_empty_manifest_plans_nothing() -> None:
    for sizes in ([], [0, 0]):
        plan = _plan(sizes)
        assert plan.spans == ()
        assert plan.indices().dtype == np.int64
        assert plan.indices().size == 0


def test_shuffle_is_seeded_by_seed_and_epoch() -> None:
    sizes = [10] * 20
    order = [s for s, _, _ in epoch_spans(PlanConfig(sizes, seed=1, shuffle=True), 0)]
    assert sorted(order) == list(range(20))
    assert order != list(range(20))
    assert order == [s for s, _, _ in epoch_spans(PlanConfig(sizes, seed=1, shuffle=True), 0)]
    assert order != [s for s, _, _ in epoch_spans(PlanConfig(sizes, seed=1, shuffle=True), 1)]
    assert order != [s for s, _, _ in epoch_spans(PlanConfig(sizes, seed=2, shuffle=True), 0)]


def test_shuffle_is_the_same_on_every_machine() -> None:
    # Pinned values: PCG64 + SeedSequence are stable across numpy versions and platforms.
    assert [s for s, _, _ in epoch_spans(PlanConfig([1] * 8, seed=7, shuffle=True), 2)] == [6, 0, 2, 3, 7, 5, 1, 4]
    plan = _plan([8], world_size=1, num_workers=0, shuffle=True, shuffle_window=4)
    assert plan.indices().tolist() == [1, 0, 3, 2, 6, 4, 7, 5]


def test_span_samples_splits_huge_shards() -> None:
    assert epoch_spans(PlanConfig([0, 7, 2], span_samples=3), 0) == [
        (1, 0, 3),
        (1, 3, 6),
        (1, 6, 7),
        (2, 0, 2),
    ]


def test_window_shuffle_keeps_samples_in_their_window() -> None:
    plan = _plan([100], world_size=1, num_workers=0, shuffle=True, shuffle_window=10)
    yielded = plan.indices()
    assert not np.array_equal(yielded, np.arange(100))
    assert np.array_equal(np.sort(yielded.reshape(10, 10), axis=1), np.arange(100).reshape(10, 10))
    no_window = _plan([100], world_size=1, num_workers=0, shuffle=True, shuffle_window=0)
    assert np.array_equal(no_window.indices(), no_window.span_indices())


def test_resume_replans_remaining_spans() -> None:
    # Samples 0..3 of a 10-sample shard were consumed; re-plan the other 6 on 4 ranks.
    plans = [_plan([10], [(0, 4, 10)], world_size=4, rank=r, num_workers=0) for r in range(4)]
    assert [p.indices().tolist() for p in plans] == [[4, 5], [6, 7], [8, 9], [4, 5]]


def test_samples_per_rank() -> None:
    assert samples_per_rank(10, 3, drop_last=False) == 4
    assert samples_per_rank(10, 3, drop_last=True) == 3
    assert samples_per_rank(0, 3, drop_last=False) == 0
    assert samples_per_rank(2, 3, drop_last=True) == 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"world_size": 0}, r"world_size >= 1, got world_size=0"),
        ({"world_size": -2, "rank": 0}, r"world_size >= 1, got world_size=-2"),
        ({"rank": 2}, r"0 <= rank < world_size, got rank=2 with world_size=2"),
        ({"rank": -1}, r"0 <= rank < world_size, got rank=-1"),
        ({"num_workers": -1}, r"num_workers >= 0, got num_workers=-1"),
        ({"worker_id": 2}, r"0 <= worker_id < max\(num_workers, 1\), got worker_id=2 with num_workers=2"),
        ({"worker_id": -1}, r"got worker_id=-1"),
        ({"num_workers": 0, "worker_id": 1}, r"got worker_id=1 with num_workers=0"),
        ({"batch_size": 0}, r"batch_size >= 1, got batch_size=0"),
        ({"shuffle_window": -1}, r"shuffle_window >= 0, got shuffle_window=-1"),
        ({"span_samples": 0}, r"span_samples >= 1 or None, got span_samples=0"),
        ({"epoch": -1}, r"epoch >= 0, got epoch=-1"),
        ({"seed": -5}, r"seed >= 0, got seed=-5"),
        ({"shard_sizes": [3, -1, 2]}, r"shard sizes >= 0, got shard_sizes\[1\]=-1"),
    ],
)
def test_invalid_arguments(overrides: dict[str, Any], match: str) -> None:
    kwargs = dict(overrides)
    sizes = kwargs.pop("shard_sizes", [3, 0, 5])
    with pytest.raises(ValueError, match=match):
        _plan(sizes, **kwargs)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: samples_per_rank(-1, 2, drop_last=False), r"total >= 0 samples, got total=-1"),
        (lambda: samples_per_rank(5, 0, drop_last=False), r"world_size >= 1, got world_size=0"),
        (lambda: _every([1], world_size=1, num_workers=-3), r"num_workers >= 0, got num_workers=-3"),
        (lambda: _every([1], world_size=0, num_workers=0), r"world_size >= 1, got world_size=0"),
        (lambda: epoch_spans(PlanConfig([1]), -2), r"epoch >= 0, got epoch=-2"),
        (lambda: PlanConfig([1, -4]), r"shard_sizes\[1\]=-4"),
        (lambda: _plan([3], [(0, 2, 1)]), r"got resume\[0\]=\(0, 2, 1\)"),
        (lambda: _plan([3, 3], [(0, 0, 1), (1, 0, 4)]), r"got resume\[1\]=\(1, 0, 4\)"),
        (lambda: _plan([3, 3], [(2, 0, 1)]), r"0 <= shard < 2"),
        (lambda: _plan([], [(0, 0, 1)]), r"0 <= shard < 0"),
        (lambda: PlanConfig([2, 1], class_counts=[[2]]), r"one row per shard \(2\), got 1 rows"),
        (lambda: PlanConfig([2, 1], class_counts=[[2], [0, 2]]), r"class_counts\[1\] to be counts >= 0 summing to"),
        (lambda: PlanConfig([2], class_counts=[[3, -1]]), r"class_counts\[0\] to be counts >= 0 summing to"),
        (lambda: PlanConfig([2], min_per_class=-1), r"min_per_class >= 0, got min_per_class=-1"),
        (lambda: PlanConfig([2], min_per_class=1), r"min_per_class=1 needs class_counts"),
        (lambda: PlanConfig([2], class_counts=[[1, 1]], min_per_class=2, batch_size=3), r"batch_size=3 cannot hold"),
        (
            lambda: plan(PlanConfig([2], class_counts=[[1, 1]], min_per_class=1, batch_size=2), _TOP, 0, [(0, 0, 1)]),
            r"cannot be re-planned from resume spans",
        ),
    ],
)
def test_invalid_arguments_of_helpers(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_remaining_spans_without_shuffle() -> None:
    plan = _plan([3, 0, 5], world_size=1, num_workers=0)
    assert plan.remaining_spans(0) == [(0, 0, 3), (2, 0, 5)]
    assert plan.remaining_spans(4) == [(2, 1, 5)]
    assert plan.remaining_spans(8) == []


def test_remaining_spans_in_a_shuffled_window() -> None:
    plan = _plan([8], world_size=1, num_workers=0, shuffle=True, shuffle_window=4)
    assert plan.indices().tolist() == [1, 0, 3, 2, 6, 4, 7, 5]
    # Yielded 1 and 0: the window's 3 and 2 remain (one run), then the next window whole.
    assert plan.remaining_spans(2) == [(0, 2, 4), (0, 4, 8)]
    plan = _plan([8], world_size=1, num_workers=0, shuffle=True, shuffle_window=4)
    # Yielded 1, 0 and 3: only 2 remains of the first window.
    assert plan.remaining_spans(3) == [(0, 2, 3), (0, 4, 8)]


def test_any_window_can_be_computed_alone() -> None:
    plan = _plan([50], world_size=1, num_workers=0, shuffle=True, shuffle_window=8)
    whole = plan.indices()
    for lo, hi in [(0, 50), (3, 11), (16, 24), (45, 50), (7, 8)]:
        assert np.array_equal(plan.indices_between(lo, hi), whole[lo:hi])


@pytest.mark.parametrize("consumed", [-1, 9])
def test_remaining_spans_rejects_consumed_out_of_range(consumed: int) -> None:
    plan = _plan([8], world_size=1, num_workers=0)
    with pytest.raises(ValueError, match=rf"0 <= consumed <= num_samples, got consumed={consumed} with num_samples=8"):
        plan.remaining_spans(consumed)


def test_plan_config_compares_by_value_and_round_trips_through_builtins() -> None:
    config = PlanConfig(np.array([3, 0, 5]), batch_size=2, seed=1, shuffle=True, shuffle_window=4)
    assert config == PlanConfig([3, 0, 5], 2, 1, True, False, 4, None)
    assert config.shard_sizes == (3, 0, 5)
    state = config.to_state()
    assert state["shard_sizes"] == [3, 0, 5]
    assert all(isinstance(value, (int, bool, list, type(None))) for value in state.values())
    assert PlanConfig.from_state(state) == config


def test_plan_epoch_is_every_worker_planned_alone() -> None:
    config = PlanConfig([7, 0, 4, 9], batch_size=2, seed=3, shuffle=True, shuffle_window=3, span_samples=4)
    resume = [(3, 2, 9), (0, 0, 5)]
    for stream in (None, resume):
        every = plan_epoch(config, 5, world_size=3, num_workers=2, resume=stream)
        assert every == [[plan(config, Topology(3, r, 2, w), 5, stream) for w in range(2)] for r in range(3)]


def test_class_coverage_spreads_label_split_shards_over_ranks_and_workers() -> None:
    # Four shards of one class each (as hash sharding by the label writes them), read by 2 ranks of 2 workers.
    hist = [[40, 0, 0, 0], [0, 40, 0, 0], [0, 0, 40, 0], [0, 0, 0, 40]]
    plain = PlanConfig([40] * 4, batch_size=4)
    balanced = PlanConfig([40] * 4, batch_size=4, class_counts=hist, min_per_class=1)
    check_class_coverage(balanced, world_size=2, num_workers=2)
    before = plan_epoch(plain, 0, world_size=2, num_workers=2)
    after = plan_epoch(balanced, 0, world_size=2, num_workers=2)
    for old, new in zip(before, after, strict=True):
        assert {shard for worker in old for shard in worker.shard_ids} in ({0, 1}, {2, 3})  # 2 classes per rank
        for worker in new:
            assert worker.class_sorted
            assert worker.num_samples == 40
            # Class-sorted positions of a one-class shard are its file positions: 10 of each class per worker.
            assert Counter(shard for shard, start, stop in worker.spans for _ in range(start, stop)) == dict.fromkeys(
                range(4), 10
            )
    assert [w.indices().tolist() for ws in after for w in ws] == [
        w.indices().tolist() for ws in plan_epoch(balanced, 0, world_size=2, num_workers=2) for w in ws
    ]


def test_class_coverage_failure_names_ranks_workers_and_classes() -> None:
    hist = [[40, 0, 0], [0, 40, 0], [0, 0, 3]]
    config = PlanConfig([40, 40, 3], batch_size=6, class_counts=hist, min_per_class=1)
    with pytest.raises(ClassCoverageError) as info:
        check_class_coverage(config, world_size=2, num_workers=2)
    message = str(info.value)
    assert "(world_size=2, num_workers=2)" in message
    for rank, worker in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert re.search(rf"rank {rank} worker {worker}: class 2 \([01] of [34]\)", message), message
    assert "In all, class 2 has 3 samples but 14 batches × min_per_class=1 need 14." in message
    with pytest.raises(ClassCoverageError, match="rank 0 worker 0: class 2"):
        plan(config, Topology(2, 1, 2, 1), epoch=0)
    check_class_coverage(PlanConfig([40, 40, 3], batch_size=6), world_size=2, num_workers=2)  # nothing asked
