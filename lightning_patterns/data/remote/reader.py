"""``RemoteReader``: reads from one fsspec filesystem with retries, resume from offset, checksums and counters.

A reader picks one :class:`~lightning_patterns.data.remote.transports.Transport` for its filesystem and
wraps every request in one retry loop (:meth:`RemoteReader._read_with_retries` for bytes,
:meth:`RemoteReader._lookup_with_retries` for lookups). Transient faults are retried with exponential backoff
and jitter (see :class:`~lightning_patterns.data.remote.retry.RetryPolicy`), and every retry resumes at the
byte offset already reached instead of starting over. A missing object is never retried.

Every read is bounded: it never accepts more bytes than asked for (``end``, a known ``size``, or
``max_bytes`` when the size is unknown), and a :class:`~lightning_patterns.data.remote.deadline.Deadline`
bounds it in time, the request in flight included. On a local filesystem, a path under the reader's root
that resolves (through symlinks) outside it is refused.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec.core
from fsspec.implementations.local import LocalFileSystem

from lightning_patterns.data.remote.checksum import checksum_mismatch, parse_checksum
from lightning_patterns.data.remote.deadline import Deadline
from lightning_patterns.data.remote.retry import (
    RetryPolicy,
    describe_error,
    give_up_error,
    is_transient_error,
    redact_url,
    refused_address,
)
from lightning_patterns.data.remote.stats import FetchStats
from lightning_patterns.data.remote.stream import buffered_stream
from lightning_patterns.data.remote.transports import Transport, transport_for
from lightning_patterns.data.remote.transports.base import ByteSink
from lightning_patterns.exceptions import (
    DeadlineExceededError,
    ObjectTooLargeError,
    ShardNotFoundError,
    UnsafePathError,
)

__all__ = ["RemoteReader", "open_url"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_DEFAULT_CHUNK_SIZE = 8 * 2**20
_DEFAULT_BLOCK_SIZE = 2**20
_NOT_FOUND = "Remote object not found (missing file or HTTP 404); check the URL and that the data was fully written"


class RemoteReader:
    """Reads objects from one fsspec filesystem with retries, resume from offset, checksums and metrics.

    Safe to share between threads. Pickles by its constructor arguments: the filesystem (and the transport
    chosen for it) is created lazily in each process (and again after a fork), so a reader can be sent to
    DataLoader workers.

    Args:
        url: A URL on the filesystem to read from (a dataset root or any object on it); it selects the fsspec
            protocol, and relative URLs passed to the methods are resolved against it.
        storage_options: Passed unchanged to ``fsspec.core.url_to_fs``; never logged.
        retry: When and how to retry transient faults; ``RetryPolicy()`` when ``None``.
        stats: Counters to add to; a new :class:`~lightning_patterns.data.remote.FetchStats` when ``None``.
        chunk_size: Bytes per range request on filesystems read in chunks (S3, GCS, ``memory://``, ...);
            HTTP(S) bodies are streamed and local files read whole instead.
        seed: Seeds the backoff jitter, for reproducible waits; random when ``None``.

    Example:
        >>> import fsspec, hashlib
        >>> with fsspec.open("memory://doc/fetch/a.bin", "wb") as f:
        ...     _ = f.write(b"hello")
        >>> reader = RemoteReader("memory://doc/fetch")
        >>> reader.fetch("a.bin", checksum="sha256:" + hashlib.sha256(b"hello").hexdigest())
        b'hello'
        >>> reader.stats.bytes_read, reader.transport.name
        (5, 'range')
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        stats: FetchStats | None = None,
        chunk_size: int = _DEFAULT_CHUNK_SIZE,
        seed: int | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"RemoteReader(url={url!r}) must be a non-empty URL such as 's3://bucket/dataset'.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"RemoteReader(chunk_size={chunk_size!r}) must be a positive number of bytes.")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"RemoteReader(retry={retry!r}) must be a RetryPolicy or None.")
        self.url = url
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.retry = retry if retry is not None else RetryPolicy()
        self.stats = stats if stats is not None else FetchStats()
        self.chunk_size = chunk_size
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fs: Any = None
        self._transport: Transport | None = None
        self._fs_pid: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_reader,
            (self.url, self.storage_options, self.retry, self.stats, self.chunk_size, self.seed),
        )

    def __repr__(self) -> str:
        return f"RemoteReader(url={redact_url(self.url)!r}, retry={self.retry!r})"

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, created on first use in this process."""
        return self._connect()[0]

    @property
    def transport(self) -> Transport:
        """The transport chosen for :attr:`fs`, once per filesystem."""
        return self._connect()[1]

    def _connect(self) -> tuple[Any, Transport]:
        with self._lock:
            if self._fs is None or self._transport is None or self._fs_pid != os.getpid():
                # Our own instance, not fsspec's shared one, so that close() can release its connections.
                options = {"skip_instance_cache": True, **self.storage_options}
                fs, _ = fsspec.core.url_to_fs(self.url, **options)
                self._transport = transport_for(fs)(fs, chunk_size=self.chunk_size, timeout=self.retry.timeout)
                self._fs, self._fs_pid = fs, os.getpid()
            return self._fs, self._transport

    def close(self) -> None:
        """Release the filesystem and its connections; a later read creates them again."""
        with self._lock:
            transport, self._transport, self._fs = self._transport, None, None
            same_process = self._fs_pid == os.getpid()
        if same_process and transport is not None:
            transport.close()

    def resolve(self, url: str) -> str:
        """An absolute URL for ``url``, which may be relative to this reader's ``url``.

        Args:
            url: An absolute URL (``proto://...``) or a path relative to the reader's root.

        Returns:
            The absolute URL.
        """
        if "://" in url or url.startswith("/"):
            return url
        root = self.url.rstrip("/")
        if url.startswith(root + "/"):
            # Already under a root that is itself a relative local path ("data/train"): URLs built from it, such
            # as ``shard_url(reader.url, path)``, are relative too, and must not get the root twice.
            return url
        return root + "/" + url

    # ------------------------------------------------------------------ public reads

    def fetch(
        self,
        url: str,
        *,
        size: int | None = None,
        checksum: str | None = None,
        max_bytes: int | None = None,
        deadline: Deadline | None = None,
    ) -> bytes:
        """Read a whole object as ``bytes``; see :meth:`fetch_buffer`, which avoids the copy.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            size: The object's size in bytes if known.
            checksum: ``"<algorithm>:<hex digest>"`` to verify the bytes against.
            max_bytes: The most bytes to accept when ``size`` is not known.
            deadline: When to give up, retries included.

        Returns:
            The object's bytes.
        """
        return bytes(self.fetch_buffer(url, size=size, checksum=checksum, max_bytes=max_bytes, deadline=deadline))

    def fetch_buffer(
        self,
        url: str,
        *,
        size: int | None = None,
        checksum: str | None = None,
        max_bytes: int | None = None,
        deadline: Deadline | None = None,
    ) -> memoryview:
        """Read a whole object, retrying transient faults and resuming from the offset reached.

        The bytes are returned as a read-only view of the buffer they were received into: no second copy
        of a large shard is ever made. With ``size`` given, no more than ``size`` bytes are accepted whatever
        the remote sends.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            size: The object's size in bytes if known (saves a size lookup; a shorter body counts as truncated).
            checksum: ``"<algorithm>:<hex digest>"``, e.g. ``"sha256:9f86..."``, to verify the bytes against.
                On a mismatch the object is fetched once more before giving up.
            max_bytes: The most bytes to accept: an object found to be larger fails as soon as that is known
                (from its size, or once ``max_bytes + 1`` bytes arrived), without reading the rest.
            deadline: When to give up, retries and the request in flight included.

        Returns:
            A read-only view of the object's bytes.

        Raises:
            ShardNotFoundError: The object does not exist (never retried).
            ChecksumMismatchError: The bytes did not match ``checksum`` on two fetches in a row.
            ObjectTooLargeError: The object is larger than ``max_bytes``.
            DeadlineExceededError: ``deadline`` passed or was cancelled.
            UnsafePathError: A local path under the root resolves outside it.
            RemoteUnreachableError: The connection was refused, also when asked again.
            OSError: A transient fault persisted for ``retry.max_attempts`` attempts without progress. Errors
                that asking again cannot fix (e.g. HTTP 403) propagate unchanged at once.
        """
        url = self.resolve(url)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"fetch(size={size!r}) must be a non-negative number of bytes or None.")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"fetch(max_bytes={max_bytes!r}) must be a non-negative number of bytes or None.")
        if checksum is not None:
            parse_checksum(checksum)  # a malformed checksum fails before any request
        data = self._read(url, 0, size, missing=ShardNotFoundError, max_bytes=max_bytes, deadline=deadline)
        if checksum is None or checksum_mismatch(data, checksum, url) is None:
            return memoryview(data).toreadonly()
        log.warning("Checksum mismatch for %s; fetching it once more", redact_url(url))
        self.stats.record(retries=1)
        data = self._read(url, 0, size, missing=ShardNotFoundError, max_bytes=max_bytes, deadline=deadline)
        error = checksum_mismatch(data, checksum, url, expected_size=size, fetches=2)
        if error is not None:
            raise error
        return memoryview(data).toreadonly()

    def read_range(
        self,
        url: str,
        start: int = 0,
        end: int | None = None,
        *,
        short_ok: bool = False,
        deadline: Deadline | None = None,
    ) -> bytes:
        """Read bytes ``[start, end)`` of an object with retries; ``end=None`` reads to its end.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            start: First byte to read.
            end: One past the last byte to read; the result is exactly ``end - start`` bytes long unless
                ``short_ok``.
            short_ok: ``end`` is a most, not a promise: an answer that ends early is the object's end (for
                objects whose size is unknown), not a truncation to retry.
            deadline: When to give up, retries and the request in flight included.

        Returns:
            The bytes read.

        Raises:
            FileNotFoundError: The object does not exist.
            DeadlineExceededError: ``deadline`` passed or was cancelled.
            OSError: A transient fault persisted, or the object ends before ``end``.
        """
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"read_range(start={start!r}, end={end!r}) needs 0 <= start <= end.")
        url = self.resolve(url)
        return bytes(self._read(url, start, end, missing=FileNotFoundError, short_ok=short_ok, deadline=deadline))

    def read_range_into(
        self, url: str, start: int, out: memoryview | bytearray, *, deadline: Deadline | None = None
    ) -> None:
        """Read bytes ``[start, start + len(out))`` of an object straight into ``out``, with retries.

        The bytes land in ``out`` as they arrive (no intermediate buffer of the range), so a caller can read a
        shard into the memory it will be used from: a shared cache region, a buffer of the shard's size.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            start: First byte to read.
            out: A writable buffer; exactly ``len(out)`` bytes are read into it.
            deadline: When to give up, retries and the request in flight included.

        Raises:
            FileNotFoundError: The object does not exist.
            DeadlineExceededError: ``deadline`` passed or was cancelled.
            OSError: A transient fault persisted, or the object ends before the range does.
        """
        view = memoryview(out).cast("B")
        if view.readonly:
            raise ValueError("read_range_into(out=...) needs a writable buffer (a bytearray, a writable mmap).")
        if start < 0:
            raise ValueError(f"read_range_into(start={start!r}) needs start >= 0.")
        url = self.resolve(url)
        self._read(url, start, start + len(view), missing=FileNotFoundError, deadline=deadline, sink=_WindowSink(view))

    def size(self, url: str) -> int | None:
        """The object's size in bytes (``None`` if the backend cannot tell), looked up with retries.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.

        Returns:
            The size, or ``None``.
        """
        return self._lookup(url, self.transport.size)

    def exists(self, url: str) -> bool:
        """Whether the object exists, looked up with retries.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.

        Returns:
            ``True`` if it exists.
        """
        return self._lookup(url, self.transport.exists)

    def is_file(self, url: str) -> bool:
        """Whether ``url`` is a file rather than a folder or nothing (``False`` over HTTP, which cannot tell).

        Args:
            url: The URL, absolute or relative to this reader's ``url``.

        Returns:
            ``True`` for a file.
        """
        return self._lookup(url, self.transport.is_file)

    def open(
        self, url: str, *, block_size: int = _DEFAULT_BLOCK_SIZE, compression: str | None = None
    ) -> io.BufferedIOBase:
        """A buffered, seekable stream over the object, reading ``block_size`` bytes per request with retries.

        Only the blocks actually read are fetched: nothing is copied to local disk or held in memory beyond
        one block.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            block_size: Bytes per range request.
            compression: ``"gzip"`` to decompress on the fly, ``"infer"`` to do so for a ``.gz`` suffix or
                the gzip magic bytes, or ``None`` for the raw bytes.

        Returns:
            A binary file object; close it when done.
        """
        return buffered_stream(
            self, self.resolve(url), block_size=block_size, compression=compression, owns_reader=False
        )

    # ------------------------------------------------------------------ the retry loop

    def _read(
        self,
        url: str,
        start: int,
        end: int | None,
        *,
        missing: type[FileNotFoundError],
        short_ok: bool = False,
        max_bytes: int | None = None,
        deadline: Deadline | None = None,
        sink: ByteSink | None = None,
    ) -> Any:
        started = time.perf_counter()
        try:
            self._check_inside_root(url)
            return self._read_with_retries(
                url, start, end, missing=missing, short_ok=short_ok, max_bytes=max_bytes, deadline=deadline, sink=sink
            )
        finally:
            self.stats.record(seconds=time.perf_counter() - started)

    def _check_inside_root(self, url: str) -> None:
        """Refuse a local path under the reader's root that resolves, through symlinks, outside it."""
        fs = self.fs
        if not isinstance(fs, LocalFileSystem):
            return
        root, path = str(fs._strip_protocol(self.url)), str(fs._strip_protocol(url))
        if not path.startswith(root.rstrip("/") + "/"):
            return  # the root itself, or a path the caller chose outside it: nothing a manifest named
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise UnsafePathError(
                f"{path!r} resolves to {real!r}, outside the dataset root {real_root!r} (through a symlink). "
                "Reads under a dataset root never leave it: copy the file into the dataset instead of linking it, "
                "or rewrite the dataset."
            )

    def _read_with_retries(
        self,
        url: str,
        start: int,
        end: int | None,
        *,
        missing: type[FileNotFoundError],
        short_ok: bool,
        max_bytes: int | None = None,
        deadline: Deadline | None = None,
        sink: ByteSink | None = None,
    ) -> Any:
        """Bytes ``[start, end)`` of ``url``, asking the transport again after each fault or short answer.

        Every byte a public read returns passes through this loop, so it is where the cap on the bytes
        accepted (``end``, or ``max_bytes`` for an object of unknown size) and the deadline are enforced.
        The bytes go to ``sink`` (returned) when given, else to a new ``bytearray``.
        """
        transport = self.transport
        path = transport.path(url)
        if end is None and not transport.reads_to_end:
            end = self._lookup_with_retries(url, transport.size, missing=missing, deadline=deadline)
        if max_bytes is not None:
            if end is None:
                # One byte over the cap tells an object that is too large, without reading the rest of it.
                end, short_ok = start + max_bytes + 1, True
            elif end - start > max_bytes:
                raise _too_large(url, max_bytes, f"it has {end - start} bytes")
        buf: Any = bytearray() if sink is None else sink
        failures = 0
        while end is None or start + len(buf) < end:
            if deadline is not None and deadline.expired():
                raise deadline.error(url, received=len(buf))
            before = len(buf)
            self.stats.record(requests=1)
            error: BaseException | None = None
            ended = False
            try:
                ended = transport.read_into(path, start + len(buf), end, buf, deadline=deadline)
            except FileNotFoundError as exc:
                raise missing(errno.ENOENT, _NOT_FOUND, redact_url(url)) from exc
            except DeadlineExceededError:
                self.stats.record(bytes_read=len(buf) - before)
                raise
            except Exception as exc:
                error = exc
            got = len(buf) - before
            self.stats.record(bytes_read=got)
            if error is None:
                if end is None or start + len(buf) >= end:
                    break
                if not ended:
                    continue  # the transport stopped after a chunk: ask for the rest
                if short_ok:
                    break
                error = EOFError(f"body ended at byte {start + len(buf)}, before the expected end {end}")
            if got > 0:
                failures = 0  # progress was made: only consecutive fruitless attempts count
            failures += 1
            self._after_failure(url, error, failures, offset=start + len(buf), deadline=deadline)
        if max_bytes is not None and len(buf) > max_bytes:
            raise _too_large(url, max_bytes, f"more than {max_bytes} bytes arrived")
        return buf

    def _lookup(self, url: str, lookup: Callable[[str], _T]) -> _T:
        started = time.perf_counter()
        try:
            return self._lookup_with_retries(self.resolve(url), lookup, missing=FileNotFoundError)
        finally:
            self.stats.record(seconds=time.perf_counter() - started)

    def _lookup_with_retries(
        self,
        url: str,
        lookup: Callable[[str], _T],
        *,
        missing: type[FileNotFoundError],
        deadline: Deadline | None = None,
    ) -> _T:
        """``lookup(path)`` for ``url`` (a size or existence check: one request each time), with retries."""
        path = self.transport.path(url)
        failures = 0
        while True:
            if deadline is not None and deadline.expired():
                raise deadline.error(url)
            self.stats.record(requests=1)
            try:
                return lookup(path)
            except FileNotFoundError as exc:
                raise missing(errno.ENOENT, _NOT_FOUND, redact_url(url)) from exc
            except Exception as exc:
                failures += 1
                self._after_failure(url, exc, failures, offset=None, deadline=deadline)

    def _after_failure(
        self, url: str, exc: BaseException, failures: int, *, offset: int | None, deadline: Deadline | None = None
    ) -> None:
        """Raise if ``exc`` is permanent or its retries are used up; otherwise log, count and back off."""
        if failures >= self.retry.attempts_for(exc):
            if not is_transient_error(exc) and refused_address(exc) is None:
                raise exc  # permanent: the caller sees the backend's own error
            raise give_up_error(url, exc, failures, self.retry, offset=offset) from exc
        delay = self.retry.backoff(failures, self._rng)
        log.info(
            "Transient error reading %s%s (attempt %s of %s): %s; retrying in %.3fs",
            redact_url(url),
            "" if offset is None else f" at byte {offset}",
            failures,
            self.retry.attempts_for(exc),
            describe_error(exc),
            delay,
        )
        self.stats.record(retries=1)
        if deadline is None:
            time.sleep(delay)
        else:
            deadline.sleep(delay)  # the caller's loop raises at once if the deadline passed meanwhile


