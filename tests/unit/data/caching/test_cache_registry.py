"""make_cache and the cache registry: names, instances, and one clear error per invalid argument."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_patterns.data.caching import (
    CacheConfig,
    DiskEpochCache,
    MemoryEpochCache,
    make_cache,
)
from lightning_patterns.data.caching import __all__ as public_names
from lightning_patterns.testing.contracts import CountingSource


def test_public_names_are_sorted() -> None:
    assert public_names == sorted(public_names)


def test_names_build_their_caches(tmp_path: Path) -> None:
    memory = make_cache("memory", cache_dir=None, cache_limit=123)
    assert isinstance(memory, MemoryEpochCache)
    assert memory.cache_limit == 123
    disk = make_cache("disk", cache_dir=str(tmp_path), cache_limit=None)
    assert isinstance(disk, DiskEpochCache)
    assert disk.cache_dir == str(tmp_path)
    instance = MemoryEpochCache()
    assert make_cache(instance, cache_dir=None, cache_limit=None) is instance
    assert make_cache(None, cache_dir=None, cache_limit=None) is None


def test_cache_configs_build_their_caches(tmp_path: Path) -> None:
    disk = make_cache(CacheConfig("disk", cache_dir=str(tmp_path), cache_limit=7), cache_dir=None, cache_limit=None)
    assert isinstance(disk, DiskEpochCache)
    assert (disk.cache_dir, disk.cache_limit) == (str(tmp_path), 7)
    memory = make_cache(CacheConfig("memory", cache_limit=5), cache_dir=None, cache_limit=None)
    assert isinstance(memory, MemoryEpochCache)
    assert memory.cache_limit == 5


@pytest.mark.parametrize(
    ("cache", "kwargs", "message"),
    [
        ("ram", {}, r"Unknown cache 'ram'\. Expected one of: 'disk', 'memory'"),
        ("disk", {}, r"cache='disk' needs a folder.*`cache_dir` is None.*cache_dir='/local/ssd"),
        ("memory", {"cache_limit": -1}, r"`cache_limit` must be a number of bytes >= 0.*cache_limit=-1"),
        ("disk", {"cache_dir": "x", "cache_limit": -5}, r"cache_limit=-5"),
        ("memory", {"cache_limit": 1.5}, r"cache_limit=1\.5"),
        ("memory", {"cache_dir": "/tmp/c"}, r"cache='memory' .* takes no folder.*cache_dir='/tmp/c'"),
        (None, {"cache_dir": "/tmp/c"}, r"cache_dir='/tmp/c' given with cache=None.*pass cache='disk'"),
        (MemoryEpochCache(), {"cache_limit": 10}, r"cache_limit=10 given with .*set them on the MemoryEpochCache"),
        (
            CacheConfig("disk", cache_dir="d"),
            {"cache_dir": "/tmp/c"},
            r"cache_dir='/tmp/c' given with cache=CacheConfig\(name='disk'.*set them in the CacheConfig instead",
        ),
        (CacheConfig("disk"), {}, r"cache='disk' needs a folder.*`cache_dir` is None"),
        (CacheConfig("memory", cache_dir="/tmp/c"), {}, r"cache='memory' .* takes no folder.*cache_dir='/tmp/c'"),
    ],
)
def test_invalid_arguments_are_explained(cache: Any, kwargs: dict[str, Any], message: str) -> None:
    options = {"cache_dir": None, "cache_limit": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_cache(cache, **options)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MemoryEpochCache(-1), r"cache_limit=-1"),
        (lambda: MemoryEpochCache(fill_timeout=0), r"`fill_timeout` must be a positive.*fill_timeout=0"),
        (lambda: DiskEpochCache(""), r"`cache_dir` must be a folder path, got cache_dir=''"),
        (lambda: DiskEpochCache("d", min_free_bytes=-1), r"`min_free_bytes` must be .* min_free_bytes=-1"),
        (lambda: DiskEpochCache("d", lock_timeout=0), r"`lock_timeout` must be a positive.*lock_timeout=0"),
        (lambda: DiskEpochCache("d", cache_limit=-2), r"cache_limit=-2"),
        (lambda: CacheConfig("ram"), r"CacheConfig\(name='ram'\) names no cache\. Expected one of: 'disk', 'memory'"),
        (
            lambda: CacheConfig("memory", cache_limit=-3),
            r"`cache_limit` must be a number of bytes >= 0.*cache_limit=-3",
        ),
    ],
)
def test_invalid_constructor_arguments_are_explained(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_disk_cache_needs_sha256_checksums(source: CountingSource, tmp_path: Path) -> None:
    import dataclasses

    shards = (dataclasses.replace(source.manifest.shards[0], checksum="md5:abc"), *source.manifest.shards[1:])
    manifest = dataclasses.replace(source.manifest, shards=shards)
    with pytest.raises(ValueError, match=r"names entries by their sha256, but shard 0 .* checksum 'md5:abc'"):
        DiskEpochCache(tmp_path).bind(manifest)


def test_streaming_dataset_reports_cache_errors(source: CountingSource) -> None:
    from lightning_patterns.data.streaming.dataset import StreamingDataset

    with pytest.raises(ValueError, match="Unknown cache 'ssd'"):
        StreamingDataset(str(source.root), cache="ssd")
    with pytest.raises(ValueError, match="cache='disk' needs a folder"):
        StreamingDataset(str(source.root), cache="disk")
