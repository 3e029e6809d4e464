"""The dataset manifest: schema, shards with sizes and checksums, and the sharding rule, published last.

A dataset at ``url`` is a folder of ``.lps`` shard files plus ``url/manifest.json``. Readers only trust
the manifest: shards it does not list are invisible, so writing shards first and the manifest last (in
one atomic step) means a reader never sees a half-written dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_patterns.data.shards.reader import ShardReader
from lightning_patterns.data.shards.schema import Schema
from lightning_patterns.exceptions import ChecksumMismatchError, ManifestError, ShardNotFoundError, UnsafePathError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "checksum_of",
    "load_manifest",
    "manifest_exists",
    "manifest_url",
    "missing_manifest_error",
    "publish_manifest",
    "read_shard",
    "shard_url",
    "validate_shard_path",
    "verify_checksum",
    "verify_dataset",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHECKSUM_PREFIX = "sha256:"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest records it.

    Args:
        path: path of the file relative to the dataset root, ``/``-separated.
        num_samples: samples in the shard.
        num_bytes: size of the file in bytes.
        checksum: ``"sha256:<hex>"`` of the whole file.
        bucket: the bucket the sharding rule assigned (``None`` for rules with a single sequence).
    """

    path: str
    num_samples: int
    num_bytes: int
    checksum: str
    bucket: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {
            "path": self.path,
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "checksum": self.checksum,
            "bucket": self.bucket,
        }


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a dataset.

    Args:
        schema: field name to dtype and shape, shared by every shard.
        shards: the shard files, in write order.
        sharding: the rule that made them, e.g. ``{"rule": "size", "shard_bytes": 33554432}``.
        version: the manifest format version (:data:`FORMAT_VERSION` when written by this code).
        generation: how many writes made the dataset (each create, append or overwrite adds one); shard file
            names carry it, so appended shards never collide with existing ones.
    """

    schema: Schema
    shards: tuple[ShardInfo, ...]
    sharding: dict[str, Any] = field(hash=False)
    version: int = FORMAT_VERSION
    generation: int = 1

    @property
    def num_samples(self) -> int:
        """Samples in the whole dataset."""
        return sum(shard.num_samples for shard in self.shards)

    @property
    def num_bytes(self) -> int:
        """Bytes of all shard files together."""
        return sum(shard.num_bytes for shard in self.shards)

    def to_json(self) -> str:
        """Serialize as the JSON text of ``manifest.json``."""
        data = {
            "version": self.version,
            "generation": self.generation,
            "num_samples": self.num_samples,
            "schema": self.schema.to_json(),
            "sharding": self.sharding,
            "shards": [shard.to_json() for shard in self.shards],
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, url: str) -> Manifest:
        """Parse and validate manifest text read from ``url`` (used in error messages).

        Raises:
            ManifestError: the text is not valid JSON, is of an unknown format version, or is malformed.
            UnsafePathError: a shard path would escape the dataset root.
        """
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise ManifestError(
                f"Manifest {url!r} is not valid JSON ({err}). It was truncated or edited by hand; rewrite the "
                f"dataset with `write_dataset(samples, url, mode='overwrite')`."
            ) from err
        if not isinstance(data, dict):
            raise ManifestError(f"Manifest {url!r} must be a JSON object; got {type(data).__name__}.")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"Manifest {url!r} has format version {version!r}, but this version of lightning_patterns reads "
                f"version {FORMAT_VERSION}. Upgrade lightning_patterns (`pip install -U lightning-patterns`) or "
                f"rewrite the dataset with this version."
            )
        try:
            schema = Schema.from_json(data["schema"])
            sharding = data["sharding"]
            if not isinstance(sharding, dict) or not isinstance(sharding.get("rule"), str):
                raise ValueError(f"'sharding' must be an object with a 'rule' string, got {sharding!r}")
            generation = data.get("generation", 1)
            if not isinstance(generation, int) or generation < 0:
                raise ValueError(f"'generation' must be a non-negative int, got {generation!r}")
            entries = data["shards"]
            if not isinstance(entries, list):
                raise ValueError(f"'shards' must be a list, got {type(entries).__name__}")
        except (KeyError, ValueError, TypeError) as err:
            raise ManifestError(f"Manifest {url!r} is malformed: {err}. Rewrite the dataset.") from err
        shards = tuple(_shard_info(entry, url) for entry in entries)
        seen: set[str] = set()
        for shard in shards:
            if shard.path in seen:
                raise ManifestError(f"Manifest {url!r} lists shard {shard.path!r} twice. Rewrite the dataset.")
            seen.add(shard.path)
        manifest = cls(schema, shards, sharding, version, generation)
        recorded = data.get("num_samples", manifest.num_samples)
        if recorded != manifest.num_samples:
            raise ManifestError(
                f"Manifest {url!r} says num_samples={recorded!r}, but its shards hold {manifest.num_samples}. "
                f"Rewrite the dataset."
            )
        return manifest


def _shard_info(entry: Any, url: str) -> ShardInfo:
    if not isinstance(entry, dict):
        raise ManifestError(f"Manifest {url!r} has a shard entry {entry!r}; expected an object. Rewrite the dataset.")
    validate_shard_path(entry.get("path"), url)
    num_samples, num_bytes, checksum = entry.get("num_samples"), entry.get("num_bytes"), entry.get("checksum")
    bucket = entry.get("bucket")
    ok = (
        _is_count(num_samples)
        and _is_count(num_bytes)
        and isinstance(checksum, str)
        and checksum.startswith(_CHECKSUM_PREFIX)
        and (bucket is None or _is_count(bucket))
    )
    if not ok:
        raise ManifestError(
            f"Manifest {url!r} has a malformed shard entry {entry!r}; expected non-negative ints 'num_samples' and "
            f"'num_bytes', a 'sha256:<hex>' 'checksum' and an int or null 'bucket'. Rewrite the dataset."
        )
    return ShardInfo(entry["path"], entry["num_samples"], entry["num_bytes"], entry["checksum"], bucket)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_shard_path(path: Any, url: str = "<manifest>") -> str:
    """Return ``path`` if it is a safe relative path inside the dataset root, else raise.

    Safe means: a non-empty ``str`` of ``/``-separated, non-empty components, none of them ``.`` or ``..``;
    no leading ``/``, no backslash, no ``:`` (so no URL such as ``s3://other/x`` and no drive letter), no NUL.

    Raises:
        UnsafePathError: naming the manifest ``url``, the path, and why it is refused.
    """
    reason = None
    if not isinstance(path, str) or not path:
        reason = "is empty or not a string"
    elif "\\" in path:
        reason = "contains a backslash"
    elif ":" in path:
        reason = "contains ':' (a URL or drive letter)"
    elif "\0" in path:
        reason = "contains a NUL character"
    elif path.startswith("/"):
        reason = "is absolute"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        reason = "has an empty, '.' or '..' component"
    if reason is not None:
        raise UnsafePathError(
            f"Manifest {url!r} lists shard path {path!r}, which {reason}: it could point outside the dataset root. "
            f"Shard paths must be relative, '/'-separated paths inside the root (like 'shard-00001-....lps'). "
            f"The manifest was edited or is not trustworthy; rewrite the dataset."
        )
    return str(path)


def _join(root: str, path: str) -> str:
    return root.rstrip("/") + "/" + path


def shard_url(root_url: str, path: str) -> str:
    """The URL of shard ``path`` under dataset ``root_url``, after :func:`validate_shard_path`."""
    return _join(root_url, validate_shard_path(path, manifest_url(root_url)))


def manifest_url(root_url: str) -> str:
    """The URL of the manifest of the dataset at ``root_url``."""
    return _join(root_url, MANIFEST_NAME)


def checksum_of(data: bytes | bytearray | memoryview) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    return _CHECKSUM_PREFIX + hashlib.sha256(data).hexdigest()


def verify_checksum(data: bytes | bytearray | memoryview, shard: ShardInfo, url: str) -> None:
    """Raise :class:`ChecksumMismatchError` unless ``data`` (read from ``url``) matches ``shard.checksum``."""
    actual = checksum_of(data)
    if actual != shard.checksum:
        raise ChecksumMismatchError(
            f"Shard {url!r} is corrupt: its checksum is {actual} ({len(data)} bytes), but the manifest records "
            f"{shard.checksum} ({shard.num_bytes} bytes). Fetch it again; if it persists, rewrite the dataset."
        )


def _fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate the manifest of the dataset at ``url`` (its root, or the manifest file itself).

    Args:
        url: any fsspec URL or local path.
        storage_options: passed to fsspec unchanged.

    Raises:
        ManifestError: no manifest, invalid JSON, an unknown format version, or a malformed entry.
        UnsafePathError: a shard path would escape the dataset root.
    """
    root = url[: -len(MANIFEST_NAME)].rstrip("/") if url.rstrip("/").endswith("/" + MANIFEST_NAME) else url
    where = manifest_url(root)
    fs, root_path = _fs(root, storage_options)
    try:
        text = fs.cat_file(_join(root_path, MANIFEST_NAME))
    except FileNotFoundError:
        raise missing_manifest_error(root) from None
    return Manifest.from_json(text, where)


def missing_manifest_error(root: str) -> ManifestError:
    """The error for a dataset root that has no manifest."""
    return ManifestError(
        f"No dataset manifest at {manifest_url(root)!r}. Write the dataset first with "
        f"`write_dataset(samples, {root!r})`, or check the URL and `storage_options`."
    )


def manifest_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a manifest exists at the dataset root ``url``."""
    fs, root_path = _fs(url, storage_options)
    return bool(fs.exists(_join(root_path, MANIFEST_NAME)))


def publish_manifest(manifest: Manifest, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``manifest`` to the dataset root ``url``, replacing any previous one.

    On a local filesystem the text goes to a temporary file in the same folder, is fsynced and then
    ``os.replace``-d over ``manifest.json``; on object stores (and ``memory://``) it is a single put, which
    those stores make visible all at once. Either way a reader sees the old or the new manifest, never a mix.
    """
    data = manifest.to_json().encode("utf-8")
    fs, root_path = _fs(url, storage_options)
    target = _join(root_path, MANIFEST_NAME)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)
    else:
        fs.pipe_file(target, data)
    log.debug("Published manifest %s with %d shards", manifest_url(url), len(manifest.shards))


