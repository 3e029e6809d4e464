"""The dataset manifest: schema, shards with sizes and checksums, and the sharding rule, published last.

A dataset at ``url`` is a folder of ``.lps`` shard files plus ``url/manifest.json``. Readers only trust
the manifest: shards it does not list are invisible, so writing shards first and the manifest last (in
one atomic step) means a reader never sees a half-written dataset.

A manifest is bounded before it is trusted: its read has a byte cap (``max_bytes``, default
:data:`~.limits.MAX_MANIFEST_BYTES`) and a deadline, its JSON nests at most :data:`~.limits.MAX_JSON_DEPTH`
deep, and its counts and sizes keep to the maxima of :mod:`.limits` (a manifest beyond them is refused at
load with a :class:`~lightning_patterns.exceptions.ManifestError` naming it). Each shard's header is then
checked against its entry when the shard is opened (:func:`open_shard`), before any of its samples is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_patterns.data.remote import Deadline, RemoteReader
from lightning_patterns.data.remote.checksum import checksum_mismatch
from lightning_patterns.data.shards.layout import PREFIX
from lightning_patterns.data.shards.limits import (
    DEFAULT_MANIFEST_TIMEOUT,
    MAX_LABEL_CLASSES,
    MAX_MANIFEST_BYTES,
    MAX_SHARD_BYTES,
    MAX_SHARD_SAMPLES,
    MAX_SHARDS,
    is_count,
    parse_json,
)
from lightning_patterns.data.shards.paths import validate_shard_path
from lightning_patterns.data.shards.reader import ShardReader
from lightning_patterns.data.shards.schema import Schema
from lightning_patterns.exceptions import ManifestError, ObjectTooLargeError, ShardNotFoundError, UnsafePathError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "RetiredGeneration",
    "ShardInfo",
    "checksum_of",
    "dataset_reader",
    "fetch_manifest_text",
    "fetch_shard",
    "load_manifest",
    "manifest_exists",
    "manifest_url",
    "missing_manifest_error",
    "missing_shard_error",
    "open_shard",
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
_SHA256_CHECKSUM = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest records it.

    Args:
        path: path of the file relative to the dataset root, ``/``-separated.
        num_samples: samples in the shard.
        num_bytes: size of the file in bytes.
        checksum: ``"sha256:<hex>"`` of the whole file.
        bucket: the bucket the sharding rule assigned (``None`` for rules with a single sequence).
        label_counts: per integer label field (e.g. ``"label"``), the shard's samples of each class ``0 .. C-1``
            (counts sum to ``num_samples``), so that planners can check class coverage per rank from the manifest
            alone; empty when the writer recorded none.
        head_bytes: size of the shard's head (prefix, header and block table, see
            :mod:`~lightning_patterns.data.shards.layout`); ``None`` for a shard without a block table, which is
            only read whole.
        head_checksum: ``"sha256:<hex>"`` of the head: with it, the block table is trusted without the rest of
            the file, and any block verified alone (``checksum`` still covers the whole file).
    """

    path: str
    num_samples: int
    num_bytes: int
    checksum: str
    bucket: int | None = None
    label_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    head_bytes: int | None = None
    head_checksum: str | None = None

    @property
    def has_blocks(self) -> bool:
        """Whether parts of the shard can be read and verified alone: a block table the manifest vouches for."""
        return self.head_bytes is not None and self.head_checksum is not None

    def to_json(self) -> dict[str, Any]:
        """The manifest entry (``label_counts`` and the head only when recorded: older readers see what they know)."""
        entry: dict[str, Any] = {
            "path": self.path,
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "checksum": self.checksum,
            "bucket": self.bucket,
        }
        if self.label_counts:
            entry["label_counts"] = {name: list(counts) for name, counts in self.label_counts.items()}
        if self.has_blocks:
            entry["head_bytes"] = self.head_bytes
            entry["head_checksum"] = self.head_checksum
        return entry


