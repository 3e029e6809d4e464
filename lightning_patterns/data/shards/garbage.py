"""Garbage of a dataset folder: shard files no manifest lists, and old generations past their grace period.

Two kinds of files outlive their use. A writer killed mid-write (or whose ``with`` block failed in a way
that stopped its clean-up) leaves shard files that no manifest lists: *orphans*. An ``overwrite`` keeps the
generation it replaced for a grace period, listed under ``retired`` in the new manifest, so that readers
that loaded the old manifest finish their epoch: once the grace period is over those are *expired*.

:func:`collect_garbage` finds both (a dry run by default) and removes them on request. It never removes
anything younger than the grace period (an unlisted file may belong to a writer still running; its age
is its modification time), never touches a file whose name is not one the writer gives shards
(``shard-<generation>-<token>-...lps``, see :func:`~.paths.shard_file_name`), and never rewrites the
manifest, so it is safe beside readers and idempotent. The next write drops expired generations from the
manifest.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from lightning_patterns.data.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    RetiredGeneration,
    dataset_reader,
    fetch_manifest_text,
    manifest_url,
    shard_url,
)
from lightning_patterns.data.shards.paths import shard_file_generation

__all__ = ["DEFAULT_GRACE_PERIOD", "GarbageReport", "collect_garbage", "split_expired"]

log = logging.getLogger(__name__)

# How long an overwritten generation stays readable, and how old an unlisted shard file must be to be removed.
DEFAULT_GRACE_PERIOD = 24 * 3600.0


@dataclass(frozen=True)
class GarbageReport:
    """What :func:`collect_garbage` found (and removed, unless it was a dry run).

    Args:
        url: the dataset root.
        orphans: shard files no manifest lists, older than the grace period (paths relative to the root).
        expired: shard files of retired generations whose grace period is over.
        kept: garbage still inside its grace period (unlisted files too young to be sure no writer is
            still writing them, retired generations readers may still use); removed by a later run.
        num_bytes: bytes of ``orphans`` and ``expired``.
        removed: whether they were removed (``False`` for a dry run).
    """

    url: str
    orphans: tuple[str, ...]
    expired: tuple[str, ...]
    kept: tuple[str, ...]
    num_bytes: int
    removed: bool

    @property
    def paths(self) -> tuple[str, ...]:
        """Every path removed (or, for a dry run, that would be)."""
        return self.orphans + self.expired


def split_expired(
    retired: tuple[RetiredGeneration, ...], grace_period: float, now: float
) -> tuple[tuple[RetiredGeneration, ...], tuple[RetiredGeneration, ...]]:
    """``(expired, pending)``: the retired generations whose grace period is over at ``now``, and the others."""
    expired = tuple(g for g in retired if g.retired_at + grace_period <= now)
    return expired, tuple(g for g in retired if g.retired_at + grace_period > now)


def _modified(info: Mapping[str, Any]) -> float | None:
    """A listing entry's modification time (Unix seconds), whatever the backend calls it; ``None`` if unknown."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp() if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _check_grace_period(grace_period: float) -> float:
    if isinstance(grace_period, bool) or not isinstance(grace_period, (int, float)) or not grace_period >= 0:
        raise ValueError(
            f"`grace_period` must be a number of seconds >= 0, got grace_period={grace_period!r}; 0 removes "
            "garbage at once (readers of an older manifest may then fail mid-epoch)."
        )
    return float(grace_period)


def collect_garbage(
    url: str,
    *,
    dry_run: bool = True,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    storage_options: Mapping[str, Any] | None = None,
) -> GarbageReport:
    """Find (and with ``dry_run=False`` remove) the garbage of the dataset folder at ``url``.

    Garbage is: shard files in the folder (not in subfolders) that no manifest lists, once older than
    ``grace_period``; and the shard files of generations an ``overwrite`` retired, once ``grace_period``
    has passed since. See the module docstring for what is never touched.

    Args:
        url: the dataset root (a folder with or without a manifest).
        dry_run: only report; nothing is removed.
        grace_period: seconds garbage is kept (24 hours by default): an unlisted file younger than this may
            belong to a writer still running, and a reader may still use a retired generation.
        storage_options: passed to fsspec unchanged.

    Returns:
        The report; its ``paths`` are relative to ``url``.

    Raises:
        ManifestError: the manifest exists but cannot be read (nothing is removed then).
        ValueError: ``grace_period`` is negative.

    Example:
        >>> from lightning_patterns.data.shards import write_dataset
        >>> url = "memory://doctest/collect_garbage"
        >>> _ = write_dataset([{"x": 1}], url, mode="overwrite", progress=False)
        >>> _ = write_dataset([{"x": 2}], url, mode="overwrite", progress=False)
        >>> report = collect_garbage(url, grace_period=0)  # a dry run
        >>> len(report.expired), report.removed
        (1, False)
    """
    grace_period = _check_grace_period(grace_period)
    root = url.rstrip("/")
    reader = dataset_reader(root, storage_options)
    text = fetch_manifest_text(reader)
    manifest = None if text is None else Manifest.from_json(text, manifest_url(root))
    fs, root_path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    now = time.time()
    listed: set[str] = set()
    expired: tuple[RetiredGeneration, ...] = ()
    pending: tuple[RetiredGeneration, ...] = ()
    if manifest is not None:
        expired, pending = split_expired(manifest.retired, grace_period, now)
        listed.update(shard.path for shard in manifest.shards)
        listed.update(path for generation in manifest.retired for path in generation.shards)
    sizes: dict[str, int] = {}
    orphans: list[str] = []
    young: list[str] = []
    for info in _listing(fs, root_path):
        name = str(info["name"]).rstrip("/").rpartition("/")[2]
        sizes[name] = int(info.get("size") or 0)
        if info.get("type") != "file" or name in listed or shard_file_generation(name) is None:
            continue
        modified = _modified(info)
        (orphans if modified is not None and modified + grace_period <= now else young).append(name)

    def present(path: str) -> bool:
        # The listing holds the folder's own files; a retired path may lie in a subfolder. A retired shard may
        # be gone already (an earlier run removed it; the manifest still lists it until the next write).
        return path in sizes or ("/" in path and _exists(fs, root_path, path))

    expired_paths = [path for generation in expired for path in generation.shards if present(path)]
    report = GarbageReport(
        url=root,
        orphans=tuple(sorted(orphans)),
        expired=tuple(expired_paths),
        kept=tuple([path for generation in pending for path in generation.shards if present(path)] + sorted(young)),
        num_bytes=sum(sizes.get(path, 0) for path in orphans + expired_paths),
        removed=not dry_run,
    )
    if not dry_run and report.paths:
        log.info("Removing %d garbage shard files (%d bytes) from %s", len(report.paths), report.num_bytes, root)
        fs.rm([shard_url(root_path, path) for path in report.paths])
    return report


def _listing(fs: Any, root_path: str) -> list[dict[str, Any]]:
    try:
        entries = fs.ls(root_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [entry for entry in entries if str(entry["name"]).rstrip("/").rpartition("/")[2] != MANIFEST_NAME]


def _exists(fs: Any, root_path: str, path: str) -> bool:
    try:
        return bool(fs.exists(shard_url(root_path, path)))
    except OSError:
        return False
