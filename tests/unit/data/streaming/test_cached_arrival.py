"""A cached shard is read while it arrives, like an uncached one, and kept only once every byte is verified."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.caching import DiskEpochCache, MemoryEpochCache
from lightning_patterns.data.caching.layout import store_root
from lightning_patterns.data.shards import load_manifest, write_dataset
from lightning_patterns.data.shards.reader import parse_header
from lightning_patterns.data.streaming import StreamingDataset
from lightning_patterns.exceptions import ChecksumMismatchError

BLOCK = 4096
N = 3000  # one shard of 2.4 MB: more than its first request (the head and 1 MiB of rows)
BATCH = 16


@pytest.fixture
def one_shard(tmp_path: Path) -> str:
    rng = np.random.default_rng(5)
    samples = [{"image": rng.integers(0, 256, size=(28, 28), dtype=np.uint8), "label": np.int64(i)} for i in range(N)]
    url = str(tmp_path / "data")
    write_dataset(samples, url, shard_bytes=4 << 20, block_bytes=BLOCK, progress=False)
    assert len(load_manifest(url).shards) == 1
    return url


def _shard_file(url: str) -> Path:
    return Path(url) / load_manifest(url).shards[0].path


def _image_middle(url: str) -> int:
    """A byte in the middle of the image column: far from the first batch's rows, in a later request."""
    data = _shard_file(url).read_bytes()
    column = parse_header(data, len(data)).columns["image"]
    return column.offset + column.nbytes // 2


def _make_cache(kind: str, tmp_path: Path) -> Any:
    return MemoryEpochCache() if kind == "memory" else DiskEpochCache(tmp_path / "cache", min_free_bytes=0)


def _kept(cache: Any) -> bytes | None:
    """The bytes the cache keeps for shard 0 (for the disk cache: its entry file), or ``None``."""
    cache.flush()
    if isinstance(cache, MemoryEpochCache):
        return bytes(cache._view(0)) if cache._ready[0] else None
    entries = list((store_root(cache.cache_dir) / "entries").glob("*.lps"))
    return entries[0].read_bytes() if entries else None


class _Gate:
    """Holds every request for the byte ``held`` of the shard until :meth:`open`; records the requests."""

    def __init__(self, dataset: StreamingDataset, held: int) -> None:
        self.opened = threading.Event()
        self.held_requests = 0
        read = dataset._reader.read_range_into

        def gated(url: str, start: int, buffer: memoryview, **kwargs: Any) -> Any:
            if start <= held < start + len(buffer):
                self.held_requests += 1
                assert self.opened.wait(30), "the test never opened the gate"
            return read(url, start, buffer, **kwargs)

        dataset._reader.read_range_into = gated  # type: ignore[method-assign]

    def open(self) -> None:
        self.opened.set()


def _first(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The first batch, taken in a thread so that a reader that waits for the whole shard fails instead of hanging."""
    got: list[dict[str, Any]] = []
    taker = threading.Thread(target=lambda: got.append(next(batches)), daemon=True)
    taker.start()
    taker.join(10)
    assert got, "the first batch waited for the held request: the shard was not read while it arrived"
    return got[0]


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_cached_shards_first_batch_comes_before_its_last_byte_and_it_is_kept_once_whole(
    one_shard: str, tmp_path: Path, kind: str
) -> None:
    cache = _make_cache(kind, tmp_path)
    dataset = StreamingDataset(one_shard, batch_size=BATCH, cache=cache)
    gate = _Gate(dataset, _image_middle(one_shard))
    batches = iter(dataset)
    try:
        first = _first(batches)
        assert first["label"].tolist() == list(range(BATCH))
        assert gate.held_requests == 1
        assert _kept(cache) is None  # nothing is kept while a byte is missing
    finally:
        gate.open()
    labels = first["label"].tolist() + [label for batch in batches for label in batch["label"].tolist()]
    assert labels == list(range(N))
    assert _kept(cache) == _shard_file(one_shard).read_bytes()
    remote = dataset.metrics()["remote_bytes"]
    assert remote == load_manifest(one_shard).num_bytes  # one download, the cache filled from its buffer
    assert sum(len(batch["label"]) for batch in dataset) == N
    assert dataset.metrics()["remote_bytes"] == remote  # the next epoch reads the cache


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_corrupt_block_of_a_cached_arriving_shard_fails_its_readers_and_nothing_is_kept(
    one_shard: str, tmp_path: Path, kind: str
) -> None:
    path = _shard_file(one_shard)
    good = path.read_bytes()
    corrupt = bytearray(good)
    corrupt[_image_middle(one_shard)] ^= 0xFF  # a block the first batch does not need
    path.write_bytes(bytes(corrupt))
    cache = _make_cache(kind, tmp_path)
    dataset = StreamingDataset(one_shard, batch_size=BATCH, cache=cache)
    with pytest.raises(ChecksumMismatchError, match=r"block \d+ of \d+ \(bytes"):
        list(dataset)
    assert _kept(cache) is None
    path.write_bytes(good)  # the remote is repaired: the next epoch fetches the shard again and keeps it
    assert sum(len(batch["label"]) for batch in dataset) == N
    assert _kept(cache) == good


def test_a_cache_that_only_implements_get_or_fetch_keeps_whole_verified_shards(one_shard: str) -> None:
    from lightning_patterns.data.caching import EpochCache

    class DictCache(EpochCache):
        name = "dict_for_test"

        def __init__(self) -> None:
            super().__init__()
            self.kept: dict[int, bytes] = {}

        def bind(self, manifest: Any) -> None:
            pass

        def get_or_fetch(self, shard: int, fetch: Any) -> Any:
            if shard not in self.kept:
                self.kept[shard] = bytes(fetch())
            return self.kept[shard]

    cache = DictCache()
    dataset = StreamingDataset(one_shard, batch_size=BATCH, cache=cache)
    for _ in range(2):
        assert [label for batch in dataset for label in batch["label"].tolist()] == list(range(N))
    assert cache.kept == {0: _shard_file(one_shard).read_bytes()}
    assert dataset.metrics()["remote_bytes"] == load_manifest(one_shard).num_bytes