@dataclass(frozen=True)
class RetiredGeneration:
    """Shards of an earlier generation that an ``overwrite`` replaced, kept for readers still using them.

    Args:
        generation: the generation they belonged to.
        retired_at: when the manifest that replaced them was published (Unix time, seconds).
        shards: their paths, relative to the dataset root.
    """

    generation: int
    retired_at: float
    shards: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {"generation": self.generation, "retired_at": self.retired_at, "shards": list(self.shards)}


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
        retired: generations an ``overwrite`` replaced whose shards are kept for a grace period, so that
            readers that loaded an older manifest finish their epoch; removed by the next write after the
            grace period, or by :func:`~lightning_patterns.data.shards.collect_garbage`.
    """

    schema: Schema
    shards: tuple[ShardInfo, ...]
    sharding: dict[str, Any] = field(hash=False)
    version: int = FORMAT_VERSION
    generation: int = 1
    retired: tuple[RetiredGeneration, ...] = ()

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
        if self.retired:  # absent otherwise, so manifests without retired shards read as before
            data["retired"] = [generation.to_json() for generation in self.retired]
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes | bytearray, url: str) -> Manifest:
        """Parse and validate manifest text read from ``url`` (used in error messages).

        Raises:
            ManifestError: the text is not valid JSON (or nests too deeply), is of an unknown format version, is
                malformed, or declares counts or sizes beyond the limits of :mod:`.limits`.
            UnsafePathError: a shard path would escape the dataset root.
        """
        try:
            data = parse_json(text)
        except ValueError as err:  # UnicodeDecodeError included
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
            if not is_count(generation):
                raise ValueError(f"'generation' must be a non-negative int, got {generation!r}")
            entries = data["shards"]
            if not isinstance(entries, list):
                raise ValueError(f"'shards' must be a list, got {type(entries).__name__}")
            retired = _retired(data.get("retired", []), url)
        except UnsafePathError:
            raise
        except (KeyError, ValueError, TypeError) as err:
            reason = str(err).rstrip(".")
            raise ManifestError(f"Manifest {url!r} is malformed: {reason}. Rewrite the dataset.") from err
        if len(entries) > MAX_SHARDS:
            raise ManifestError(
                f"Manifest {url!r} lists {len(entries)} shards, more than the {MAX_SHARDS} a dataset may have. "
                "Write the data with larger shards (`shard_bytes`), or as several datasets."
            )
        min_bytes = _min_shard_bytes(schema)
        shards = tuple(_shard_info(entry, url, min_bytes) for entry in entries)
        seen: set[str] = set()
        for shard in shards:
            if shard.path in seen:
                raise ManifestError(f"Manifest {url!r} lists shard {shard.path!r} twice. Rewrite the dataset.")
            seen.add(shard.path)
        manifest = cls(schema, shards, sharding, version, generation, retired)
        recorded = data.get("num_samples", manifest.num_samples)
        if recorded != manifest.num_samples:
            raise ManifestError(
                f"Manifest {url!r} says num_samples={recorded!r}, but its shards hold {manifest.num_samples}. "
                f"Rewrite the dataset."
            )
        return manifest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _min_shard_bytes(schema: Schema) -> tuple[int, int]:
    """``(per_sample, fixed)``: a shard of ``n`` samples has at least ``fixed + n * per_sample`` bytes.

    The fixed-size columns take ``n`` rows each, and each variable-length field an index of ``n + 1``
    offsets. A bound, not the exact size, so that a later format version may add regions.
    """
    per_sample = sum(8 if spec.variable_length else spec.sample_nbytes for spec in schema.values())
    fixed = PREFIX.size + 8 * sum(spec.variable_length for spec in schema.values())
    return per_sample, fixed


def _shard_info(entry: Any, url: str, min_bytes: tuple[int, int]) -> ShardInfo:
    if not isinstance(entry, dict):
        raise ManifestError(
            f"Manifest {url!r} has a shard entry {_short(entry)}; expected an object. Rewrite the dataset."
        )
    path = validate_shard_path(entry.get("path"), url)
    num_samples: Any = entry.get("num_samples")
    num_bytes: Any = entry.get("num_bytes")
    checksum: Any = entry.get("checksum")
    bucket: Any = entry.get("bucket")
    ok = (
        is_count(num_samples)
        and is_count(num_bytes)
        and isinstance(checksum, str)
        and checksum.startswith(_CHECKSUM_PREFIX)
        and (bucket is None or is_count(bucket))
    )
    if not ok:
        raise ManifestError(
            f"Manifest {url!r} has a malformed shard entry {_short(entry)}; expected non-negative ints "
            f"'num_samples' and 'num_bytes', a 'sha256:<hex>' 'checksum' and an int or null 'bucket'. Rewrite the "
            f"dataset."
        )
    for name, value, limit in (
        ("num_samples", num_samples, MAX_SHARD_SAMPLES),
        ("num_bytes", num_bytes, MAX_SHARD_BYTES),
    ):
        if value > limit:
            raise ManifestError(
                f"Manifest {url!r} records {name}={value} for shard {path!r}, more than the {limit} a shard may have "
                "(see lightning_patterns.data.shards.limits). The manifest is corrupt or hostile; rewrite the dataset."
            )
    per_sample, fixed = min_bytes
    if num_bytes < fixed + num_samples * per_sample:
        raise ManifestError(
            f"Manifest {url!r} records num_samples={num_samples} but num_bytes={num_bytes} for shard {path!r}: "
            f"{num_samples} samples of this schema take at least {fixed + num_samples * per_sample} bytes. The "
            "manifest is corrupt or hostile; rewrite the dataset."
        )
    head_bytes, head_checksum = _head(entry, url, path, num_bytes)
    return ShardInfo(
        path,
        num_samples,
        num_bytes,
        checksum,
        bucket,
        _label_counts(entry, url, path, num_samples),
        head_bytes,
        head_checksum,
    )


def _head(entry: dict[str, Any], url: str, path: str, num_bytes: int) -> tuple[int | None, str | None]:
    """The shard's ``head_bytes`` and ``head_checksum``: both or neither, the head inside the file."""
    head_bytes: Any = entry.get("head_bytes")
    head_checksum: Any = entry.get("head_checksum")
    if head_bytes is None and head_checksum is None:
        return None, None
    ok = (
        is_count(head_bytes)
        and PREFIX.size <= head_bytes <= num_bytes
        and isinstance(head_checksum, str)
        and _SHA256_CHECKSUM.match(head_checksum) is not None
    )
    if not ok:
        raise ManifestError(
            f"Manifest {url!r} has head_bytes={_short(head_bytes)}, head_checksum={_short(head_checksum)} for shard "
            f"{path!r}; expected both or neither: a byte count from {PREFIX.size} to its num_bytes={num_bytes} and "
            "'sha256:<64 hex digits>'. Rewrite the dataset."
        )
    return head_bytes, head_checksum


