"""A local HTTP file server that injects faults, for testing remote reads against a real protocol.

:func:`serve_directory` serves a directory on ``127.0.0.1`` (a free port) from a daemon thread: the demo's
:class:`~lightning_patterns.demo.file_server.FileServer` (``GET`` with single ``Range`` requests, ``HEAD``), plus
faults and a request log. Requests fail at random with probability
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lightning_patterns.demo.file_server import FileRequestHandler
from lightning_patterns.testing._faults import FAULTS, _FaultHandler, _FaultInjectingServer

__all__ = ["FAULTS", "FaultInjectingHTTPServer", "RequestRecord", "serve_directory"]


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

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent over all logged requests."""
        with self._lock:
            return sum(r.bytes_sent for r in self._log)


class _FaultInjectingHandler(_FaultHandler, FileRequestHandler):
    """The demo's file handler, with the request's fault acted out first and every answer logged."""

    server: FaultInjectingHTTPServer
    _fault: str | None = None

    def _log_unanswered(self, method: str, path: str, status: int) -> None:
        self.server._record(RequestRecord(method, path, None, status, 0, self._fault))

    def _before_answer(self, method: str, path: str) -> bool:
        self._fault = self.server._choose_fault(path)
        return self._act_out_fault(
            self._fault, lambda status: self._log_unanswered(method, path, status), self._send_empty
        )

    def _answer_empty(self, method: str, path: str, status: int, headers: dict[str, str] | None = None) -> None:
        self._log_unanswered(method, path, status)
        self._send_empty(status, headers)

    def _answering(
        self, method: str, path: str, byte_range: tuple[int, int] | None, status: int, limit: int
    ) -> tuple[int, Callable[[int], None]]:
        if self._fault == "truncate" and method == "GET":
            # A graceful close after half the body: the client keeps what arrived and sees a short body.
            limit //= 2
            self.close_connection = True
        # Log before the first byte leaves, so a client that has its answer always finds it in the log.
        planned = RequestRecord(method, path, byte_range, status, limit, self._fault)
        index = self.server._record(planned)

        def amend(sent: int) -> None:
            if sent != limit:
                self.server._amend(index, planned, dataclasses.replace(planned, bytes_sent=sent))

        return limit, amend


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
