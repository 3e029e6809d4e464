"""A static HTTP file server on 127.0.0.1, served from a thread: what the demo streams its shards from.

:class:`FileServer` answers ``GET`` (with single ``Range`` requests, ``206`` with ``Content-Range``) and ``HEAD``
(with ``Content-Length``), which is all fsspec's ``HTTPFileSystem`` needs, and refuses paths that escape its
folder. :class:`LocalServer` (bind to a free port of 127.0.0.1, serve from a daemon thread, stop) and
:class:`FileRequestHandler` (whose hooks see every answer) are the parts the fault-injecting test servers of
:mod:`lightning_patterns.testing` are built from.

Example:
    >>> import pathlib, tempfile, urllib.request
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "a.bin").write_bytes(b"0123456789")
    >>> with FileServer(root) as server:
    ...     request = urllib.request.Request(server.url_for("a.bin"), headers={"Range": "bytes=2-4"})
    ...     with urllib.request.urlopen(request) as response:
    ...         response.status, response.read()
    (206, b'234')
"""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

__all__ = ["FileRequestHandler", "FileServer", "LocalServer", "QuietRequestHandler", "parse_range"]

_COPY_CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_ServerT = TypeVar("_ServerT", bound="LocalServer")


class _Readable(Protocol):
    """A body source: a file, an upstream ``http.client.HTTPResponse`` or a ``BytesIO``."""

    def read(self, size: int, /) -> bytes: ...


class LocalServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server on a free port of ``127.0.0.1``, served from a daemon thread; a context manager.

    Args:
        handler: the request handler class.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # Names the serving thread, ``<prefix>-<port>``, so a leaked one is easy to attribute.
    _thread_prefix = "local-server"
    _noun = "server"  # what the "already started" error tells the caller to make anew

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, relpath: str) -> str:
        """The URL of a path on this server, e.g. ``url_for("shards/000.bin")``."""
        return f"{self.url}/{urllib.parse.quote(relpath.lstrip('/'))}"

    def start(self: _ServerT) -> _ServerT:
        """Serve from a daemon thread; returns ``self``.

        Raises:
            RuntimeError: If the server was started before (a stopped server has closed its socket).
        """
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() was already called; use a new {self._noun}.")
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self._thread_prefix}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the listening socket.

        Args:
            timeout: Seconds to wait for the serving thread; after that it is left to die with the process.
        """
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self.server_close()

    def __enter__(self: _ServerT) -> _ServerT:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet: clients that give up (timeouts, resets) make writes fail, and that is expected."""


class QuietRequestHandler(http.server.BaseHTTPRequestHandler):
    """Request handler base: quiet, keep-alive, with the empty answers and body streaming every server needs."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection frees its thread eventually
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet (the default logs request lines, whose query strings may carry signatures)."""

    def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            self.close_connection = True

    def _send_body(self, source: AbstractContextManager[_Readable], limit: int) -> int:
        """End the buffered headers, then copy up to ``limit`` body bytes from ``source`` to the client.

        ``source`` is entered only after the headers are out, inside the same guard, so a body that cannot be
        opened or read ends the connection after the headers, just like a client that goes away.

        Args:
            source: Opens the body; ``limit`` below its length cuts the answer short.
            limit: The most body bytes to write.

        Returns:
            The body bytes written, which fall short of ``limit`` when the source ends early or the client leaves.
        """
        sent = 0
        try:
            self.end_headers()
            with source as body:
                while sent < limit:
                    chunk = body.read(min(_COPY_CHUNK, limit - sent))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
            self.wfile.flush()
        except OSError:
            # The client went away (e.g. it timed out), or the source broke off; nothing left to do.
            self.close_connection = True
        return sent


class FileRequestHandler(QuietRequestHandler):
    """Answers ``GET`` and ``HEAD`` for the files under ``server.root``.

    Subclasses watch or change answers through three hooks: :meth:`_before_answer` (answer before the file is
    looked up), :meth:`_answer_empty` (every error answer) and :meth:`_answering` (a file's answer, before its
    first byte).
    """

    server: Any  # a server with a ``root`` folder (:class:`FileServer`, or a test server that serves files)

    def do_HEAD(self) -> None:
        """Answer with the headers of the file (or part) a ``GET`` would send."""
        self._serve(head=True)

    def do_GET(self) -> None:
        """Answer with the file, or the part the ``Range`` header asks for."""
        self._serve(head=False)

    def _before_answer(self, method: str, path: str) -> bool:
        """Called first; return ``True`` when the request is already answered."""
        return False

    def _answer_empty(self, method: str, path: str, status: int, headers: dict[str, str] | None = None) -> None:
        """Send an error answer without a body."""
        self._send_empty(status, headers)

    def _answering(
        self, method: str, path: str, byte_range: tuple[int, int] | None, status: int, limit: int
    ) -> tuple[int, Callable[[int], None]]:
        """Called before a file's body is sent: the body bytes to send, and what to call with the bytes sent."""
        return limit, lambda sent: None

    def _serve(self, *, head: bool) -> None:
        method = "HEAD" if head else "GET"
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        requested = self.headers.get("Range")
        if self._before_answer(method, path):
            return
        root: Path = self.server.root
        target = (root / path.lstrip("/")).resolve()
        if not target.is_relative_to(root):
            self._answer_empty(method, path, 403)
            return
        if not target.is_file():
            self._answer_empty(method, path, 404)
            return
        size = target.stat().st_size
        byte_range = parse_range(requested, size) if requested else None
        if byte_range == (-1, -1):
            self._answer_empty(method, path, 416, {"Content-Range": f"bytes */{size}"})
            return
        start, end = byte_range if byte_range is not None else (0, size)
        status = 206 if byte_range is not None else 200
        limit, done = self._answering(method, path, byte_range, status, 0 if head else end - start)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if byte_range is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        done(self._send_body(_open_at(target, start), limit))


class FileServer(LocalServer):
    """Serves the files under ``root`` over HTTP on 127.0.0.1 from a thread; paths escaping ``root`` get 403.

    Args:
        root: the folder to serve.
    """

    _thread_prefix = "file-server"

    def __init__(self, root: str | Path) -> None:
        root = Path(root).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"Cannot serve {str(root)!r}: it is not a folder.")
        self.root = root
        super().__init__(FileRequestHandler)


@contextlib.contextmanager
def _open_at(path: Path, start: int) -> Iterator[BinaryIO]:
    """Open ``path`` for reading from byte ``start``, lazily: on entering, inside the caller's error guard."""
    with path.open("rb") as f:
        f.seek(start)
        yield f


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` for a single-range header, ``None`` to ignore it, ``(-1, -1)`` if unsatisfiable.

    Examples:
        >>> parse_range("bytes=2-4", 10), parse_range("bytes=-3", 10), parse_range("bytes=20-", 10)
        ((2, 5), (7, 10), (-1, -1))
    """
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
