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
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from lightning_patterns.testing._faults import FAULTS, _FaultHandler, _FaultInjectingServer

__all__ = ["FAULTS", "FaultInjectingHTTPServer", "RequestRecord", "serve_directory"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


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


class FaultInjectingHTTPServer(_FaultInjectingServer[RequestRecord]):
    """A threading HTTP server for the files under ``root`` that injects faults and logs every request.

    Prefer :func:`serve_directory`, which starts and stops it.

    Args:
        root: Directory to serve; paths escaping it are refused with 403.
        failure_rate: Probability in ``[0, 1]`` that a request meets a random fault from ``faults``.
        faults: The faults to draw from (see the module docstring).
        stall_seconds: How long a ``"stall"`` waits before answering.
        seed: Seeds the fault draws, so a run with the same request order meets the same faults.
    """

    _thread_prefix = "http-server"

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
        self.root = root
        super().__init__(
            _FaultInjectingHandler, failure_rate=failure_rate, faults=faults, stall_seconds=stall_seconds, seed=seed
        )

    def url_for(self, relpath: str) -> str:
        """The URL of a file given by its path relative to ``root``.

        Args:
            relpath: e.g. ``"shards/000.bin"``.

        Returns:
            The full URL.
        """
        return f"{self.url}/{urllib.parse.quote(relpath.lstrip('/'))}"

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent over all logged requests."""
        with self._lock:
            return sum(r.bytes_sent for r in self._log)


class _FaultInjectingHandler(_FaultHandler):
    server: FaultInjectingHTTPServer

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

        if self._act_out_fault(fault, record, self._send_empty):
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
        sent = self._send_body(_open_at(target, start), limit)
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


@contextlib.contextmanager
def _open_at(path: Path, start: int) -> Iterator[BinaryIO]:
    """Open ``path`` for reading from byte ``start``, lazily: on entering, inside the caller's error guard."""
    with path.open("rb") as f:
        f.seek(start)
        yield f


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
    with FaultInjectingHTTPServer(
        root, failure_rate=failure_rate, faults=faults, stall_seconds=stall_seconds, seed=seed
    ) as server:
        yield server
