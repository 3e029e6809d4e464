"""Resilient reads from fsspec remotes: retries with backoff and jitter, resume from offset, checksums, metrics.

A :class:`RemoteReader` reads whole objects (:meth:`RemoteReader.fetch`) or byte ranges
(:meth:`RemoteReader.read_range`), or opens a sequential, seekable stream over range reads
(:meth:`RemoteReader.open`). Transient faults (connection resets, HTTP 5xx and 429, timeouts, truncated
bodies) are retried with exponential backoff and jitter, and every retry resumes at the byte offset
already reached instead of starting over. A missing object is never retried.

Over HTTP(S) the body is streamed, so the bytes of a response cut short are kept and the next request asks
for ``Range: bytes=<reached>-``; other backends are read in ``chunk_size`` range requests
(``fs.cat_file(path, start, end)``), and a retry repeats only the chunk that failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gzip
import hashlib
import io
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import fsspec
import fsspec.asyn
import fsspec.core

from lightning_patterns.exceptions import ChecksumMismatchError, ShardNotFoundError

__all__ = ["FetchStats", "FetchStatsSnapshot", "RemoteReader", "RetryPolicy", "is_transient_error", "open_url"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STREAM_CHUNK = 256 * 1024
_DEFAULT_CHUNK_SIZE = 8 * 2**20
_DEFAULT_BLOCK_SIZE = 2**20
_GZIP_MAGIC = b"\x1f\x8b"
# OSErrors that describe the request, not the network: asking again cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_NOT_FOUND = "Remote object not found (missing file or HTTP 404); check the URL and that the data was fully written"
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient remote faults.

    The delay before retry ``k`` (1-based) is ``min(max_backoff, initial_backoff * 2 ** (k - 1))``, reduced by a
    random fraction of at most ``jitter`` so that many workers do not retry in lockstep. A failure after which
    new bytes arrived resets the count, so a long transfer over a flaky link still finishes, while a remote
    that never makes progress fails after ``max_attempts`` attempts.

    Args:
        max_attempts: Attempts per request without progress, the first included; ``1`` disables retries.
        initial_backoff: Seconds to wait before the first retry.
        max_backoff: Upper bound on the wait between two attempts, in seconds.
        jitter: Fraction in ``[0, 1]`` of each wait that is randomized; ``0`` waits exactly the backoff.
        timeout: Seconds without progress after which a request counts as failed (connect or read inactivity
            over HTTP, a whole range request on other asynchronous backends); ``None`` waits forever.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: float = 0.5
    timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy(max_attempts={self.max_attempts!r}) must be an integer >= 1; "
                "use max_attempts=1 to disable retries."
            )
        if not self.initial_backoff >= 0:
            raise ValueError(f"RetryPolicy(initial_backoff={self.initial_backoff!r}) must be >= 0 seconds.")
        if not self.max_backoff >= self.initial_backoff:
            raise ValueError(
                f"RetryPolicy(max_backoff={self.max_backoff!r}) must be >= initial_backoff={self.initial_backoff!r}; "
                "raise max_backoff or lower initial_backoff."
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"RetryPolicy(jitter={self.jitter!r}) must be in [0, 1], e.g. jitter=0.5.")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(
                f"RetryPolicy(timeout={self.timeout!r}) must be > 0 seconds, or None to wait without a limit."
            )

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based).

        Args:
            retry: Which retry this is; the first retry is ``1``.
            rng: Source of jitter; the module-level ``random`` when ``None``.

        Returns:
            The delay, in ``[(1 - jitter) * base, base]`` with ``base`` the capped exponential backoff.
        """
        base = min(self.max_backoff, self.initial_backoff * 2.0 ** max(retry - 1, 0))
        draw = (rng or random).random()
        return base * (1.0 - self.jitter * draw)


@dataclasses.dataclass(frozen=True)
class FetchStatsSnapshot:
    """Counters of a :class:`FetchStats` at one moment; subtract two snapshots to get what happened between.

    Args:
        bytes_read: Bytes received from the remote, those of failed attempts included.
        requests: Requests sent to the remote (range reads, size lookups).
        retries: Requests repeated after a transient fault, plus refetches after a checksum mismatch.
        seconds: Wall-clock seconds spent in remote reads, backoff waits included.
    """

    bytes_read: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters by name, ready for ``LightningModule.log_dict``."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def __sub__(self, other: FetchStatsSnapshot) -> FetchStatsSnapshot:
        return FetchStatsSnapshot(
            bytes_read=self.bytes_read - other.bytes_read,
            requests=self.requests - other.requests,
            retries=self.retries - other.retries,
            seconds=self.seconds - other.seconds,
        )


