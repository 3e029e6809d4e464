"""The dataset manifest: schema, shards with sizes and checksums, and the sharding rule, published last.

A dataset at ``url`` is a folder of ``.lps`` shard files plus ``url/manifest.json``. Readers only trust
the manifest: shards it does not list are invisible, so writing shards first and the manifest last (in
one atomic step) means a reader never sees a half-written dataset.
"""

from __future__ import annotations

import contextlib
import errno
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

from lightning_patterns.data.remote import RemoteReader
from lightning_patterns.data.remote.checksum import checksum_mismatch
from lightning_patterns.data.shards.reader import ShardReader
from lightning_patterns.data.shards.schema import Schema
from lightning_patterns.exceptions import ManifestError, ShardNotFoundError, UnsafePathError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "checksum_of",
    "dataset_reader",
    "fetch_manifest_text",
    "fetch_shard",
    "load_manifest",
    "manifest_exists",
    "manifest_url",
    "missing_manifest_error",
    "publish_manifest",
    "read_manifest",
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
        if not isinstance(data, dict) or not {"schema", "shards"} & data.keys():
            found = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
            raise ManifestError(
                f"{url!r} is not a lightning_patterns manifest: expected a JSON object with 'version', 'schema' and "
                f"'shards', found {found}. Point the URL at a dataset folder written by `write_dataset` or "
                f"`lightning-patterns shards write`."
            )
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
    """Raise :class:`~lightning_patterns.exceptions.ChecksumMismatchError` unless ``data`` matches ``shard``.

    The same check, with the same message, as every fetch of a shard makes (see
    :func:`~lightning_patterns.data.remote.checksum.checksum_mismatch`).

    Args:
        data: the bytes read from ``url``.
        shard: the manifest's entry for them.
        url: where they were read from.
    """
    error = checksum_mismatch(data, shard.checksum, url, expected_size=shard.num_bytes)
    if error is not None:
        raise error


def dataset_reader(url: str, storage_options: Mapping[str, Any] | None = None) -> RemoteReader:
    """A reader for one-off reads under the dataset root ``url`` (a manifest, a shard), with retries.

    It uses fsspec's shared filesystem instance, as a plain fsspec call would, so repeated calls do not each
    build a new client; nothing needs closing.

    Args:
        url: the dataset root.
        storage_options: passed to fsspec unchanged.

    Returns:
        The reader.
    """
    return RemoteReader(url, {"skip_instance_cache": False, **dict(storage_options or {})})


def _dataset_root(url: str) -> str:
    return url[: -len(MANIFEST_NAME)].rstrip("/") if url.rstrip("/").endswith("/" + MANIFEST_NAME) else url


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate the manifest of the dataset at ``url`` (its root, or the manifest file itself).

    Transient faults are retried as for shards (see :class:`~lightning_patterns.data.remote.RemoteReader`).

    Args:
        url: any fsspec URL or local path.
        storage_options: passed to fsspec unchanged.

    Raises:
        ManifestError: no manifest (naming the URL; also when ``url`` is a file, not a folder), invalid JSON,
            JSON that is not a lightning_patterns manifest, an unknown format version, or a malformed entry.
        UnsafePathError: a shard path would escape the dataset root.
    """
    return read_manifest(dataset_reader(_dataset_root(url), storage_options))


def read_manifest(reader: RemoteReader) -> Manifest:
    """Read and validate the manifest of the dataset at ``reader.url`` through ``reader``.

    Args:
        reader: a reader whose ``url`` is the dataset root.

    Raises:
        ManifestError: see :func:`load_manifest`.
        UnsafePathError: a shard path would escape the dataset root.
    """
    text = fetch_manifest_text(reader)
    if text is None:
        raise missing_manifest_error(reader.url)
    return Manifest.from_json(text, manifest_url(reader.url))


def fetch_manifest_text(reader: RemoteReader) -> bytes | None:
    """The text of the manifest at the dataset root ``reader.url``, or ``None`` if there is none.

    Args:
        reader: a reader whose ``url`` is the dataset root.

    Raises:
        ManifestError: ``reader.url`` is a file, not a dataset folder.
    """
    try:
        return reader.fetch(MANIFEST_NAME)
    except (FileNotFoundError, NotADirectoryError):
        pass
    with contextlib.suppress(OSError):  # only to explain the error: a failed check means "not a file"
        if reader.is_file(reader.url):
            parent = reader.url.rstrip("/").rpartition("/")[0] or "."
            raise ManifestError(
                f"Dataset URL {reader.url!r} is a file, not a dataset folder: a dataset is a folder holding "
                f"{MANIFEST_NAME} and its .lps shards. Pass the folder the dataset was written to (for example "
                f"{parent!r}), not one of its files."
            )
    return None


def missing_manifest_error(root: str) -> ManifestError:
    """The error for a dataset root that has no manifest."""
    return ManifestError(
        f"No dataset manifest at {manifest_url(root)!r}. Write the dataset first with "
        f"`write_dataset(samples, {root!r})`, or check the URL and `storage_options`."
    )


def manifest_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a manifest exists at the dataset root ``url``."""
    return dataset_reader(url, storage_options).exists(MANIFEST_NAME)


