"""Write any dataset of samples to ``.lps`` shards plus a manifest, at any writable fsspec URL."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sized
from types import TracebackType
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from lightning_patterns._lazy import instance_of_loaded
from lightning_patterns.data.sharding import SHARDERS, Sharder
from lightning_patterns.data.shards.builder import ShardBuilder, check_block_bytes
from lightning_patterns.data.shards.garbage import DEFAULT_GRACE_PERIOD, split_expired
from lightning_patterns.data.shards.labels import LabelCounter
from lightning_patterns.data.shards.layout import DEFAULT_BLOCK_BYTES
from lightning_patterns.data.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    RetiredGeneration,
    ShardInfo,
    checksum_of,
    dataset_reader,
    fetch_manifest_text,
    manifest_url,
    publish_manifest,
    shard_url,
)
from lightning_patterns.data.shards.paths import shard_file_generation, shard_file_name
from lightning_patterns.data.shards.reader import parse_header
from lightning_patterns.data.shards.schema import Schema
from lightning_patterns.exceptions import DestinationNotEmptyError, ManifestError, SchemaMismatchError

__all__ = ["ShardWriter", "write_dataset"]

log = logging.getLogger(__name__)

Mode = Literal["create", "append", "overwrite"]
_MODES = ("create", "append", "overwrite")
_READ_ONLY_PROTOCOLS = frozenset(["http", "https"])
# What `publish_manifest` names its temporary file: a writer's leftover, like its shard files.
_TEMP_MANIFEST = (f".{MANIFEST_NAME}.", ".tmp")


class ShardWriter:
    """Writes samples into shard files and publishes the manifest on a clean exit.

    Use it as a context manager: shards are written as they fill up, the manifest is published when the
    ``with`` block ends without an exception, and on an exception the shards written so far are removed and
    any previous manifest is left untouched, so readers never see a partial dataset.

    Args:
        url: the dataset root: any writable fsspec URL or local path.
        sharding: registry name of the sharding rule (``"size"`` or ``"hash"``); ``None`` means ``"hash"`` when
            ``num_shards`` or ``hash_key`` is given, else ``"size"``, for a new
            dataset and the recorded rule when appending.
        shard_bytes: target bytes per shard file; ``None`` means 32 MiB (or the recorded target of a ``"size"``
            dataset being appended to).
        num_shards: number of hash buckets, required by ``sharding="hash"`` (taken from the manifest on append).
        hash_key: field hashed by ``sharding="hash"``; ``None`` hashes the sample index.
        mode: ``"create"`` fails if a dataset exists; ``"append"`` adds new shards to an existing dataset (or
            creates it) without touching its shard files; ``"overwrite"`` publishes a new generation (new shard
            files, then the manifest swap) and keeps the old generation's shards for ``grace_period``, listed
            as retired in the new manifest, so readers that loaded the old manifest finish their epoch.
        storage_options: passed to fsspec unchanged (credentials, endpoint, ...).
        grace_period: seconds an overwritten generation stays readable (24 hours by default). Each write
            removes the retired generations whose grace period is over; so does
            :func:`~lightning_patterns.data.shards.collect_garbage`. ``0`` removes the old generation at once.
        force: write into a folder that holds no manifest but other files. Without it such a folder is
            refused, so a dataset is never written beside unrelated files; leftovers of a killed writer
            (its shard files) do not count.
        label_fields: integer scalar fields whose per-shard class counts the manifest records (``label_counts``,
            see :mod:`~lightning_patterns.data.shards.labels`), so that readers balance classes per rank from
            the manifest alone; ``None`` records ``"label"`` when the samples have such a field, ``[]`` none.
        block_bytes: bytes per checksummed block (64 KiB by default, ``>= 4096``): any byte range of a shard can
            then be read and verified alone, so DataLoader workers read only their own samples of a shard and
            ``StreamingDataset[i]`` fetches only the blocks holding sample ``i``. ``None`` writes shards without
            a block table, as earlier versions did (read and verified only whole).

    Each buffered hash bucket holds up to ``shard_bytes`` in memory, so peak memory is about
    ``num_shards * shard_bytes``.
    """

    def __init__(
        self,
        url: str,
        *,
        sharding: str | None = None,
        shard_bytes: int | None = None,
        num_shards: int | None = None,
        hash_key: str | None = None,
        mode: Mode = "create",
        storage_options: Mapping[str, Any] | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        force: bool = False,
        label_fields: list[str] | None = None,
        block_bytes: int | None = DEFAULT_BLOCK_BYTES,
    ) -> None:
        self.block_bytes = check_block_bytes(block_bytes)
        if mode not in _MODES:
            raise ValueError(f"Unknown mode={mode!r}. Expected one of {_MODES}.")
        if isinstance(grace_period, bool) or not isinstance(grace_period, (int, float)) or not grace_period >= 0:
            raise ValueError(
                f"`grace_period` must be a number of seconds >= 0, got grace_period={grace_period!r}; 0 removes an "
                "overwritten generation at once."
            )
        self.grace_period = float(grace_period)
        self.force = force
        self.label_fields = None if label_fields is None else list(label_fields)
        if sharding is not None and sharding not in SHARDERS:
            raise ValueError(f"Unknown sharding={sharding!r}. Expected one of: {', '.join(SHARDERS.names())}.")
        self.url = url
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        self._fs, self._root = fsspec.core.url_to_fs(url, **self.storage_options)
        protocols = self._fs.protocol if isinstance(self._fs.protocol, (tuple, list)) else (self._fs.protocol,)
        if _READ_ONLY_PROTOCOLS.intersection(protocols):
            raise ValueError(
                f"Cannot write to {url!r}: HTTP(S) is read-only. Write the dataset to a local path or an object "
                f"store (s3://, gs://, ...) and serve it over HTTP from there."
            )
        # Reads (the manifest, on append and overwrite) go through the remote-read layer, with retries.
        self._reader = dataset_reader(url, self.storage_options)
        self._manifest_found = False
        self._previous = self._existing_manifest()
        if not self._manifest_found and not force:
            self._refuse_foreign_files()
        append_to = self._previous if mode == "append" else None
        self._sharder = self._make_sharder(append_to, sharding, shard_bytes, num_shards, hash_key)
        self.schema: Schema | None = append_to.schema if append_to is not None else None
        self._labels: LabelCounter | None = None
        if self.schema is not None:
            self._sharder.check_schema(list(self.schema))
            self._labels = LabelCounter(self.schema, self.label_fields)
        self._kept: tuple[ShardInfo, ...] = append_to.shards if append_to is not None else ()
        self._next_index = sum(s.num_samples for s in self._kept)
        self.generation = (self._previous.generation if self._previous is not None else 0) + 1
        self._token = secrets.token_hex(4)
        self._builders: dict[int, ShardBuilder] = {}
        self._written: list[ShardInfo] = []
        self._first_index = self._next_index
        self._warned_oversize = False
        self._closed = False
        self.manifest: Manifest | None = None

    def _existing_manifest(self) -> Manifest | None:
        if self.mode == "create":
            if not self._reader.exists(MANIFEST_NAME):
                return None
            raise FileExistsError(
                f"A dataset already exists at {self.url!r} ({manifest_url(self.url)!r}). Pass mode='append' to add "
                f"samples to it, mode='overwrite' to replace it, or choose another URL."
            )
        # One request: reading the manifest also tells whether there is one.
        text = fetch_manifest_text(self._reader)
        if text is None:
            return None
        self._manifest_found = True
        try:
            return Manifest.from_json(text, manifest_url(self.url))
        except ManifestError:
            if self.mode == "overwrite":
                log.warning("Overwriting the unreadable manifest at %s; its old shards are left in place", self.url)
                return None
            raise

    def _refuse_foreign_files(self) -> None:
        """Raise if the folder holds files other than a writer's leftovers (there is no manifest)."""
        try:
            names = [str(name).rstrip("/").rpartition("/")[2] for name in self._fs.ls(self._root, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return
        foreign = sorted(
            name
            for name in names
            if shard_file_generation(name) is None
            and not (name.startswith(_TEMP_MANIFEST[0]) and name.endswith(".tmp"))
        )
        if foreign:
            shown = ", ".join(repr(name) for name in foreign[:3]) + (
                f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            )
            raise DestinationNotEmptyError(
                f"{self.url!r} is not empty but holds no dataset manifest: it has {shown}. Writing a dataset there "
                "would put its shards beside unrelated files. Choose a new or empty folder, or pass force=True to "
                "write there anyway."
            )
        if names:
            log.info(
                "%s holds %d shard files of an unfinished write; they stay unlisted (see collect_garbage)",
                self.url,
                len(names),
            )

    @staticmethod
    def _make_sharder(
        previous: Manifest | None,
        sharding: str | None,
        shard_bytes: int | None,
        num_shards: int | None,
        hash_key: str | None,
    ) -> Sharder:
        if previous is None:
            # `num_shards` (and `hash_key`) only make sense for hash sharding: asking for them chooses it.
            implied = "hash" if num_shards is not None or hash_key is not None else "size"
            cls = SHARDERS.get(sharding or implied)
            return cls.from_arguments(shard_bytes=shard_bytes, num_shards=num_shards, hash_key=hash_key)
        recorded = previous.sharding
        rule = recorded["rule"]
        conflicts = [
            f"{arg}={given!r} (the dataset has {arg}={have!r})"
            for arg, given, have in (
                ("sharding", sharding, rule),
                ("num_shards", num_shards, recorded.get("num_shards")),
                ("hash_key", hash_key, recorded.get("key")),
            )
            if given is not None and given != have
        ]
        if conflicts:
            raise ValueError(
                f"Cannot append with {', '.join(conflicts)}: appended samples must follow the dataset's sharding "
                f"rule {recorded!r}. Drop those arguments to reuse the recorded rule, or use mode='overwrite'."
            )
        if rule not in SHARDERS:
            raise ManifestError(
                f"The dataset was sharded with {rule!r}, which is not registered here "
                f"(known: {', '.join(SHARDERS.names())}). Install the plugin that provides it to append."
            )
        return SHARDERS.get(rule).from_json(recorded, shard_bytes=shard_bytes)

    @property
    def sharder(self) -> Sharder:
        """The sharding rule in use."""
        return self._sharder

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (a dict of field name to value; see :class:`~lightning_patterns.data.shards.Schema`)."""
        if self._closed:
            raise RuntimeError("This ShardWriter is closed; open a new one to write more samples.")
        if self.schema is None:
            self.schema = Schema.infer(sample)
            self._sharder.check_schema(list(self.schema))
            self._labels = LabelCounter(self.schema, self.label_fields)
        try:
            values = self.schema.normalize(sample)
        except SchemaMismatchError as err:
            where = "the existing dataset" if self._kept else "the first sample"
            raise SchemaMismatchError(f"Sample {self._next_index} does not match {where}: {err}") from None
        index = self._next_index
        bucket = self._sharder.bucket(sample, index)
        builder = self._builders.get(bucket)
        target = self._sharder.shard_bytes
        if builder is not None and builder.num_samples and not builder.fits(values, target):
            self._flush(bucket)
            builder = None
        if builder is None:
            builder = self._builders[bucket] = ShardBuilder(self.schema, block_bytes=self.block_bytes)
            if not builder.fits(values, target) and not self._warned_oversize:
                self._warned_oversize = True
                warnings.warn(
                    f"Sample {index} needs a {builder.file_size_with(values)}-byte shard, more than "
                    f"shard_bytes={target}; it gets a shard of its own (further such samples are not reported). "
                    f"Increase `shard_bytes` if shards should hold several samples.",
                    UserWarning,
                    stacklevel=3,
                )
        builder.append(values)
        assert self._labels is not None
        self._labels.add(bucket, values, index)
        self._next_index = index + 1

    def _flush(self, bucket: int) -> None:
        builder = self._builders.pop(bucket)
        data = builder.finish()
        multi = self._sharder.num_buckets > 1
        path = shard_file_name(self.generation, self._token, bucket if multi else None, len(self._written))
        if not self._written and isinstance(self._fs, LocalFileSystem):
            self._fs.makedirs(self._root, exist_ok=True)  # object stores have no folders to create
        self._fs.pipe_file(shard_url(self._root, path), data)
        assert self._labels is not None
        head_bytes = parse_header(data, len(data)).head_bytes
        self._written.append(
            ShardInfo(
                path,
                builder.num_samples,
                len(data),
                checksum_of(data),
                bucket if multi else None,
                self._labels.pop(bucket),
                head_bytes=head_bytes,
                head_checksum=None if head_bytes is None else checksum_of(memoryview(data)[:head_bytes]),
            )
        )
        log.debug("Wrote shard %s (%d samples, %d bytes)", path, builder.num_samples, len(data))

    def close(self) -> Manifest:
        """Write the remaining buffered shards and publish the manifest; returns it."""
        if self._closed:
            if self.manifest is None:
                raise RuntimeError("This ShardWriter was aborted; nothing was published.")
            return self.manifest
        self._closed = True
        try:
            if self._next_index == self._first_index:
                raise ValueError(
                    f"No samples to write to {self.url!r}: the dataset is empty. Pass a dataset or iterable that "
                    f"yields at least one sample (a dict of field name to value)."
                )
            for bucket in sorted(self._builders):
                self._flush(bucket)
            assert self.schema is not None
            expired, pending = self._retire()
            manifest = Manifest(
                schema=self.schema,
                shards=self._kept + self._with_recorded_labels(),
                sharding=self._sharder.to_json(),
                generation=self.generation,
                retired=pending,
            )
            if self.mode == "create" and self._reader.exists(MANIFEST_NAME):
                raise FileExistsError(
                    f"Another writer created a dataset at {self.url!r} while this one was writing. "
                    f"Pass mode='append' or mode='overwrite', or choose another URL."
                )
            publish_manifest(manifest, self.url, self.storage_options)
        except BaseException:
            self._remove(self._written)
            raise
        self.manifest = manifest
        # Only after the swap: until then readers may still load the previous manifest.
        self._remove_paths([path for generation in expired for path in generation.shards])
        return manifest

    def _with_recorded_labels(self) -> tuple[ShardInfo, ...]:
        """The shards written, with class counts only of the fields counted to the end (see :mod:`.labels`)."""
        fields = set(self._labels.fields) if self._labels is not None else set()
        return tuple(
            dataclasses.replace(info, label_counts={k: v for k, v in info.label_counts.items() if k in fields})
            for info in self._written
        )

    def _retire(self) -> tuple[tuple[RetiredGeneration, ...], tuple[RetiredGeneration, ...]]:
        """``(expired, pending)`` retired generations after this write: an overwrite retires the previous one."""
        if self._previous is None:
            return (), ()
        retired = self._previous.retired
        if self.mode == "overwrite":
            paths = tuple(s.path for s in self._previous.shards)
            retired += (RetiredGeneration(self._previous.generation, time.time(), paths),)
        return split_expired(retired, self.grace_period, time.time())

    def abort(self) -> None:
        """Drop buffered samples and remove the shards written so far; any previous manifest stays as it was."""
        if self._closed:
            return
        self._closed = True
        self._builders.clear()
        self._remove(self._written)

    def _remove(self, shards: Iterable[ShardInfo]) -> None:
        self._remove_paths([s.path for s in shards])

    def _remove_paths(self, relative: list[str]) -> None:
        paths = [shard_url(self._root, path) for path in relative]
        if not paths:
            return
        try:
            try:
                self._fs.rm(paths)
            except FileNotFoundError:  # some were removed already (collect_garbage): remove the others one by one
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        self._fs.rm(path)
        except (OSError, ValueError) as err:  # best effort: unlisted files are invisible; collect_garbage finds them
            log.warning("Could not remove %d shard files under %s: %s", len(paths), self.url, err)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _len_or_none(samples: Any) -> int | None:
    try:
        return len(samples)
    except TypeError:
        return None


def _iterate(samples: Any) -> tuple[Iterator[Any], int | None]:
    if isinstance(samples, Mapping):
        raise TypeError(
            "`samples` is a single dict; expected a dataset or iterable of samples. Wrap it in a list: `[sample]`."
        )
    if isinstance(samples, (list, tuple)):
        return iter(samples), len(samples)
    if instance_of_loaded(samples, "torch.utils.data", "IterableDataset"):
        # torch's IterableDataset inherits a __getitem__ that raises: it is an iterable, not map-style.
        return iter(samples), _len_or_none(samples)
    if hasattr(samples, "__len__") and hasattr(samples, "__getitem__"):
        n = len(samples)
        return (samples[i] for i in range(n)), n
    if isinstance(samples, Iterable):
        total = len(samples) if isinstance(samples, Sized) else None
        return iter(samples), total
    raise TypeError(
        f"`samples` must be a map-style dataset (with __len__ and __getitem__) or an iterable of samples; "
        f"got {type(samples).__name__}."
    )


def write_dataset(
    samples: Any,
    url: str,
    *,
    sharding: str | None = None,
    shard_bytes: int | None = None,
    num_shards: int | None = None,
    hash_key: str | None = None,
    mode: Mode = "create",
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    force: bool = False,
    label_fields: list[str] | None = None,
    block_bytes: int | None = DEFAULT_BLOCK_BYTES,
) -> Manifest:
    """Write ``samples`` as shards plus a manifest at ``url`` and return the published manifest.

    Args:
        samples: a map-style dataset (``__len__`` and ``__getitem__``) or an iterable of samples; each sample is a
            dict of field name to a tensor, numpy array or scalar, Python int/float/bool, ``bytes`` or ``str``.
        url: the dataset root: a local path or any writable fsspec URL (``file://``, ``memory://``, ``s3://``, ...).
        sharding: ``"size"`` (default for new datasets) or ``"hash"``; see :class:`ShardWriter`.
        shard_bytes: target bytes per shard file (default 32 MiB).
        num_shards: hash buckets for ``sharding="hash"``.
        hash_key: field hashed by ``sharding="hash"``; ``None`` hashes the sample index.
        mode: ``"create"``, ``"append"`` or ``"overwrite"``; see :class:`ShardWriter`.
        storage_options: passed to fsspec unchanged.
        progress: show a tqdm progress bar.
        grace_period: seconds an overwritten generation stays readable; see :class:`ShardWriter`.
        force: write into a folder that holds other files but no manifest; see :class:`ShardWriter`.
        label_fields: integer label fields whose per-shard class counts the manifest records; ``None``: ``"label"``
            if the samples have one. See :class:`ShardWriter`.
        block_bytes: bytes per checksummed block, or ``None`` for no block table; see :class:`ShardWriter`.

    Raises:
        ValueError: invalid arguments (a ``label_fields`` entry that is no integer scalar field), or an empty
            dataset.
        FileExistsError: ``mode="create"`` and a dataset exists at ``url``.
        DestinationNotEmptyError: ``url`` holds other files but no manifest, and ``force`` is not set (a
            ``FileExistsError``).
        SchemaMismatchError: a sample differs from the first one, or from the dataset appended to.

    Examples:
        >>> samples = [{"x": 1}, {"x": 2}]
        >>> manifest = write_dataset(samples, "memory://doctest/write_dataset", mode="overwrite", progress=False)
        >>> manifest.num_samples, manifest.sharding["rule"]
        (2, 'size')
    """
    iterator, total = _iterate(samples)
    with (
        ShardWriter(
            url,
            sharding=sharding,
            shard_bytes=shard_bytes,
            num_shards=num_shards,
            hash_key=hash_key,
            mode=mode,
            storage_options=storage_options,
            grace_period=grace_period,
            force=force,
            label_fields=label_fields,
            block_bytes=block_bytes,
        ) as writer,
        tqdm(iterator, total=total, disable=not progress, unit="sample", desc=f"Writing {url}") as bar,
    ):
        write = writer.write
        for sample in bar:
            write(sample)
    assert writer.manifest is not None
    return writer.manifest
