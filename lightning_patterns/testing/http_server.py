"""A local HTTP file server that injects faults, for testing remote reads against a real protocol.

:func:`serve_directory` serves a directory on ``127.0.0.1`` (a free port) from a daemon thread, with ``GET``
(including single ``Range`` requests, answered ``206`` with ``Content-Range``) and ``HEAD`` (with
``Content-Length``), as fsspec's ``HTTPFileSystem`` needs. Requests fail at random with probability
``failure_rate``, or deterministically with :meth:`FaultInjectingHTTPServer.inject`. Every request is logged,
so tests can count requests and bytes served.

Faults:

- ``"reset"``: close the connection with a TCP reset, without a response.
- ``"500"``, ``"503"``: answer with that status.
- ``"truncate"``: send the full headers but only half of the body, then close the connection.
- ``"stall"``: wait ``stall_seconds`` before answering normally (a client with a shorter timeout gives up).

Example:
    >>> import pathlib, tempfile, urllib.request
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "a.bin").write_bytes(b"0123456789")
    >>> with serve_directory(root) as server:
    ...     with urllib.request.urlopen(server.url_for("a.bin")) as response:
    ...         body = response.read()
    >>> body, server.bytes_sent
    (b'0123456789', 10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["FAULTS", "FaultInjectingHTTPServer", "RequestRecord", "serve_directory"]

FAULTS: tuple[str, ...] = ("reset", "500", "503", "truncate", "stall")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_COPY_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request the server answered (or refused to answer).

    Args:
        method: ``"GET"`` or ``"HEAD"``.
        path: The URL path, e.g. ``"/shards/000.bin"``.
        range: The ``Range`` header as ``(start, end)`` with ``end`` exclusive, or ``None`` without one.
        status: The status sent, or ``0`` when the connection was reset without a response.
        bytes_sent: Body bytes written to the socket.
        fault: The injected fault, or ``None``.
    """

    method: str
    path: str
    range: tuple[int, int] | None
    status: int
    bytes_sent: int
    fault: str | None = None


class FaultInjectingHTTPServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server for the files under ``root`` that injects faults and logs every request.

    Prefer :func:`serve_directory`, which starts and stops it.

    Args:
        root: Directory to serve; paths escaping it are refused with 403.
        failure_rate: Probability in ``[0, 1]`` that a request meets a random fault from ``faults``.
        faults: The faults to draw from (see the module docstring).
        stall_seconds: How long a ``"stall"`` waits before answering.
        seed: Seeds the fault draws, so a run with the same request order meets the same faults.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        root: str | Path,
        *,
        failure_rate: float = 0.0,
        faults: Sequence[str] = FAULTS,
        stall_seconds: float = 0.2,
        seed: int = 0,
    ) -> None:
        root = Path(root).resolve()
        if not root.is_dir():
            raise ValueError(f"FaultInjectingHTTPServer(root={str(root)!r}) must be an existing directory.")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"FaultInjectingHTTPServer(failure_rate={failure_rate!r}) must be in [0, 1].")
        _check_faults(faults)
        if failure_rate > 0 and not faults:
            raise ValueError(f"FaultInjectingHTTPServer(failure_rate={failure_rate!r}) needs at least one fault.")
        if stall_seconds < 0:
            raise ValueError(f"FaultInjectingHTTPServer(stall_seconds={stall_seconds!r}) must be >= 0.")
        self.root = root
        self.failure_rate = failure_rate
        self.faults = tuple(faults)
        self.stall_seconds = stall_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._log: list[RequestRecord] = []
        self._scheduled: defaultdict[str, deque[str]] = defaultdict(deque)
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", 0), _FaultInjectingHandler)

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, relpath: str) -> str:
        """The URL of a file given by its path relative to ``root``.

        Args:
            relpath: e.g. ``"shards/000.bin"``.

        Returns:
            The full URL.
        """
        return f"{self.url}/{urllib.parse.quote(relpath.lstrip('/'))}"

    # ------------------------------------------------------------------ faults

    def inject(self, path: str, *faults: str) -> None:
        """Make the next requests for ``path`` meet ``faults``, one fault per request, in order.

        Args:
            path: The URL path (``"/a.bin"``) or path relative to ``root`` (``"a.bin"``).
            *faults: Faults from the module docstring, e.g. ``inject("a.bin", "truncate", "500")``.
        """
        _check_faults(faults)
        with self._lock:
            self._scheduled["/" + path.lstrip("/")].extend(faults)

    def _choose_fault(self, path: str) -> str | None:
        with self._lock:
            scheduled = self._scheduled.get(path)
            if scheduled:
                return scheduled.popleft()
            if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
                return self._rng.choice(self.faults)
            return None

    # ------------------------------------------------------------------ request log

    def _record(self, record: RequestRecord) -> int:
        with self._lock:
            self._log.append(record)
            return len(self._log) - 1

    def _amend(self, index: int, old: RequestRecord, new: RequestRecord) -> None:
        with self._lock:
            if index < len(self._log) and self._log[index] is old:  # reset_log() may have run meanwhile
                self._log[index] = new

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def requests_for(self, path: str) -> list[RequestRecord]:
        """The logged requests for one path (URL path or path relative to ``root``).

        Args:
            path: e.g. ``"a.bin"`` or ``"/a.bin"``.

        Returns:
            The matching records, oldest first.
        """
        path = "/" + path.lstrip("/")
        return [r for r in self.requests if r.path == path]

    @property
    def request_count(self) -> int:
        """How many requests were logged."""
        with self._lock:
            return len(self._log)

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent over all logged requests."""
        with self._lock:
            return sum(r.bytes_sent for r in self._log)

    @property
    def fault_count(self) -> int:
        """How many logged requests met a fault."""
        with self._lock:
            return sum(r.fault is not None for r in self._log)

    def reset_log(self) -> None:
        """Forget the logged requests (not the scheduled faults)."""
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultInjectingHTTPServer:
        """Serve from a daemon thread; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("FaultInjectingHTTPServer.start() was already called; use a new server.")
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=f"http-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the listening socket.

        Args:
            timeout: Seconds to wait for the serving thread.
        """
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self.server_close()

    def __enter__(self) -> FaultInjectingHTTPServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet: clients that give up (timeouts, resets) make writes fail, and that is expected."""


