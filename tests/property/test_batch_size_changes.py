"""Changing the batch size mid-epoch, any number of times, at any batches: every sample of the epoch once.

Each example reads one epoch on every rank of a world (ranks simulated in one process, each with its own
dataset and loader, as DDP gives each process its own), changes the batch size at the same batches on every
rank, optionally checkpoints (with Lightning's one-batch prefetch lag) and resumes in a fresh loader, and
compares the samples delivered with an epoch read at one batch size.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader

N = 101  # prime: no world size divides it, so the padding samples are exercised too
FIRST_BATCH = 8


class _Indexed:
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": np.int64(i), "label": np.int64(i % 10)}


@pytest.fixture(scope="module")
def dataset_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(Path(tmp_path_factory.mktemp("switch")) / "data")
    write_dataset(_Indexed(), url, num_shards=5, progress=False)
    return url


def _loader(url: str, rank: int, world_size: int, drop_last: bool) -> StreamingDataLoader:
    dataset = StreamingDataset(
        url,
        batch_size=FIRST_BATCH,
        shuffle=True,
        seed=3,
        shuffle_window=8,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    loader = StreamingDataLoader(dataset)
    loader.track_consumption()
    return loader


def _read_epoch(
    url: str,
    rank: int,
    world_size: int,
    drop_last: bool,
    changes: list[tuple[int, int]],
    checkpoint_at: int | None,
) -> tuple[list[int], list[int], list[int]]:
    """One rank's epoch: ``changes`` are (batches after the previous change, new size); returns indices, sizes and
    the (batch, size) switches applied."""
    loader = _loader(url, rank, world_size, drop_last)
    queue = list(changes)
    indices: list[int] = []
    sizes: list[int] = []
    applied: list[int] = []
    batch_idx, due = 0, -1

    def schedule() -> None:
        nonlocal due
        if due < batch_idx and queue:
            gap, size = queue.pop(0)
            # Lightning has fetched one batch ahead: the earliest switch is past the prefetched batch.
            at = batch_idx + 1 + gap
            if at < len(loader):
                loader.set_batch_size(size, at_batch=at)
                due = at
                applied.append(at)

    iterator = iter(loader)
    prefetched = next(iterator, None)
    while prefetched is not None:
        batch = prefetched
        prefetched = next(iterator, None)  # the Trainer's prefetch, before it trains on `batch`
        loader.mark_consumed()
        indices.extend(int(i) for i in batch["index"])
        sizes.append(len(batch["index"]))
        batch_idx += 1
        if checkpoint_at is not None and batch_idx == checkpoint_at and prefetched is not None:
            state = loader.state_dict()
            # A fresh job: the loader starts at the first batch size; the state carries the current one.
            loader = _loader(url, rank, world_size, drop_last)
            loader.load_state_dict(state)
            iterator = iter(loader)
            prefetched = next(iterator, None)
            due = -1
        schedule()
    assert batch_idx == len(loader), f"rank {rank}: {batch_idx} batches, but len() said {len(loader)}"
    return indices, sizes, applied


@settings(max_examples=25, deadline=None)
@given(
    world_size=st.integers(1, 3),
    drop_last=st.booleans(),
    changes=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 13)), max_size=5),
    checkpoint_at=st.none() | st.integers(1, 12),
)
def test_every_sample_once_across_batch_size_changes(
    dataset_url: str, world_size: int, drop_last: bool, changes: list[tuple[int, int]], checkpoint_at: int | None
) -> None:
    changed: Counter[int] = Counter()
    unchanged: Counter[int] = Counter()
    counts, switches = set(), []
    for rank in range(world_size):
        indices, sizes, applied = _read_epoch(dataset_url, rank, world_size, drop_last, changes, checkpoint_at)
        plain, _, _ = _read_epoch(dataset_url, rank, world_size, drop_last, [], None)
        changed.update(indices)
        unchanged.update(plain)
        counts.add(len(sizes))
        switches.append(applied)
        if applied and checkpoint_at is None:
            # The change took effect: the batch at each switch has the size asked for (unless it is the last).
            for at, (_, size) in zip(applied, changes, strict=False):
                assert sizes[at] <= size
    assert len(counts) == 1, f"ranks yielded different numbers of batches: {counts}"
    assert all(s == switches[0] for s in switches), "every rank must switch at the same batches"
    # Exactly the samples of an epoch read at one batch size: each sample once (plus the same padding repeats).
    assert changed == unchanged
    if drop_last:
        assert all(count == 1 for count in changed.values())
    else:
        assert set(changed) == set(range(N))
        assert sum(changed.values()) - N == (-N) % world_size