class FetchStats:
    """Thread-safe counters of remote reads, shared by the readers (and threads) of one process.

    Each DataLoader worker process holds its own copy; counts are not summed across processes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = FetchStatsSnapshot()

    def record(self, *, bytes_read: int = 0, requests: int = 0, retries: int = 0, seconds: float = 0.0) -> None:
        """Add to the counters.

        Args:
            bytes_read: Bytes received.
            requests: Requests sent.
            retries: Retries made.
            seconds: Seconds spent.
        """
        with self._lock:
            c = self._counts
            self._counts = FetchStatsSnapshot(
                c.bytes_read + bytes_read, c.requests + requests, c.retries + retries, c.seconds + seconds
            )

    def snapshot(self) -> FetchStatsSnapshot:
        """The counters now, as an immutable value."""
        with self._lock:
            return self._counts

    def as_dict(self) -> dict[str, float]:
        """The counters now, by name."""
        return self.snapshot().as_dict()

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._counts = FetchStatsSnapshot()

    @property
    def bytes_read(self) -> int:
        """Bytes received from the remote."""
        return self.snapshot().bytes_read

    @property
    def requests(self) -> int:
        """Requests sent to the remote."""
        return self.snapshot().requests

    @property
    def retries(self) -> int:
        """Retries after transient faults or checksum mismatches."""
        return self.snapshot().retries

    @property
    def seconds(self) -> float:
        """Seconds spent reading from the remote."""
        return self.snapshot().seconds

    def __getstate__(self) -> dict[str, Any]:
        return {"counts": self.snapshot()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self._counts = state["counts"]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"FetchStats({fields})"


def is_transient_error(exc: BaseException) -> bool:
    """Whether asking the remote again may succeed where ``exc`` failed.

    Transient: connection errors and resets, timeouts, truncated or malformed bodies, HTTP 5xx and 429, and
    any other ``OSError``. Not transient: missing objects (``FileNotFoundError``, HTTP 404), permission
    errors, other HTTP 4xx, and programming errors.

    Args:
        exc: The exception a remote read raised.

    Returns:
        ``True`` if the read should be retried.
    """
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, (*_PERMANENT_OS_ERRORS, ChecksumMismatchError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    if isinstance(exc, asyncio.TimeoutError | EOFError):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is the optional `http` extra
        return False
    return isinstance(exc, aiohttp.ClientError)


def _http_status(exc: BaseException) -> int | None:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status
    return None


def _describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` that leaves out request headers (they may carry credentials)."""
    status = _http_status(exc)
    if status is not None:
        return f"HTTP {status} {getattr(exc, 'message', '')}".rstrip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without user info or query string, which may carry credentials or signatures."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, sep, digest = checksum.partition(":")
    algorithm = algorithm.lower()
    if not sep or not digest or algorithm not in hashlib.algorithms_available:
        raise ValueError(
            f"checksum={checksum!r} is not of the form '<algorithm>:<hex digest>' with an algorithm hashlib knows; "
            "pass e.g. checksum='sha256:' + hashlib.sha256(data).hexdigest()."
        )
    return algorithm, digest.lower()


def _is_http(fs: Any) -> bool:
    try:
        from fsspec.implementations.http import HTTPFileSystem
    except ImportError:  # pragma: no cover - aiohttp missing
        return False
    return isinstance(fs, HTTPFileSystem)


async def _http_read_into(
    fs: Any, url: str, start: int, end: int | None, buf: bytearray, timeout: float | None
) -> None:
    """Stream ``url[start:end]`` into ``buf`` chunk by chunk, so the bytes of a cut-off body are kept."""
    import aiohttp

    session = await fs.set_session()
    kwargs = dict(fs.kwargs)
    headers = dict(kwargs.pop("headers", None) or {})
    # A compressed transfer encoding would make byte offsets meaningless.
    headers.setdefault("Accept-Encoding", "identity")
    if start > 0 or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    if timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 404:
            raise FileNotFoundError(errno.ENOENT, "No such remote object", url)
        response.raise_for_status()
        skip = start if start > 0 and response.status != 206 else 0  # the server ignored the Range header
        want = None if end is None else end - start
        got = 0
        async for chunk in response.content.iter_chunked(_STREAM_CHUNK):
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            if want is not None and got + len(chunk) > want:
                chunk = chunk[: want - got]
            buf += chunk
            got += len(chunk)
            if want is not None and got >= want:
                break


