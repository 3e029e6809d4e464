"""Epoch caching over a real HTTP server: what each epoch reads from the remote, counted by the server.

With a cache as large as the dataset, epoch 2 reads 0 bytes from the remote (memory and disk, 0 and 2
DataLoader workers); with a smaller cache each later epoch reads at most ``dataset - cache + one shard``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.shards.manifest import Manifest
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.synthetic import fashion_like_arrays
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

pytestmark = pytest.mark.remote

# fsspec's shared HTTP filesystem instance can hang in the main process after DataLoader workers were forked
# from it (see the report of issue 5); a private instance per dataset avoids it.
STORAGE = {"skip_instance_cache": True}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultInjectingHTTPServer, Manifest]]:
    root = tmp_path_factory.mktemp("remote")
    images, labels = fashion_like_arrays(3000)
    samples = [{"image": images[i], "label": int(labels[i])} for i in range(len(labels))]
    manifest = write_dataset(samples, str(root / "ds"), shard_bytes=192 * 1024, progress=False)
    with serve_directory(root) as server:
        yield server, manifest


def _epoch(loader: StreamingDataLoader, server: FaultInjectingHTTPServer) -> tuple[int, torch.Tensor, int]:
    server.reset_log()
    labels = torch.cat([batch["label"] for batch in loader])
    return server.bytes_sent, labels, int(labels.numel())


def _dataset(server: FaultInjectingHTTPServer, **kwargs: Any) -> StreamingDataset:
    return StreamingDataset(server.url + "/ds", batch_size=100, storage_options=STORAGE, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_epoch_two_reads_nothing_from_the_remote(
    served: tuple[FaultInjectingHTTPServer, Manifest], tmp_path: Path, cache: str, num_workers: int
) -> None:
    server, manifest = served
    expected = torch.cat([b["label"] for b in StreamingDataLoader(_dataset(server), num_workers=num_workers)])
    options = {"cache_dir": str(tmp_path / "cache")} if cache == "disk" else {}
    dataset = _dataset(server, cache=cache, **options)
    loader = StreamingDataLoader(dataset, num_workers=num_workers)
    first, labels1, _ = _epoch(loader, server)
    assert first == manifest.num_bytes  # every shard exactly once, also with 2 workers
    assert dataset.metrics()["remote_bytes"] == manifest.num_bytes
    second, labels2, _ = _epoch(loader, server)
    assert second == 0
    assert server.request_count == 0
    assert dataset.metrics()["remote_bytes"] == manifest.num_bytes
    assert torch.equal(labels1, expected)
    assert torch.equal(labels2, expected)
    metrics = dataset.metrics()
    assert metrics["cache_misses"] == len(manifest.shards)
    assert metrics["cache_hits"] >= len(manifest.shards)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_smaller_cache_bounds_what_later_epochs_read(
    served: tuple[FaultInjectingHTTPServer, Manifest], tmp_path: Path, cache: str, shuffle: bool
) -> None:
    """One process reads each shard once per epoch, shuffled or not, so the bound is exact."""
    server, manifest = served
    limit = int(manifest.num_bytes * 0.45)
    largest = max(shard.num_bytes for shard in manifest.shards)
    options: dict[str, Any] = {"cache_limit": limit}
    if cache == "disk":
        options["cache_dir"] = str(tmp_path / "cache")
    loader = StreamingDataLoader(_dataset(server, cache=cache, shuffle=shuffle, seed=3, **options))
    first, _, count = _epoch(loader, server)
    assert first == manifest.num_bytes
    for _ in range(2):
        later, _, count = _epoch(loader, server)
        assert count == manifest.num_samples
        assert 0 < later <= manifest.num_bytes - limit + largest


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_smaller_cache_saves_its_size_with_shuffle_and_workers(
    served: tuple[FaultInjectingHTTPServer, Manifest], tmp_path: Path, cache: str
) -> None:
    """With 2 workers a shard on the boundary between them is read by both when it is not cached, so compare
    with the same loader without a cache: every later epoch reads at least ``cache_limit - one shard`` less."""
    server, manifest = served
    limit = int(manifest.num_bytes * 0.45)
    largest = max(shard.num_bytes for shard in manifest.shards)
    options: dict[str, Any] = {"cache_limit": limit}
    if cache == "disk":
        options["cache_dir"] = str(tmp_path / "cache")
    settings: dict[str, Any] = {"shuffle": True, "seed": 3}
    plain = StreamingDataLoader(_dataset(server, **settings), num_workers=2)
    cached = StreamingDataLoader(_dataset(server, cache=cache, **settings, **options), num_workers=2)
    _epoch(plain, server)
    _epoch(cached, server)
    for _ in range(2):
        uncached_bytes, expected, _ = _epoch(plain, server)
        cached_bytes, labels, _ = _epoch(cached, server)
        assert torch.equal(labels, expected)
        assert cached_bytes <= uncached_bytes - limit + largest


@pytest.mark.slow
def test_spawned_workers_share_the_memory_cache(served: tuple[FaultInjectingHTTPServer, Manifest]) -> None:
    server, manifest = served
    dataset = _dataset(server, cache="memory")
    loader = StreamingDataLoader(dataset, num_workers=1, multiprocessing_context="spawn")
    first, _, _ = _epoch(loader, server)
    second, labels, _ = _epoch(loader, server)
    assert (first, second) == (manifest.num_bytes, 0)
    assert labels.numel() == manifest.num_samples