def _label_counts(entry: dict[str, Any], url: str, path: str, num_samples: int) -> dict[str, tuple[int, ...]]:
    recorded: Any = entry.get("label_counts", {})
    if not isinstance(recorded, dict):
        raise ManifestError(
            f"Manifest {url!r} has 'label_counts' {_short(recorded)} for shard {path!r}; expected an object of label "
            "field name to per-class counts. Rewrite the dataset."
        )
    counts: dict[str, tuple[int, ...]] = {}
    for name, values in recorded.items():
        ok = (
            isinstance(values, list)
            and len(values) <= MAX_LABEL_CLASSES
            and all(is_count(v) for v in values)
            and sum(values) == num_samples
        )
        if not ok:
            raise ManifestError(
                f"Manifest {url!r} has label_counts[{name!r}] {_short(values)} for shard {path!r}; expected at most "
                f"{MAX_LABEL_CLASSES} non-negative ints summing to its num_samples={num_samples}. Rewrite the dataset."
            )
        counts[name] = tuple(values)
    return counts


def _retired(entries: Any, url: str) -> tuple[RetiredGeneration, ...]:
    """The ``retired`` list of a manifest (raises ``ValueError``/``TypeError`` when malformed)."""
    if not isinstance(entries, list) or len(entries) > MAX_SHARDS:
        raise ValueError(f"'retired' must be a list of at most {MAX_SHARDS} generations, got {_short(entries)}")
    retired = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"a 'retired' entry must be an object, got {_short(entry)}")
        generation: Any = entry.get("generation")
        at: Any = entry.get("retired_at")
        paths: Any = entry.get("shards")
        if (
            not is_count(generation)
            or isinstance(at, bool)
            or not isinstance(at, (int, float))
            or not isinstance(paths, list)
            or len(paths) > MAX_SHARDS
        ):
            raise ValueError(
                f"a 'retired' entry must have 'generation', 'retired_at' and 'shards', got {_short(entry)}"
            )
        # These are deleted once the grace period is over: each must be a path inside the root.
        retired.append(RetiredGeneration(generation, float(at), tuple(validate_shard_path(p, url) for p in paths)))
    return tuple(retired)


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