async def _with_timeout(awaitable: Awaitable[_T], timeout: float | None) -> _T:
    return await asyncio.wait_for(awaitable, timeout)


class RemoteReader:
    """Reads objects from one fsspec filesystem with retries, resume from offset, checksums and metrics.

    Safe to share between threads. Pickles by its constructor arguments: the filesystem is created lazily in
    each process (and again after a fork), so a reader can be sent to DataLoader workers.

    Args:
        url: A URL on the filesystem to read from (a dataset root or any object on it); it selects the fsspec
            protocol, and relative URLs passed to the methods are resolved against it.
        storage_options: Passed unchanged to ``fsspec.core.url_to_fs``; never logged.
        retry: When and how to retry transient faults; ``RetryPolicy()`` when ``None``.
        stats: Counters to add to; a new :class:`FetchStats` when ``None``.
        chunk_size: Bytes per range request on backends other than HTTP(S), which are streamed instead.
        seed: Seeds the backoff jitter, for reproducible waits; random when ``None``.

    Example:
        >>> import fsspec, hashlib
        >>> with fsspec.open("memory://doc/fetch/a.bin", "wb") as f:
        ...     _ = f.write(b"hello")
        >>> reader = RemoteReader("memory://doc/fetch")
        >>> reader.fetch("a.bin", checksum="sha256:" + hashlib.sha256(b"hello").hexdigest())
        b'hello'
        >>> reader.stats.bytes_read
        5
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
        self._fs_pid: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_reader,
            (self.url, self.storage_options, self.retry, self.stats, self.chunk_size, self.seed),
        )

    def __repr__(self) -> str:
        return f"RemoteReader(url={_redact(self.url)!r}, retry={self.retry!r})"

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, created on first use in this process."""
        with self._lock:
            if self._fs is None or self._fs_pid != os.getpid():
                # Our own instance, not fsspec's shared one, so that close() can release its connections.
                options = {"skip_instance_cache": True, **self.storage_options}
                self._fs, _ = fsspec.core.url_to_fs(self.url, **options)
                self._fs_pid = os.getpid()
            return self._fs

    def close(self) -> None:
        """Release the filesystem and its connections; a later read creates them again."""
        with self._lock:
            fs, self._fs = self._fs, None
            same_process = self._fs_pid == os.getpid()
        session = getattr(fs, "_session", None)
        if same_process and session is not None and _is_http(fs):
            fs.close_session(fs.loop, session)
            fs._session = None

    def resolve(self, url: str) -> str:
        """An absolute URL for ``url``, which may be relative to this reader's ``url``.

        Args:
            url: An absolute URL (``proto://...``) or a path relative to the reader's root.

        Returns:
            The absolute URL.
        """
        if "://" in url or url.startswith("/"):
            return url
        return self.url.rstrip("/") + "/" + url

    # ------------------------------------------------------------------ public reads

    def fetch(self, url: str, *, size: int | None = None, checksum: str | None = None) -> bytes:
        """Read a whole object as ``bytes``; see :meth:`fetch_buffer`, which avoids the copy.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            size: The object's size in bytes if known.
            checksum: ``"<algorithm>:<hex digest>"`` to verify the bytes against.

        Returns:
            The object's bytes.
        """
        return bytes(self.fetch_buffer(url, size=size, checksum=checksum))

    def fetch_buffer(self, url: str, *, size: int | None = None, checksum: str | None = None) -> memoryview:
        """Read a whole object, retrying transient faults and resuming from the offset reached.

        The bytes are returned as a read-only view of the buffer they were received into: no second copy
        of a large shard is ever made.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            size: The object's size in bytes if known (saves a size lookup; a shorter body counts as truncated).
            checksum: ``"<algorithm>:<hex digest>"``, e.g. ``"sha256:9f86..."``, to verify the bytes against.
                On a mismatch the object is fetched once more before giving up.

        Returns:
            A read-only view of the object's bytes.

        Raises:
            ShardNotFoundError: The object does not exist (never retried).
            ChecksumMismatchError: The bytes did not match ``checksum`` on two fetches in a row.
            OSError: A transient fault persisted for ``retry.max_attempts`` attempts without progress. Errors
                that asking again cannot fix (e.g. HTTP 403) propagate unchanged at once.
        """
        url = self.resolve(url)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"fetch(size={size!r}) must be a non-negative number of bytes or None.")
        expected = _parse_checksum(checksum) if checksum is not None else None
        data = self._read(url, 0, size, missing=ShardNotFoundError)
        if expected is None:
            return memoryview(data).toreadonly()
        algorithm, digest = expected
        actual = hashlib.new(algorithm, data).hexdigest()
        if actual == digest:
            return memoryview(data).toreadonly()
        log.warning(
            "Checksum mismatch for %s (expected %s:%s, got %s:%s); fetching it once more",
            _redact(url),
            algorithm,
            digest,
            algorithm,
            actual,
        )
        self.stats.record(retries=1)
        data = self._read(url, 0, size, missing=ShardNotFoundError)
        actual = hashlib.new(algorithm, data).hexdigest()
        if actual != digest:
            raise ChecksumMismatchError(
                f"Checksum mismatch for {_redact(url)}: expected {algorithm}:{digest} got {algorithm}:{actual} "
                f"({len(data)} bytes) on two fetches in a row. The remote object is corrupt or the manifest is "
                "stale: write the shard again, or regenerate the manifest from the data you trust."
            )
        return memoryview(data).toreadonly()

    def read_range(self, url: str, start: int = 0, end: int | None = None) -> bytes:
        """Read bytes ``[start, end)`` of an object with retries; ``end=None`` reads to its end.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.
            start: First byte to read.
            end: One past the last byte to read; the result is exactly ``end - start`` bytes long.

        Returns:
            The bytes read.

        Raises:
            FileNotFoundError: The object does not exist.
            OSError: A transient fault persisted, or the object ends before ``end``.
        """
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"read_range(start={start!r}, end={end!r}) needs 0 <= start <= end.")
        return bytes(self._read(self.resolve(url), start, end, missing=FileNotFoundError))

    def size(self, url: str) -> int | None:
        """The object's size in bytes (``None`` if the backend cannot tell), looked up with retries.

        Args:
            url: The object's URL, absolute or relative to this reader's ``url``.

        Returns:
            The size, or ``None``.
        """
        started = time.perf_counter()
        try:
            return self._size(self.resolve(url), missing=FileNotFoundError)
        finally:
            self.stats.record(seconds=time.perf_counter() - started)

    def _size(self, url: str, *, missing: type[FileNotFoundError]) -> int | None:
        fs = self.fs
        path = url if _is_http(fs) else fs._strip_protocol(url)

        def lookup() -> int | None:
            self.stats.record(requests=1)
            value = fs.size(path)
            return None if value is None else int(value)

        return self._call_with_retries(url, lookup, missing=missing)

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
        return self._open(url, block_size=block_size, compression=compression, owns_reader=False)

    def _open(self, url: str, *, block_size: int, compression: str | None, owns_reader: bool) -> io.BufferedIOBase:
        if compression not in (None, "gzip", "infer"):
            raise ValueError(f"open(compression={compression!r}) must be None, 'gzip' or 'infer'.")
        if block_size < 1:
            raise ValueError(f"open(block_size={block_size!r}) must be a positive number of bytes.")
        url = self.resolve(url)
        raw = _RangeStream(self, url, self.size(url), owns_reader=owns_reader)
        buffered = io.BufferedReader(raw, buffer_size=block_size)
        if compression == "infer":
            gzipped = url.split("?", 1)[0].endswith(".gz") or buffered.peek(2)[:2] == _GZIP_MAGIC
            compression = "gzip" if gzipped else None
        if compression is None:
            return buffered
        decompressed = gzip.GzipFile(fileobj=buffered, mode="rb")
        # GzipFile closes `myfileobj` (else only files it opened itself): closing it closes the stream too.
        decompressed.myfileobj = buffered  # type: ignore[assignment]
        return decompressed

    # ------------------------------------------------------------------ retry machinery

    def _read(
        self, url: str, start: int, end: int | None, *, missing: type[FileNotFoundError], upto: bool = False
    ) -> bytearray:
        started = time.perf_counter()
        try:
            return self._read_with_retries(url, start, end, missing=missing, upto=upto)
        finally:
            self.stats.record(seconds=time.perf_counter() - started)

    def _read_with_retries(
        self, url: str, start: int, end: int | None, *, missing: type[FileNotFoundError], upto: bool = False
    ) -> bytearray:
        # upto=True: ``end`` is a most, not a promise (the object's size is unknown), so a body that ends early is the
        # object's end rather than a truncation to retry.
        fs = self.fs
        http = _is_http(fs)
        path = url if http else fs._strip_protocol(url)
        if end is None and not http:
            end = self._size(url, missing=missing)
        buf = bytearray()
        failures = 0
        while end is None or start + len(buf) < end:
            offset = start + len(buf)
            before = len(buf)
            self.stats.record(requests=1)
            error: BaseException | None = None
            try:
                if http:
                    fsspec.asyn.sync(fs.loop, _http_read_into, fs, path, offset, end, buf, self.retry.timeout)
                else:
                    self._generic_read_into(fs, path, offset, end, buf)
            except Exception as exc:
                if isinstance(exc, FileNotFoundError):
                    raise missing(errno.ENOENT, _NOT_FOUND, _redact(url)) from exc
                error = exc
            got = len(buf) - before
            self.stats.record(bytes_read=got)
            if error is None:
                if end is None or start + len(buf) >= end:
                    break
                if got > 0 and not http:
                    continue  # a backend may return less than asked; ask for the rest
                if upto:
                    break
                error = EOFError(f"body ended at byte {start + len(buf)}, before the expected end {end}")
            if got > 0:
                failures = 0  # progress was made: only consecutive fruitless attempts count
            failures += 1
            self._after_failure(url, error, failures, offset=start + len(buf))
        return buf

    def _generic_read_into(self, fs: Any, path: str, offset: int, end: int | None, buf: bytearray) -> None:
        stop = end if end is None else min(end, offset + self.chunk_size)
        if isinstance(fs, fsspec.asyn.AsyncFileSystem) and not fs.asynchronous:
            data = fsspec.asyn.sync(
                fs.loop, _with_timeout, fs._cat_file(path, start=offset, end=stop), self.retry.timeout
            )
        else:
            data = fs.cat_file(path, start=offset, end=stop)
        buf += data

    def _call_with_retries(self, url: str, func: Callable[[], _T], *, missing: type[FileNotFoundError]) -> _T:
        failures = 0
        while True:
            try:
                return func()
            except FileNotFoundError as exc:
                raise missing(errno.ENOENT, _NOT_FOUND, _redact(url)) from exc
            except Exception as exc:
                failures += 1
                self._after_failure(url, exc, failures, offset=None)

    def _after_failure(self, url: str, exc: BaseException, failures: int, *, offset: int | None) -> None:
        """Re-raise ``exc`` if it is permanent or retries are used up; otherwise log, count and back off."""
        if not is_transient_error(exc):
            raise exc
        where = "" if offset is None else f" at byte {offset}"
        if failures >= self.retry.max_attempts:
            raise OSError(
                f"Reading {_redact(url)}{where} failed {failures} times in a row; last error: {_describe(exc)}. "
                "Check that the remote is reachable, or allow more attempts with "
                f"RetryPolicy(max_attempts={self.retry.max_attempts * 2})."
            ) from exc
        delay = self.retry.backoff(failures, self._rng)
        log.info(
            "Transient error reading %s%s (attempt %s of %s): %s; retrying in %.3fs",
            _redact(url),
            where,
            failures,
            self.retry.max_attempts,
            _describe(exc),
            delay,
        )
        self.stats.record(retries=1)
        time.sleep(delay)