def _check_faults(faults: Sequence[str]) -> None:
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or isinstance(faults, str):
        raise ValueError(f"faults={faults!r} has unknown entries {unknown!r}; choose from {FAULTS!r}.")


class _FaultInjectingHandler(http.server.BaseHTTPRequestHandler):
    server: FaultInjectingHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection frees its thread eventually
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet."""

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        method = "HEAD" if head else "GET"
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        fault = self.server._choose_fault(path)
        requested = self.headers.get("Range")

        def record(status: int) -> None:
            self.server._record(RequestRecord(method, path, None, status, 0, fault))

        if fault == "stall":
            time.sleep(self.server.stall_seconds)
        elif fault == "reset":
            record(0)
            self._reset()
            return
        elif fault in ("500", "503"):
            record(int(fault))
            self._send_empty(int(fault))
            return

        target = (self.server.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.server.root):
            record(403)
            self._send_empty(403)
            return
        if not target.is_file():
            record(404)
            self._send_empty(404)
            return

        size = target.stat().st_size
        byte_range = _parse_range(requested, size) if requested else None
        if byte_range == (-1, -1):
            record(416)
            self._send_empty(416, {"Content-Range": f"bytes */{size}"})
            return
        start, end = byte_range if byte_range is not None else (0, size)
        status = 206 if byte_range is not None else 200
        limit = 0 if head else end - start
        if fault == "truncate" and not head:
            # A graceful close after half the body: the client keeps what arrived and sees a short body.
            limit //= 2
            self.close_connection = True
        # Log before the first byte leaves, so a client that has its answer always finds it in the log.
        planned = RequestRecord(method, path, byte_range, status, limit, fault)
        index = self.server._record(planned)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if byte_range is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        sent = 0
        try:
            self.end_headers()
            with target.open("rb") as f:
                f.seek(start)
                while sent < limit:
                    chunk = f.read(min(_COPY_CHUNK, limit - sent))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
            self.wfile.flush()
        except OSError:
            # The client went away (e.g. it timed out during a stall); nothing left to answer.
            self.close_connection = True
        if sent != limit:
            self.server._amend(index, planned, dataclasses.replace(planned, bytes_sent=sent))

    def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            self.close_connection = True

    def _reset(self) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0), as a crashing server or proxy would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` for a single-range header, ``None`` to ignore it, ``(-1, -1)`` if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # malformed or multi-range: RFC 9110 lets us answer with the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        return (-1, -1) if length == 0 else (max(size - length, 0), size)
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or end <= start:
        return (-1, -1)
    return start, end


@contextlib.contextmanager
def serve_directory(
    root: str | Path,
    *,
    failure_rate: float = 0.0,
    faults: Sequence[str] = FAULTS,
    stall_seconds: float = 0.2,
    seed: int = 0,
) -> Iterator[FaultInjectingHTTPServer]:
    """Serve ``root`` on ``127.0.0.1`` for the duration of the ``with`` block.

    Args:
        root: Directory to serve.
        failure_rate: Probability in ``[0, 1]`` that a request meets a random fault.
        faults: The faults to draw from.
        stall_seconds: How long a ``"stall"`` waits before answering.
        seed: Seeds the fault draws.

    Yields:
        The running server; use ``server.url_for("a.bin")`` for URLs and ``server.requests`` for the log.
    """
    server = FaultInjectingHTTPServer(
        root, failure_rate=failure_rate, faults=faults, stall_seconds=stall_seconds, seed=seed
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