def _fsync_dir(folder: str) -> None:
    # Makes the rename durable; not possible on every platform (Windows), hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_shard(
    url: str,
    shard: ShardInfo,
    *,
    storage_options: Mapping[str, Any] | None = None,
    schema: Schema | None = None,
    verify: bool = True,
) -> ShardReader:
    """Fetch shard ``shard`` of the dataset at ``url`` and open it.

    Args:
        url: the dataset root.
        shard: an entry of the dataset's manifest.
        storage_options: passed to fsspec unchanged.
        schema: when given, the shard must match it.
        verify: check the bytes against the manifest's checksum.

    Raises:
        ShardNotFoundError: the shard file does not exist.
        ChecksumMismatchError: ``verify`` and the bytes do not match.
    """
    where = shard_url(url, shard.path)
    fs, root_path = _fs(url, storage_options)
    try:
        data = fs.cat_file(_join(root_path, shard.path))
    except FileNotFoundError:
        raise ShardNotFoundError(
            f"Shard {where!r} listed in the manifest does not exist. It was deleted or never finished uploading; "
            f"restore it or rewrite the dataset."
        ) from None
    if verify:
        verify_checksum(data, shard, where)
    return ShardReader(data, schema)


def verify_dataset(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Load the manifest at ``url`` and check that every shard exists and matches its checksum.

    Raises:
        ManifestError: see :func:`load_manifest`.
        ShardNotFoundError: a listed shard is missing.
        ChecksumMismatchError: a shard's bytes differ from the manifest's checksum.
    """
    manifest = load_manifest(url, storage_options)
    for shard in manifest.shards:
        reader = read_shard(url, shard, storage_options=storage_options, schema=manifest.schema)
        if reader.num_samples != shard.num_samples:
            raise ManifestError(
                f"Shard {shard_url(url, shard.path)!r} holds {reader.num_samples} samples, but the manifest "
                f"records {shard.num_samples}. Rewrite the dataset."
            )
    return manifest
