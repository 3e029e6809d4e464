"""Where the disk cache keeps its files, how they are named, and what ``cache info`` / ``cache clear`` see.

Everything lives in one folder of its own inside the user's ``cache_dir``::

    <cache_dir>/lightning_patterns_cache_v1/
        index.lock                      flock held while entries are added, evicted or cleared
        entries/<sha256>.lps            complete entries, named by the sha256 of their bytes
        entries/<sha256>.lps.<pid>.<token>.tmp    an entry being written (renamed when complete)
        locks/<sha256>.lock             per-entry flock: one process fetches a shard, the others wait;
                                        its mtime is when the entry was last read (for LRU eviction)
        datasets/<sha256>.json          the manifest of each dataset read through the cache

Entries are content-addressed: an entry's name is the checksum the manifest records for the shard, so a
dataset whose content changes (a new manifest with new checksums) can never be served stale bytes, and
datasets that share shards (one appended to another) share entries. Only files matching these names, in
this folder, are ever deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_DIR_ENV",
    "CacheInfo",
    "DatasetInfo",
    "cache_info",
    "clear_cache",
    "default_cache_dir",
    "entry_digest",
    "is_temp_name",
    "manifest_key",
    "store_root",
]

CACHE_DIR_ENV = "LIGHTNING_PATTERNS_CACHE"
_STORE = "lightning_patterns_cache_v1"
_ENTRY = re.compile(r"^([0-9a-f]{64})\.lps$")
_TEMP = re.compile(r"^[0-9a-f]{64}\.lps\.\d+\.[0-9a-f]+\.tmp$")
_LOCK = re.compile(r"^[0-9a-f]{64}\.lock$")
_RECORD = re.compile(r"^([0-9a-f]{64})\.json$")


def default_cache_dir() -> str:
    """``$LIGHTNING_PATTERNS_CACHE`` if set, else ``~/.cache/lightning_patterns``."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lightning_patterns")


def store_root(cache_dir: str | os.PathLike[str]) -> Path:
    """The cache's own folder inside ``cache_dir``."""
    return Path(cache_dir) / _STORE


def entry_digest(name: str) -> str | None:
    """The sha256 hex digest an entry file name stands for, or ``None`` if ``name`` is not an entry."""
    match = _ENTRY.match(name)
    return match.group(1) if match else None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is the name of an entry being written."""
    return _TEMP.match(name) is not None


def manifest_key(manifest_json: str) -> str:
    """The sha256 hex digest of a manifest's JSON text: the dataset's name in ``datasets/``."""
    return hashlib.sha256(manifest_json.encode()).hexdigest()


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset recorded in the cache.

    Args:
        key: sha256 of its manifest.
        num_shards: shards in the dataset.
        num_bytes: bytes of all its shards.
        cached_shards: shards with a complete entry.
        cached_bytes: bytes of those entries.
    """

    key: str
    num_shards: int
    num_bytes: int
    cached_shards: int
    cached_bytes: int


@dataclass(frozen=True)
class CacheInfo:
    """What a cache folder holds.

    Args:
        root: the cache's own folder.
        entries: complete entries.
        num_bytes: bytes of the complete entries.
        temp_files: entries left half-written (by a process that was killed, or one writing right now).
        datasets: the datasets recorded, most recently read first.
    """

    root: str
    entries: int
    num_bytes: int
    temp_files: int
    datasets: tuple[DatasetInfo, ...]


def _scan_entries(root: Path) -> tuple[dict[str, int], int]:
    sizes: dict[str, int] = {}
    temps = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(root / "entries") as it:
        for item in it:
            digest = entry_digest(item.name)
            if digest is not None:
                with contextlib.suppress(FileNotFoundError):
                    sizes[digest] = item.stat(follow_symlinks=False).st_size
            elif is_temp_name(item.name):
                temps += 1
    return sizes, temps


def cache_info(cache_dir: str | os.PathLike[str]) -> CacheInfo:
    """Count the entries, bytes and datasets of the disk cache in ``cache_dir`` (nothing is changed)."""
    root = store_root(cache_dir)
    sizes, temps = _scan_entries(root)
    datasets: list[tuple[float, DatasetInfo]] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(root / "datasets") as it:
        for item in it:
            match = _RECORD.match(item.name)
            if match is None:
                continue
            try:
                record = json.loads(Path(item.path).read_text())
                digests = [shard["checksum"].partition(":")[2] for shard in record["shards"]]
                total = sum(int(shard["num_bytes"]) for shard in record["shards"])
                mtime = item.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a record being replaced, or not ours after all: skip it
            cached = [d for d in digests if d in sizes]
            info = DatasetInfo(match.group(1), len(digests), total, len(cached), sum(sizes[d] for d in cached))
            datasets.append((mtime, info))
    datasets.sort(key=lambda pair: -pair[0])
    return CacheInfo(str(root), len(sizes), sum(sizes.values()), temps, tuple(info for _, info in datasets))


def clear_cache(cache_dir: str | os.PathLike[str], *, timeout: float = 60.0) -> int:
    """Delete every file of the disk cache in ``cache_dir`` and return how many were deleted.

    Only files named as the cache names them, inside its own folder, are deleted; anything else there
    is left alone. Entries in use by a running job stay readable to it (they are only unlinked), but that
    job will fetch them again.

    Args:
        cache_dir: the folder given as ``cache_dir`` to the cache.
        timeout: seconds to wait for a job that is adding entries right now.
    """
    from lightning_patterns.data.caching.locks import file_lock

    root = store_root(cache_dir)
    if not root.is_dir():
        return 0
    removed = 0
    patterns = {"entries": (_ENTRY, _TEMP), "locks": (_LOCK,), "datasets": (_RECORD,)}
    with file_lock(str(root / "index.lock"), timeout=timeout, what=f"the cache index of {root}"):
        for folder, names in patterns.items():
            doomed: list[str] = []  # stays empty when the folder is gone (a cache cleared before)
            with contextlib.suppress(FileNotFoundError), os.scandir(root / folder) as it:
                doomed = [item.path for item in it if any(p.match(item.name) for p in names) and item.is_file()]
            for path in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
            with contextlib.suppress(OSError):
                os.rmdir(root / folder)  # only if empty
    return removed
