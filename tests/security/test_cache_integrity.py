"""Issue 16, item 4: a disk cache entry corrupted in place is caught on the next read, even with its mtime kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from attack_helpers import HostileServer, make_dataset, read_manifest_json, split_shard

from lightning_patterns.data.caching import CacheEntryCorruptWarning, DiskEpochCache
from lightning_patterns.data.caching.layout import store_root
from lightning_patterns.data.streaming import StreamingDataset

pytestmark = pytest.mark.remote


def _epoch(dataset: StreamingDataset) -> dict[int, np.ndarray]:
    return {int(i): image.numpy() for batch in dataset for i, image in zip(batch["index"], batch["image"], strict=True)}


def _entry(cache_dir: Path, checksum: str) -> Path:
    return store_root(cache_dir) / "entries" / f"{checksum.removeprefix('sha256:')}.lps"


def _corrupt_keeping_mtime(path: Path) -> None:
    """Flip the first byte of the first image, in place, and put the mtime back."""
    before = path.stat()
    at = split_shard(path.read_bytes())[0]["fields"]["image"]["offset"]
    # Past the file system's timestamp granularity, which the README names as the one window the check has.
    time.sleep(0.05)
    with path.open("r+b") as f:
        f.seek(at)
        first = f.read(1)
        f.seek(at)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns  # what gives the write away


def _shard_gets(server: HostileServer, path: str) -> int:
    return len([r for r in server.requests if r.path.endswith("/" + path)])


def test_an_entry_corrupted_in_place_with_its_mtime_kept_is_caught_on_the_next_read(
    hostile: HostileServer, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    shards = read_manifest_json(folder)["shards"]
    url = hostile.serve_folder("data", folder)
    dataset = StreamingDataset(url, batch_size=8, cache="disk", cache_dir=str(tmp_path / "cache"))
    first = _epoch(dataset)
    second = _epoch(dataset)  # every entry verified and its signature recorded, in this very process
    dataset.cache.flush()  # entries are written in the background: wait for the last ones before corrupting one
    assert all(_shard_gets(hostile, shard["path"]) == 1 for shard in shards)
    entry = _entry(tmp_path / "cache", shards[1]["checksum"])
    _corrupt_keeping_mtime(entry)
    with pytest.warns(CacheEntryCorruptWarning, match=rf"{entry}.*is corrupt or truncated") as caught:
        third = _epoch(dataset)
    assert len(caught) == 1
    assert sorted(first) == sorted(second) == sorted(third) == list(range(48))
    assert all(np.array_equal(first[i], third[i]) for i in first)  # the corrupt bytes were never served
    assert _shard_gets(hostile, shards[1]["path"]) == 2  # fetched again, and only that shard
    assert all(_shard_gets(hostile, shard["path"]) == 1 for i, shard in enumerate(shards) if i != 1)


def test_verify_every_read_catches_what_the_signature_cannot(hostile: HostileServer, tmp_path: Path) -> None:
    # A change below the file system (a failing disk) leaves the stat signature as it was. Simulate it by
    # recording the corrupted entry's signature as verified: the default check then trusts it (the README says
    # so: the next run's first read catches it), while verify_every_read=True checks every read in full.
    folder = tmp_path / "data"
    make_dataset(folder)
    shard = read_manifest_json(folder)["shards"][0]
    url = hostile.serve_folder("data", folder)
    for every_read in (False, True):
        cache_dir = tmp_path / f"cache-{every_read}"
        cache = DiskEpochCache(cache_dir, min_free_bytes=0, verify_every_read=every_read)
        dataset = StreamingDataset(url, batch_size=48, cache=cache)
        clean = _epoch(dataset)
        cache.flush()  # the disk cache writes entries in the background: wait for them before corrupting one
        entry = _entry(cache_dir, shard["checksum"])
        _corrupt_keeping_mtime(entry)
        st = entry.stat()
        cache._mark_verified(0, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        if every_read:
            with pytest.warns(CacheEntryCorruptWarning):
                again = _epoch(dataset)
            assert all(np.array_equal(clean[i], again[i]) for i in clean)
        else:
            again = _epoch(dataset)
            assert any(not np.array_equal(clean[i], again[i]) for i in clean), "the simulated bit rot was not served"