def load_manifest(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    max_bytes: int = MAX_MANIFEST_BYTES,
    timeout: float | None = DEFAULT_MANIFEST_TIMEOUT,
) -> Manifest:
    """Read and validate the manifest of the dataset at ``url`` (its root, or the manifest file itself).

    Transient faults are retried as for shards (see :class:`~lightning_patterns.data.remote.RemoteReader`).

    Args:
        url: any fsspec URL or local path.
        storage_options: passed to fsspec unchanged.
        max_bytes: the largest manifest accepted; a larger one fails as soon as that is known, without reading
            the rest (256 MiB by default, room for over a million shards).
        timeout: seconds the whole read may take, retries included (``None``: no limit).

    Raises:
        ManifestError: no manifest (naming the URL; also when ``url`` is a file, not a folder), invalid JSON,
            JSON that is not a lightning_patterns manifest, an unknown format version, a malformed entry, a
            manifest over ``max_bytes``, or counts and sizes beyond the limits of :mod:`.limits`.
        UnsafePathError: a shard path would escape the dataset root.
        DeadlineExceededError: the read took longer than ``timeout``.
    """
    deadline = None if timeout is None else Deadline(timeout)
    return read_manifest(dataset_reader(_dataset_root(url), storage_options), max_bytes=max_bytes, deadline=deadline)


def read_manifest(
    reader: RemoteReader, *, max_bytes: int = MAX_MANIFEST_BYTES, deadline: Deadline | None = None
) -> Manifest:
    """Read and validate the manifest of the dataset at ``reader.url`` through ``reader``.

    Args:
        reader: a reader whose ``url`` is the dataset root.
        max_bytes: the largest manifest accepted.
        deadline: when to give up, retries included.

    Raises:
        ManifestError: see :func:`load_manifest`.
        UnsafePathError: a shard path would escape the dataset root.
        DeadlineExceededError: ``deadline`` passed.
    """
    text = fetch_manifest_text(reader, max_bytes=max_bytes, deadline=deadline)
    if text is None:
        raise missing_manifest_error(reader.url)
    return Manifest.from_json(text, manifest_url(reader.url))


def fetch_manifest_text(
    reader: RemoteReader, *, max_bytes: int = MAX_MANIFEST_BYTES, deadline: Deadline | None = None
) -> bytes | bytearray | None:
    """The text of the manifest at the dataset root ``reader.url``, or ``None`` if there is none.

    Args:
        reader: a reader whose ``url`` is the dataset root.
        max_bytes: the largest manifest accepted.
        deadline: when to give up, retries included.

    Raises:
        ManifestError: ``reader.url`` is a file, not a dataset folder, or the manifest is over ``max_bytes``.
        DeadlineExceededError: ``deadline`` passed.
    """
    try:
        view = reader.fetch_buffer(MANIFEST_NAME, max_bytes=max_bytes, deadline=deadline)
        # The buffer it arrived in rather than a copy: a manifest can be large.
        return view.obj if isinstance(view.obj, bytearray) else bytes(view)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except ObjectTooLargeError as err:
        raise ManifestError(
            f"Manifest {manifest_url(reader.url)!r} is larger than max_bytes={max_bytes} (the cap on a manifest "
            "read); nothing more was read. A manifest that large is corrupt or hostile, or lists more shards than "
            "expected: check the URL, or pass a larger `max_bytes` to load_manifest."
        ) from err
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
    reader = dataset_reader(url, storage_options)
    return open_shard(fetch_shard(reader, shard, verify=verify), shard, schema, shard_url(reader.url, shard.path))