def _rebuild_reader(
    url: str,
    storage_options: dict[str, Any],
    retry: RetryPolicy,
    stats: FetchStats,
    chunk_size: int,
    seed: int | None,
) -> RemoteReader:
    return RemoteReader(url, storage_options, retry=retry, stats=stats, chunk_size=chunk_size, seed=seed)


class _RangeStream(io.RawIOBase):
    """A raw, seekable stream whose reads are retried range requests through a :class:`RemoteReader`."""

    def __init__(self, reader: RemoteReader, url: str, size: int | None, *, owns_reader: bool) -> None:
        super().__init__()
        self._reader = reader
        self._owns_reader = owns_reader
        self._url = url
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._size is not None

    def close(self) -> None:
        if not self.closed and self._owns_reader:
            self._reader.close()
        super().close()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END and self._size is not None:
            pos = self._size + offset
        else:
            raise io.UnsupportedOperation(f"cannot seek with whence={whence!r} on {_redact(self._url)}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if len(view) == 0:
            return 0
        if self._size is not None:
            end = min(self._size, self._pos + len(view))
            if end <= self._pos:
                return 0
            data = self._reader.read_range(self._url, self._pos, end)
        else:
            data = self._tail(len(view))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _tail(self, n: int) -> bytes:
        # Size unknown: a short answer is the end of the object, not a truncation.
        url = self._reader.resolve(self._url)
        return bytes(self._reader._read(url, self._pos, self._pos + n, missing=FileNotFoundError, upto=True))


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
        return reader._open(url, block_size=block_size, compression=compression, owns_reader=True)
    except BaseException:
        reader.close()
        raise