def publish_manifest(manifest: Manifest, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``manifest`` to the dataset root ``url``, replacing any previous one.

    On a local filesystem the text goes to a temporary file in the same folder, is fsynced and then
    ``os.replace``-d over ``manifest.json``; on object stores (and ``memory://``) it is a single put, which
    those stores make visible all at once. Either way a reader sees the old or the new manifest, never a mix.
    """
    data = manifest.to_json().encode("utf-8")
    fs, root_path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
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
        ChecksumMismatchError: ``verify`` and the bytes do not match, on two fetches in a row.
    """
    return ShardReader(fetch_shard(dataset_reader(url, storage_options), shard, verify=verify), schema)


def fetch_shard(reader: RemoteReader, shard: ShardInfo, *, verify: bool = True) -> memoryview:
    """The bytes of ``shard`` of the dataset at ``reader.url``, with retries and the manifest's checksum.

    Args:
        reader: a reader whose ``url`` is the dataset root.
        shard: an entry of the dataset's manifest.
        verify: check the bytes against ``shard.checksum`` (a mismatch is fetched once more first).

    Returns:
        A read-only view of the shard file's bytes.

    Raises:
        ShardNotFoundError: the shard file does not exist (naming its URL).
        ChecksumMismatchError: ``verify`` and the bytes do not match, on two fetches in a row.
    """
    where = shard_url(reader.url, shard.path)
    try:
        return reader.fetch_buffer(where, size=shard.num_bytes, checksum=shard.checksum if verify else None)
    except ShardNotFoundError as err:
        missing = ShardNotFoundError(
            f"Shard {where!r} listed in the manifest does not exist. It was deleted or never finished uploading; "
            f"restore it or rewrite the dataset."
        )
        missing.errno = errno.ENOENT
        raise missing from err


def verify_dataset(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Load the manifest at ``url`` and check that every shard exists and matches its checksum.

    Raises:
        ManifestError: see :func:`load_manifest`.
        ShardNotFoundError: a listed shard is missing.
        ChecksumMismatchError: a shard's bytes differ from the manifest's checksum.
    """
    reader = dataset_reader(_dataset_root(url), storage_options)
    manifest = read_manifest(reader)
    for shard in manifest.shards:
        shard_reader = ShardReader(fetch_shard(reader, shard), manifest.schema)
        if shard_reader.num_samples != shard.num_samples:
            raise ManifestError(
                f"Shard {shard_url(reader.url, shard.path)!r} holds {shard_reader.num_samples} samples, but the "
                f"manifest records {shard.num_samples}. Rewrite the dataset."
            )
    return manifest
