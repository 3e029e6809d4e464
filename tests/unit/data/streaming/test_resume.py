"""Mid-epoch resumption: exact on the same topology, elastic on another world size or worker count."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import islice
from typing import Any

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_patterns.data.sharding import PlanConfig
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.streaming.resume import ResumePoint, batches_per_worker

N = 487
BATCH = 8


def _indices(batches: list[dict[str, Any]]) -> list[int]:
    return [int(i) for batch in batches for i in batch["index"]]


def _dataset(url: str, rank: int, world_size: int, **kwargs: Any) -> StreamingDataset:
    return StreamingDataset(
        url, batch_size=BATCH, shuffle=True, seed=11, shuffle_window=16, rank=rank, world_size=world_size, **kwargs
    )


def _assert_one_epoch(seen: Counter[int], max_extra: int) -> None:
    assert set(seen) == set(range(N)), f"missing: {sorted(set(range(N)) - set(seen))[:10]}"
    assert sum(seen.values()) - N <= max_extra


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_exactly(
    make_dataset: Callable[..., str], world_size: int, num_workers: int
) -> None:
    url = make_dataset(N, num_shards=5)
    seen: Counter[int] = Counter()
    uninterrupted: Counter[int] = Counter()
    for rank in range(world_size):
        loader = StatefulDataLoader(_dataset(url, rank, world_size), batch_size=None, num_workers=num_workers)
        before = list(islice(iter(loader), 9))
        state = loader.state_dict()
        fresh = StatefulDataLoader(_dataset(url, rank, world_size), batch_size=None, num_workers=num_workers)
        fresh.load_state_dict(state)
        after = list(fresh)
        assert len(before) + len(after) == len(_dataset(url, rank, world_size))
        seen.update(_indices(before) + _indices(after))
        uninterrupted.update(_indices(list(StatefulDataLoader(_dataset(url, rank, world_size), batch_size=None))))
    _assert_one_epoch(seen, world_size - 1)
    # Same topology, same plan: the resumed run yields exactly the samples of the uninterrupted one.
    assert seen == uninterrupted


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_dataloader_resumes_exactly(
    make_dataset: Callable[..., str], world_size: int, num_workers: int
) -> None:
    url = make_dataset(N, num_shards=5)
    seen: Counter[int] = Counter()
    states = []
    for rank in range(world_size):
        loader = StreamingDataLoader(_dataset(url, rank, world_size), num_workers=num_workers)
        seen.update(_indices(list(islice(iter(loader), 13))))
        states.append(loader.state_dict())
    assert all(state == states[0] for state in states), "every rank must save the same resume point"
    for rank in range(world_size):
        fresh = StreamingDataLoader(_dataset(url, rank, world_size), num_workers=num_workers)
        fresh.load_state_dict(states[rank])
        seen.update(_indices(list(fresh)))
        assert fresh.epoch == 0
    _assert_one_epoch(seen, world_size - 1)


@pytest.mark.parametrize(
    ("old", "new"),
    [((2, 2), (3, 1)), ((1, 0), (2, 2)), ((3, 1), (1, 0)), ((2, 0), (2, 2)), ((4, 2), (3, 0))],
)
def test_elastic_resumption_yields_every_remaining_sample_once(
    make_dataset: Callable[..., str], old: tuple[int, int], new: tuple[int, int]
) -> None:
    (old_world, old_workers), (new_world, new_workers) = old, new
    url = make_dataset(N, num_shards=6)
    seen: Counter[int] = Counter()
    state = None
    for rank in range(old_world):
        loader = StreamingDataLoader(_dataset(url, rank, old_world), num_workers=old_workers)
        seen.update(_indices(list(islice(iter(loader), 7))))
        state = loader.state_dict()
    assert state is not None
    after: list[int] = []
    counts = []
    for rank in range(new_world):
        fresh = StreamingDataLoader(_dataset(url, rank, new_world), num_workers=new_workers)
        fresh.load_state_dict(state)
        batches = list(fresh)
        counts.append(len(batches))
        after += _indices(batches)
    assert len(set(counts)) == 1, "ranks of the resumed job must still get equal batch counts"
    seen.update(after)
    _assert_one_epoch(seen, (old_world - 1) + (new_world - 1))


def test_resumed_epoch_can_itself_be_interrupted_and_resumed(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N, num_shards=6)
    seen: Counter[int] = Counter()
    first = StreamingDataLoader(_dataset(url, 0, 1), num_workers=0)
    seen.update(_indices(list(islice(iter(first), 10))))
    second = StreamingDataLoader(_dataset(url, 0, 1), num_workers=2)
    second.load_state_dict(first.state_dict())
    seen.update(_indices(list(islice(iter(second), 10))))
    third = StreamingDataLoader(_dataset(url, 0, 1), num_workers=0)
    third.load_state_dict(second.state_dict())
    seen.update(_indices(list(third)))
    _assert_one_epoch(seen, 0)


def test_state_after_a_full_epoch_starts_the_next(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N)
    loader = StreamingDataLoader(_dataset(url, 0, 1))
    epoch0 = _indices(list(loader))
    fresh = StreamingDataLoader(_dataset(url, 0, 1))
    fresh.load_state_dict(loader.state_dict())
    epoch1 = _indices(list(fresh))
    assert fresh.epoch == 1
    assert sorted(epoch1) == list(range(N))
    assert epoch1 != epoch0
    reference = StreamingDataLoader(_dataset(url, 0, 1))
    list(reference)
    assert _indices(list(reference)) == epoch1


def test_loading_a_foreign_or_mismatched_state_fails_clearly(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N)
    loader = StreamingDataLoader(_dataset(url, 0, 1))
    with pytest.raises(ValueError, match="not saved by a StreamingDataLoader"):
        loader.load_state_dict({"_num_yielded": 3})
    other = StreamingDataLoader(StreamingDataset(url, batch_size=BATCH + 1, rank=0, world_size=1))
    list(islice(iter(other), 2))
    loader.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="saved with other dataset settings"):
        list(loader)
    state = other.state_dict()
    state["lightning_patterns"]["format"] = 99
    with pytest.raises(ValueError, match="Unknown streaming state format 99"):
        loader.load_state_dict(state)


def test_dataset_state_with_another_topology_points_to_the_loader(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N)
    loader = StatefulDataLoader(_dataset(url, 0, 2), batch_size=None)
    list(islice(iter(loader), 3))
    state = loader.state_dict()
    fresh = StatefulDataLoader(_dataset(url, 0, 1), batch_size=None)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="Resume through StreamingDataLoader"):
        list(fresh)


def test_batches_per_worker_is_round_robin() -> None:
    assert batches_per_worker([3, 3], 0) == [0, 0]
    assert batches_per_worker([3, 3], 5) == [3, 2]
    assert batches_per_worker([4, 3, 3], 8) == [3, 3, 2]
    assert batches_per_worker([4, 3, 3], 10) == [4, 3, 3]
    assert batches_per_worker([2, 0], 2) == [2, 0]
    with pytest.raises(ValueError, match="batches_yielded=11 is out of range"):
        batches_per_worker([4, 3, 3], 11)


def test_resume_point_round_trips_through_builtins() -> None:
    config = PlanConfig((3, 0, 5), 2, 1, True, False, 4, None)
    point = ResumePoint(2, 3, 2, 1, config, ((0, 1, 3), (2, 0, 5)))
    state = point.to_state()
    assert ResumePoint.from_state(state) == point
    assert all(isinstance(value, (int, bool, list, dict, type(None))) for value in state.values())
