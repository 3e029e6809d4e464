from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_patterns.data.shards import load_manifest
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.streaming.options import ClassBalance, ReadAhead
from lightning_patterns.exceptions import ManifestError


def _indices(batches: list[dict[str, Any]]) -> list[int]:
    return [int(i) for batch in batches for i in batch["index"]]


def test_yields_every_sample_once_in_manifest_order_without_shuffle(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(500)
    manifest = load_manifest(url)
    batches = list(StreamingDataset(url, batch_size=64))
    assert [len(b["index"]) for b in batches] == [64] * 7 + [52]
    # Manifest order: shard by shard, each shard's samples in stored order.
    expected = []
    for shard in manifest.shards:
        from lightning_patterns.data.shards import read_shard

        expected += read_shard(url, shard).read_range(0, shard.num_samples)["index"].tolist()
    assert _indices(batches) == expected
    assert sorted(expected) == list(range(500))
    assert batches[0]["image"].shape == (64, 4, 4)
    assert batches[0]["image"].dtype == torch.uint8


def test_single_samples_with_a_dataloader_batch_size(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(300)
    dataset = StreamingDataset(url, shuffle=True, seed=3)
    assert len(dataset) == 300
    batches = list(DataLoader(dataset, batch_size=32))
    assert sorted(_indices(batches)) == list(range(300))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_batches_and_every_sample_is_seen(
    make_dataset: Callable[..., str], world_size: int, num_workers: int
) -> None:
    url = make_dataset(503, num_shards=6)
    seen: Counter[int] = Counter()
    counts = []
    for rank in range(world_size):
        dataset = StreamingDataset(url, batch_size=16, shuffle=True, seed=1, rank=rank, world_size=world_size)
        batches = list(StreamingDataLoader(dataset, num_workers=num_workers))
        counts.append(len(batches))
        assert len(batches) == len(dataset)
        seen.update(_indices(batches))
    assert len(set(counts)) == 1
    assert set(seen) == set(range(503))
    assert sum(seen.values()) - 503 <= world_size - 1


def test_shuffle_is_deterministic_and_changes_every_epoch(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(400)
    first = StreamingDataLoader(StreamingDataset(url, batch_size=50, shuffle=True, seed=7))
    second = StreamingDataLoader(StreamingDataset(url, batch_size=50, shuffle=True, seed=7))
    epoch0, epoch0_again = _indices(list(first)), _indices(list(second))
    assert epoch0 == epoch0_again
    epoch1 = _indices(list(first))
    assert first.epoch == 1
    assert epoch0 != epoch1
    assert sorted(epoch0) == sorted(epoch1) == list(range(400))
    assert epoch0 != sorted(epoch0)


def test_metrics_count_remote_bytes_and_samples(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(300)
    dataset = StreamingDataset(url, batch_size=32)
    loader = StreamingDataLoader(dataset, num_workers=0)
    list(loader)
    metrics = loader.metrics()
    assert metrics["samples"] == 300
    assert metrics["remote_bytes"] == load_manifest(url).num_bytes
    assert metrics["remote_requests"] >= len(load_manifest(url).shards)
    assert metrics["loader_wait_seconds"] > 0


def test_metrics_count_an_epoch_whose_last_batch_was_taken_but_not_past(make_dataset: Callable[..., str]) -> None:
    # Lightning takes len(loader) batches and never asks for one more, so the generator is left suspended.
    url = make_dataset(300)
    dataset = StreamingDataset(url, batch_size=32)
    loader = StreamingDataLoader(dataset, num_workers=0)
    batches = iter(loader)
    for _ in range(len(loader)):
        next(batches)
    metrics = loader.metrics()
    assert metrics["samples"] == 300
    assert metrics["remote_bytes"] == load_manifest(url).num_bytes


def test_metrics_are_summed_over_worker_processes(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(300)
    dataset = StreamingDataset(url, batch_size=32)
    loader = StreamingDataLoader(dataset, num_workers=2)
    list(loader)
    metrics = loader.metrics()
    assert metrics["samples"] == 300
    # Each worker reads its own contiguous span; only a shard on the boundary may be read by both.
    assert load_manifest(url).num_bytes <= metrics["remote_bytes"] <= 2 * load_manifest(url).num_bytes


def test_bounded_read_ahead_still_yields_everything(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(600, num_shards=12)
    dataset = StreamingDataset(url, batch_size=40, read_ahead=ReadAhead(shards=0, max_bytes=1, threads=1))
    assert sorted(_indices(list(dataset))) == list(range(600))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"`batch_size` must be at least 1 \(or None\), got batch_size=0"),
        ({"span_samples": 0}, r"Expected span_samples >= 1 or None, got span_samples=0"),
        ({"seed": -1}, r"Expected seed >= 0, got seed=-1"),
        ({"shuffle_window": -2}, r"Expected shuffle_window >= 0, got shuffle_window=-2"),
        ({"rank": 2, "world_size": 2}, r"0 <= rank < world_size, got rank=2 with world_size=2 \(from the arguments\)"),
        ({"rank": 0, "world_size": 0}, r"Expected world_size >= 1, got world_size=0 \(from the arguments\)"),
        ({"rank": 0}, r"Give both rank and world_size or neither"),
        ({"cache": "nope"}, r"nope"),
        ({"min_per_class": 2, "class_balance": ClassBalance(3)}, r"Both min_per_class=2 and class_balance=ClassB"),
    ],
)
def test_invalid_arguments(make_dataset: Callable[..., str], kwargs: dict[str, Any], message: str) -> None:
    url = make_dataset(20)
    with pytest.raises(ValueError, match=message):
        StreamingDataset(url, **kwargs)


def test_missing_dataset_names_the_url(tmp_path: Any) -> None:
    with pytest.raises(ManifestError, match="nowhere"):
        StreamingDataset(str(tmp_path / "nowhere"))


def test_rank_from_the_environment(make_dataset: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    url = make_dataset(100)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dataset = StreamingDataset(url, batch_size=10)
    assert dataset.rank_and_world_size == (1, 2)
    assert len(_indices(list(dataset))) == 50
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match=r"RANK='two' is not an integer"):
        StreamingDataset(url, batch_size=10)
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"rank=5 with world_size=2 \(from the RANK and WORLD_SIZE environment"):
        StreamingDataset(url, batch_size=10)


def test_loader_refuses_settings_the_dataset_owns(make_dataset: Callable[..., str]) -> None:
    url = make_dataset(20)
    with pytest.raises(ValueError, match="needs the dataset to yield whole batches"):
        StreamingDataLoader(StreamingDataset(url))
    with pytest.raises(ValueError, match="decides batch_size, shuffle itself"):
        StreamingDataLoader(StreamingDataset(url, batch_size=4), batch_size=4, shuffle=True)
    with pytest.raises(TypeError, match="needs a StreamingDataset"):
        StreamingDataLoader(np.arange(3))  # type: ignore[arg-type]


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_shard_is_fetched_once_per_epoch(make_dataset: Callable[..., str], shuffle: bool) -> None:
    # Small shards and a window spanning several of them: shards are reached out of turn, never fetched twice.
    url = make_dataset(5000, num_shards=13)
    loader = StreamingDataLoader(StreamingDataset(url, batch_size=64, shuffle=shuffle, shuffle_window=1024))
    for _ in range(2):
        list(loader)
    assert loader.metrics()["remote_requests"] == 2 * 13
