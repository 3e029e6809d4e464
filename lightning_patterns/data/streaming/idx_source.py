"""The samples of an IDX images + labels pair, read by index: from the remote, or from an epoch cache.

:class:`IDXFiles` reads the two headers once (checking them against each other), then gathers any samples
through a :class:`IDXSession`, one per iteration:

- **From the remote.** Each run of consecutive samples is one seek and one read on a buffered stream of
  range requests (see :class:`~lightning_patterns.data.remote.RemoteReader`), so raw files are read at any
  position. A gzip file can only be read forwards (seeking back means decompressing again from its
  start): :attr:`IDXFiles.sequential` tells the reader to ask for samples in file order.
- **From a cache** (``"memory"`` or ``"disk"``, as for sharded datasets): the decompressed body of each
  file is one cache entry, fetched whole the first time any sample is needed and read locally from then
  on, so later epochs read nothing from the remote. The memory cache
  (:class:`~lightning_patterns.data.caching.MemoryEpochCache`) is laid out from the headers in the
  process that calls :meth:`IDXFiles.prepare` (the DataLoader's, before its workers start), so a rank's
  workers share one copy. The disk cache (:class:`~lightning_patterns.data.caching.DiskEpochCache`) names
  entries by their sha256, which IDX files do not publish: the first process to fetch a pair computes the
  checksums and records them in ``<cache_dir>/lightning_patterns_cache_v1/idx/``, keyed by the two URLs
  and what the server says of each file (size, and ETag or modification time where it tells), under a
  file lock, so a machine fetches a pair once; later runs find the record and read the verified entries.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_patterns.data.caching import DiskEpochCache, EpochCache, MemoryEpochCache
from lightning_patterns.data.caching.locks import file_lock
from lightning_patterns.data.remote import FetchStats, RemoteReader, RetryPolicy
from lightning_patterns.data.shards.manifest import Manifest, ShardInfo
from lightning_patterns.data.shards.schema import FieldSpec, Schema
from lightning_patterns.data.streaming.idx_format import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    IDXHeader,
    check_header,
    read_idx_header,
    readinto_exact,
)

__all__ = ["IDXFiles", "IDXLayout", "IDXSession"]

log = logging.getLogger(__name__)

_IntArray = npt.NDArray[np.int64]
_IDENTITY_KEYS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "Last-Modified", "updated")
_RECORD_VERSION = 1
_HEADER_BLOCK = 16 * 1024


@dataclass(frozen=True)
class IDXLayout:
    """What the two headers say.

    Args:
        count: samples in each file.
        sample_shape: the shape of one image, e.g. ``(28, 28)``.
        images_header: bytes before the first image.
        labels_header: bytes before the first label.
    """

    count: int
    sample_shape: tuple[int, ...]
    images_header: int
    labels_header: int

    @property
    def image_bytes(self) -> int:
        """Bytes of one image."""
        return int(np.prod(self.sample_shape, dtype=np.int64))

    def body_bytes(self, kind: int) -> int:
        """Bytes of the values of the images (``kind=0``) or labels (``kind=1``) file."""
        return self.count * (self.image_bytes if kind == 0 else 1)


class IDXFiles:
    """An IDX images + labels pair: checked headers, and sessions that gather samples by index.

    Args:
        images_url: the images file (magic ``0x00000803``), raw or gzip.
        labels_url: the labels file (magic ``0x00000801``), raw or gzip.
        storage_options: passed to fsspec unchanged.
        retry: retry policy of the remote reads.
        block_size: bytes per range request.
        stats: counters of the remote reads of this process.
        cache: a :class:`~lightning_patterns.data.caching.MemoryEpochCache` or
            :class:`~lightning_patterns.data.caching.DiskEpochCache` keeping the decompressed files, or ``None``.

    Raises:
        ValueError: ``cache`` is another kind of cache.
    """

    def __init__(
        self,
        images_url: str,
        labels_url: str,
        storage_options: Mapping[str, Any],
        *,
        retry: RetryPolicy,
        block_size: int,
        stats: FetchStats,
        cache: EpochCache | None,
    ) -> None:
        if cache is not None and not isinstance(cache, MemoryEpochCache | DiskEpochCache):
            raise ValueError(
                f"IDX files can be cached with cache='memory' or cache='disk', not {cache!r}: their entries are whole "
                "decompressed files, which other caches do not know how to key."
            )
        self.urls = (images_url, labels_url)
        self.block_size = block_size
        self.cache = cache
        self.readers = tuple(RemoteReader(url, storage_options, retry=retry, stats=stats) for url in self.urls)
        self._layout: IDXLayout | None = None
        self._gzipped = False
        self._bound = False

    # ------------------------------------------------------------------ headers

    def open(self, kind: int, block_size: int | None = None) -> io.BufferedIOBase:
        """A stream over the (decompressed) images (``kind=0``) or labels (``kind=1``) file."""
        return self.readers[kind].open(self.urls[kind], block_size=block_size or self.block_size, compression="infer")

    def header(self, kind: int, fileobj: io.BufferedIOBase) -> IDXHeader:
        """Read and check the header of the images (``kind=0``) or labels file from ``fileobj``."""
        url = self.urls[kind]
        return check_header(read_idx_header(fileobj, name=url), IMAGES_MAGIC if kind == 0 else LABELS_MAGIC, url)

    def layout(self) -> IDXLayout:
        """The checked headers (read once, two small reads)."""
        if self._layout is None:
            headers = []
            for kind in (0, 1):
                # Small blocks: a header is a few bytes (a gzip one needs a little more), never a whole block.
                with self.open(kind, min(self.block_size, _HEADER_BLOCK)) as stream:
                    headers.append(self.header(kind, stream))
                    self._gzipped |= isinstance(stream, gzip.GzipFile)
            self._layout = self.pair_layout(*headers)
        return self._layout

    def pair_layout(self, images: IDXHeader, labels: IDXHeader) -> IDXLayout:
        """The layout of two headers that belong together, else a ValueError naming both files."""
        if images.count != labels.count:
            raise ValueError(
                f"The images file {self.urls[0]} holds {images.count} samples but the labels file {self.urls[1]} "
                f"holds {labels.count}; pass the matching pair (e.g. both train or both t10k files)."
            )
        return IDXLayout(labels.count, images.sample_shape, images.header_size, labels.header_size)

    @property
    def sequential(self) -> bool:
        """Whether samples should be asked for in file order: gzip read from the remote cannot seek back cheaply."""
        self.layout()
        return self._gzipped and self.cache is None

    def prepare(self) -> None:
        """Read the headers and lay out a memory cache (or find a disk cache's record): call before workers start."""
        layout = self.layout()
        if self.cache is not None and not self._bound:
            if isinstance(self.cache, MemoryEpochCache):
                self._bind(layout, (_NO_CHECKSUM, _NO_CHECKSUM))
            else:
                record = self._read_record()
                if record is not None:
                    self._bind(layout, record)

    # ------------------------------------------------------------------ cache

    def _bind(self, layout: IDXLayout, checksums: tuple[str, str]) -> None:
        assert self.cache is not None
        shards = tuple(
            ShardInfo(os.path.basename(url.rstrip("/")) or url, layout.count, layout.body_bytes(kind), checksums[kind])
            for kind, url in enumerate(self.urls)
        )
        self.cache.bind(Manifest(_BODY_SCHEMA, shards, {"rule": "idx", "urls": list(self.urls)}))
        self._bound = True

    def body(self, kind: int) -> Any:
        """The decompressed values of the images (``kind=0``) or labels file, through the cache."""
        assert self.cache is not None
        self.prepare()
        if not self._bound:  # a disk cache without a record of this pair: fetch it, under the pair's lock
            assert isinstance(self.cache, DiskEpochCache)
            folder = self.cache.root / "idx"
            folder.mkdir(parents=True, exist_ok=True)
            key = self._key()
            what = f"the IDX pair {self.urls[0]} + {self.urls[1]}"
            with file_lock(str(folder / f"{key}.lock"), timeout=self.cache.lock_timeout, what=what):
                record = self._read_record()
                if record is not None:
                    self._bind(self.layout(), record)
                else:
                    bodies = (self.download(0), self.download(1))
                    checksums = (_sha256(bodies[0]), _sha256(bodies[1]))
                    self._bind(self.layout(), checksums)
                    for index, data in enumerate(bodies):
                        self.cache.get_or_fetch(index, functools.partial(bytes, data))  # stores it (already counted)
                    self._write_record(folder / f"{key}.json", checksums)
        return self.cache.get_or_fetch(kind, lambda: self.download(kind))

    def download(self, kind: int) -> bytes:
        """The decompressed values of the images (``kind=0``) or labels file, read whole from the remote."""
        layout = self.layout()
        size = layout.body_bytes(kind)
        with self.open(kind) as stream:
            self.header(kind, stream)
            buf = bytearray(size)
            got = readinto_exact(stream, buf)
        if got < size:
            raise _ended_early(self.urls, layout.count, kind, got // (layout.image_bytes if kind == 0 else 1))
        return bytes(buf)

    def _key(self) -> str:
        identity = [[url, *self._identity(reader, url)] for reader, url in zip(self.readers, self.urls, strict=True)]
        return hashlib.sha256(json.dumps([_RECORD_VERSION, identity]).encode()).hexdigest()

    @staticmethod
    def _identity(reader: RemoteReader, url: str) -> list[Any]:
        """What the server says of the file that changes when it does: its size, and ETag or mtime if it tells."""
        found: list[Any] = [reader.size(url)]
        try:
            info = reader.fs.info(reader.resolve(url))
        except (OSError, ValueError, NotImplementedError):
            return found
        found += [str(info[key]) for key in _IDENTITY_KEYS if info.get(key) is not None]
        return found

    def _read_record(self) -> tuple[str, str] | None:
        assert isinstance(self.cache, DiskEpochCache)
        path = self.cache.root / "idx" / f"{self._key()}.json"
        try:
            data = json.loads(path.read_text())
            checksums = (str(data["images"]), str(data["labels"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return checksums

    @staticmethod
    def _write_record(path: Any, checksums: tuple[str, str]) -> None:
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            temp.write_text(json.dumps({"images": checksums[0], "labels": checksums[1]}))
            os.replace(temp, path)
        except OSError as err:  # the pair is fetched again by the next run: slower, never wrong
            log.warning("Could not record the checksums of an IDX pair at %s: %s", path, err)
            with contextlib.suppress(OSError):
                temp.unlink()

    # ------------------------------------------------------------------ reading

    def session(self) -> IDXSession:
        """A new session: open files (or cache entries) for one iteration; close it when done."""
        return IDXSession(self)

    def close(self) -> None:
        """Release the remote connections."""
        for reader in self.readers:
            reader.close()


_NO_CHECKSUM = ""  # the memory cache keeps what it fetched and never checks a checksum
_BODY_SCHEMA = Schema({"values": FieldSpec("uint8", ())})


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _ended_early(urls: tuple[str, str], count: int, kind: int, got: int) -> ValueError:
    return ValueError(
        f"The IDX files end early: their headers announce {count} samples, but {urls[kind]} holds {got}; a download "
        "or upload was cut short, so copy the files again."
    )


class IDXSession:
    """Gathers samples of an :class:`IDXFiles` by index, for one iteration (its open streams are closed after)."""

    def __init__(self, files: IDXFiles) -> None:
        self.files = files
        self.layout = files.layout()
        self._streams: list[io.BufferedIOBase | None] = [None, None]
        self._bodies: list[Any] = [None, None]

    def gather(self, indices: _IntArray) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """Images ``(n, rows, cols)`` and labels ``(n,)`` of samples ``indices``, in that order (uint8)."""
        n = indices.size
        images = np.empty((n, self.layout.image_bytes), dtype=np.uint8)
        labels = np.empty(n, dtype=np.uint8)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        at = 0
        for run in np.split(ordered, breaks) if n else ():
            first, size = int(run[0]), run.size
            rows = order[at : at + size]
            images[rows] = self._read(0, first, size).reshape(size, -1)
            labels[rows] = self._read(1, first, size)
            at += size
        return images.reshape(n, *self.layout.sample_shape), labels

    def _read(self, kind: int, first: int, size: int) -> npt.NDArray[np.uint8]:
        per = self.layout.image_bytes if kind == 0 else 1
        if self.files.cache is not None:
            if self._bodies[kind] is None:
                self._bodies[kind] = self.files.body(kind)
            return np.frombuffer(self._bodies[kind], dtype=np.uint8, count=size * per, offset=first * per)
        stream = self._streams[kind]
        if stream is None:
            stream = self._streams[kind] = self.files.open(kind)
        offset = (self.layout.images_header, self.layout.labels_header)[kind] + first * per
        if stream.tell() != offset:
            stream.seek(offset)
        buf = bytearray(size * per)
        got = readinto_exact(stream, buf)
        if got < len(buf):
            raise _ended_early(self.files.urls, self.layout.count, kind, first + got // per)
        return np.frombuffer(buf, dtype=np.uint8)

    def close(self) -> None:
        """Close the open streams and let go of the cache entries."""
        for stream in self._streams:
            if stream is not None:
                stream.close()
        self._streams = [None, None]
        self._bodies = [None, None]