def open_shard(data: Any, shard: ShardInfo, schema: Schema | None, url: str) -> ShardReader:
    """Open the bytes of ``shard``, checking its header against the manifest entry before any sample is read.

    Every read of a shard's samples goes through here, so every check of :func:`~.reader.parse_header`
    (the header's sample count equal to the manifest's, each column's length, regions inside the body and
    apart) holds before the first sample is decoded.

    Args:
        data: the shard file's bytes (fetched, or from a cache).
        shard: its manifest entry.
        schema: the dataset's schema (``None`` skips that comparison).
        url: where the bytes came from, named in every error.

    Returns:
        The reader.

    Raises:
        ShardFormatError: the shard is corrupt or disagrees with ``shard``, naming ``url``, the field and both
            values.
        SchemaMismatchError: the shard does not match ``schema``.
    """
    return ShardReader(data, schema, url=url, num_samples=shard.num_samples)


def fetch_shard(
    reader: RemoteReader, shard: ShardInfo, *, verify: bool = True, deadline: Deadline | None = None
) -> memoryview:
    """The bytes of ``shard`` of the dataset at ``reader.url``, with retries and the manifest's checksum.

    No more than the manifest's ``num_bytes`` are accepted, whatever the remote sends.

    Args:
        reader: a reader whose ``url`` is the dataset root.
        shard: an entry of the dataset's manifest.
        verify: check the bytes against ``shard.checksum`` (a mismatch is fetched once more first).
        deadline: when to give up, retries and the request in flight included.

    Returns:
        A read-only view of the shard file's bytes.

    Raises:
        ShardNotFoundError: the shard file does not exist (naming its URL, and saying so when the dataset was
            rewritten since ``shard`` was read from its manifest).
        ChecksumMismatchError: ``verify`` and the bytes do not match, on two fetches in a row.
        DeadlineExceededError: ``deadline`` passed or was cancelled.
    """
    where = shard_url(reader.url, shard.path)
    try:
        return reader.fetch_buffer(
            where, size=shard.num_bytes, checksum=shard.checksum if verify else None, deadline=deadline
        )
    except ShardNotFoundError as err:
        raise missing_shard_error(reader, shard) from err


def missing_shard_error(reader: RemoteReader, shard: ShardInfo) -> ShardNotFoundError:
    """The error for a listed shard that does not exist, saying whether the dataset was rewritten meanwhile.

    Args:
        reader: a reader whose ``url`` is the dataset root (the current manifest is read through it).
        shard: the manifest entry of the missing shard.
    """
    missing = ShardNotFoundError(_missing_shard_message(reader, shard, shard_url(reader.url, shard.path)))
    missing.errno = errno.ENOENT
    return missing


def _missing_shard_message(reader: RemoteReader, shard: ShardInfo, where: str) -> str:
    """Why a listed shard is missing: the dataset was rewritten since its manifest was read, or it was lost."""
    current: Manifest | None = None
    with contextlib.suppress(Exception):  # only to explain the error: any failure gives the plain message
        text = fetch_manifest_text(reader, deadline=Deadline(30.0))
        current = None if text is None else Manifest.from_json(text, manifest_url(reader.url))
    if current is not None and shard.path not in {s.path for s in current.shards}:
        return (
            f"Shard {where!r} does not exist: the dataset at {reader.url!r} was rewritten since this reader loaded "
            f"its manifest (it is now generation {current.generation}, which no longer lists this shard), and the "
            "old generation's shards were removed (after the overwrite's grace period, or by collect_garbage). "
            "Create the dataset (StreamingDataset, DataModule) again to read the current generation, or give "
            "overwrites a longer `grace_period` than your epochs take."
        )
    return (
        f"Shard {where!r} listed in the manifest does not exist. It was deleted or never finished uploading; "
        f"restore it or rewrite the dataset."
    )


def verify_dataset(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Load the manifest at ``url`` and check every shard: it exists, matches its checksum and its header.

    Unlike a streaming read, which checks each shard when it is first needed, this checks every shard up
    front (reading each one whole).

    Raises:
        ManifestError: see :func:`load_manifest`.
        ShardNotFoundError: a listed shard is missing.
        ChecksumMismatchError: a shard's bytes differ from the manifest's checksum.
        ShardFormatError: a shard is corrupt, or its header disagrees with its manifest entry.
    """
    reader = dataset_reader(_dataset_root(url), storage_options)
    manifest = read_manifest(reader)
    for shard in manifest.shards:
        open_shard(fetch_shard(reader, shard), shard, manifest.schema, shard_url(reader.url, shard.path))
    return manifest