class _WindowSink:
    """A :class:`~.transports.base.ByteSink` that fills a fixed, writable window in order, and refuses to overflow."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def __iadd__(self, data: bytes | bytearray | memoryview) -> _WindowSink:
        size = len(data)
        if self._filled + size > len(self._view):
            raise ValueError(f"{self._filled + size} bytes arrived for a window of {len(self._view)}")
        self._view[self._filled : self._filled + size] = data
        self._filled += size
        return self

    def tail(self) -> memoryview:
        """The part of the window not filled yet, for a transport that reads into memory (``readinto``)."""
        return self._view[self._filled :]

    def advance(self, size: int) -> None:
        """``size`` more bytes were written into :meth:`tail`."""
        if self._filled + size > len(self._view):
            raise ValueError(f"{self._filled + size} bytes arrived for a window of {len(self._view)}")
        self._filled += size


def _too_large(url: str, max_bytes: int, found: str) -> ObjectTooLargeError:
    return ObjectTooLargeError(
        f"{redact_url(url)} is larger than the {max_bytes} bytes this read accepts ({found}); nothing more was "
        "read. Check that the URL points at what you meant, or allow a larger object where the caller takes a "
        "limit (e.g. `max_manifest_bytes`)."
    )


def _rebuild_reader(
    url: str,
    storage_options: dict[str, Any],
    retry: RetryPolicy,
    stats: FetchStats,
    chunk_size: int,
    seed: int | None,
) -> RemoteReader:
    return RemoteReader(url, storage_options, retry=retry, stats=stats, chunk_size=chunk_size, seed=seed)


def open_url(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    retry: RetryPolicy | None = None,
    stats: FetchStats | None = None,
    block_size: int = _DEFAULT_BLOCK_SIZE,
    compression: str | None = "infer",
) -> io.BufferedIOBase:
    """Open ``url`` for sequential (and seekable) reading through a reader of its own.

    Args:
        url: Any fsspec URL.
        storage_options: Passed unchanged to fsspec.
        retry: Retry policy for every block read.
        stats: Counters to add to.
        block_size: Bytes per range request.
        compression: ``"infer"`` (gzip for a ``.gz`` suffix or gzip magic bytes), ``"gzip"``, or ``None``.

    Returns:
        A binary file object; closing it also releases the reader's connections.
    """
    reader = RemoteReader(url, storage_options, retry=retry, stats=stats)
    try:
        return buffered_stream(reader, url, block_size=block_size, compression=compression, owns_reader=True)
    except BaseException:
        reader.close()
        raise
