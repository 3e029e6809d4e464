"""Changing a stream's batch size: the errors that say what to do instead, and a switch with DataLoader workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import islice

import pytest

from lightning_patterns.data import ShardedStreamingDataModule
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader

N = 203


def test_switch_with_workers_delivers_each_sample_once(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N, num_shards=4)
    loader = StreamingDataLoader(StreamingDataset(url, batch_size=8, shuffle=True, seed=2), num_workers=2)
    iterator = iter(loader)
    first = list(islice(iterator, 5))
    loader.set_batch_size(20, at_batch=5)
    rest = list(iterator)
    assert [len(batch["index"]) for batch in first] == [8] * 5
    assert max(len(batch["index"]) for batch in rest) == 20
    seen = Counter(int(i) for batch in first + rest for i in batch["index"])
    assert seen == Counter(range(N))
    assert len(first) + len(rest) == len(loader)


def test_switch_errors_say_what_to_do(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(N, num_shards=4)
    loader = StreamingDataLoader(StreamingDataset(url, batch_size=8))
    iterator = iter(loader)
    list(islice(iterator, 3))
    with pytest.raises(ValueError, match=r"at_batch=1 of epoch 0: .* delivered 3 of its 26 batches, so at_batch must"):
        loader.set_batch_size(16, at_batch=1)
    with pytest.raises(ValueError, match=r"must lie in \[3, 26\)\. Pass a later batch, or at_batch=None"):
        loader.set_batch_size(16, at_batch=26)
    with pytest.raises(ValueError, match="`batch_size` must be at least 1, got batch_size=0"):
        loader.set_batch_size(0, at_batch=5)
    single = StreamingDataset(url)
    with pytest.raises(
        ValueError, match=r"yields single samples \(batch_size=None\).*construct it with `batch_size=N`"
    ):
        single.set_batch_size(4)
    balanced = StreamingDataset(url, batch_size=20, min_per_class=1)
    with pytest.raises(ValueError, match=r"min_per_class=1\) keep the batch size they were built with \(20\)"):
        StreamingDataLoader(balanced).set_batch_size(30, at_batch=2)


def test_datamodule_keeps_class_balanced_batch_size() -> None:
    data = ShardedStreamingDataModule(train_url="unused", batch_size=20, min_per_class=1)
    with pytest.raises(ValueError, match="Class-balanced batches keep the batch size they were built with"):
        data.set_batch_size(40, at_batch=3)
