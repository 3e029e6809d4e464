"""The dataset's single cursor: one way in (`reset`), one way out (`state_dict`)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

import pytest

from lightning_patterns.data.streaming.cursor import StreamCursor
from lightning_patterns.data.streaming.dataset import StreamingDataset

N = 230
BATCH = 10


def _indices(batches: list[dict[str, Any]]) -> list[int]:
    return [int(i) for batch in batches for i in batch["index"]]


def _dataset(url: str) -> StreamingDataset:
    return StreamingDataset(url, batch_size=BATCH, shuffle=True, seed=5, shuffle_window=16)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StreamCursor(-1), r"`epoch` must be >= 0, got epoch=-1"),
        (lambda: StreamCursor(0, delivered=(2, -1)), r"Units delivered must be >= 0 per worker, got delivered=\(2, -1"),
    ],
)
def test_invalid_cursors_name_the_value(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_cursor_values() -> None:
    cursor = StreamCursor(2, ((0, 1, 3),), (4, 3))
    assert [cursor.delivered_by(w) for w in range(3)] == [4, 3, 0]
    assert cursor.next_epoch() == StreamCursor(3)
    assert StreamCursor(2) == StreamCursor(epoch=2, stream=None, delivered=())


def test_an_iteration_without_reset_reads_the_next_epoch(make_dataset: Callable[..., str]) -> None:
    dataset = _dataset(make_dataset(N))
    assert dataset.cursor == StreamCursor()
    epoch0 = _indices(list(dataset))
    epoch1 = _indices(list(dataset))
    assert dataset.cursor == StreamCursor(1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(N))
    assert epoch0 != epoch1
    dataset.set_epoch(0)  # one line into reset
    assert dataset.cursor == StreamCursor(0)
    assert _indices(list(dataset)) == epoch0
    dataset.reset(StreamCursor(1))
    assert _indices(list(dataset)) == epoch1


def test_reset_with_a_state_continues_exactly_and_reports_where_it_stands(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N)
    whole = _indices(list(_dataset(url)))
    dataset = _dataset(url)
    before = _indices(list(islice(iter(dataset), 7)))
    state = dataset.state_dict()
    assert (state["epoch"], state["units_yielded"], state["stream"]) == (0, 7, None)
    fresh = _dataset(url)
    fresh.reset(state)
    assert fresh.cursor == StreamCursor(0, None, (7,))
    assert fresh.state_dict() == state  # the way out gives back what came in, before any batch
    after = _indices(list(fresh))
    assert before + after == whole
    assert fresh.state_dict()["units_yielded"] == len(dataset) == -(-N // BATCH)


def test_reset_without_a_state_restarts_the_current_epoch(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N)
    dataset = _dataset(url)
    dataset.set_epoch(3)
    epoch3 = _indices(list(dataset))
    list(islice(iter(dataset), 2))  # epoch 4, abandoned
    dataset.reset()
    assert dataset.cursor == StreamCursor(4)
    fresh = _dataset(url)
    fresh.set_epoch(4)
    assert _indices(list(dataset)) == _indices(list(fresh)) != epoch3


def test_an_iteration_abandoned_before_a_reset_no_longer_moves_the_cursor(make_dataset: Callable[..., str]) -> None:
    dataset = _dataset(make_dataset(N))
    old = iter(dataset)
    next(old)
    dataset.reset(StreamCursor(2))
    next(old)
    assert (dataset.state_dict()["epoch"], dataset.state_dict()["units_yielded"]) == (2, 0)
    new = iter(dataset)
    next(new)
    next(old)
    assert dataset.state_dict()["units_yielded"] == 1
