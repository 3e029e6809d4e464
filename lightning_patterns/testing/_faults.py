"""Shared machinery of the fault-injecting test servers: fault draws, the request log, lifecycle and fault actions.

:class:`~lightning_patterns.testing.http_server.FaultInjectingHTTPServer` (a static file server) and
:class:`~lightning_patterns.testing.fault_proxy.FaultInjectingProxy` (a reverse proxy) differ only in where an
answer comes from (a file or the upstream server) and what an error answer carries (nothing, or an S3-style XML
error). Everything else lives here, so the two cannot drift apart:

- :class:`_FaultInjectingServer` validates the fault settings, draws faults (scheduled ones first, then seeded
  random ones) and keeps the request log under a lock; binding, the serving thread and stopping come from the
  demo's :class:`~lightning_patterns.demo.file_server.LocalServer`.
- :class:`_FaultHandler` acts out ``"stall"``, ``"reset"``, ``"500"`` and ``"503"``; streaming a body up to a byte
  limit (how ``"truncate"`` cuts an answer short) comes from the demo's
  :class:`~lightning_patterns.demo.file_server.QuietRequestHandler`.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from lightning_patterns.demo.file_server import LocalServer, QuietRequestHandler

__all__ = ["FAULTS", "_FaultHandler", "_FaultInjectingServer", "_check_faults"]

FAULTS: tuple[str, ...] = ("reset", "500", "503", "truncate", "stall")


class _Record(Protocol):
    """What the log needs of a record: the path it is looked up by and the fault it counts towards."""

    @property
    def path(self) -> str: ...

    @property
    def fault(self) -> str | None: ...


_RecordT = TypeVar("_RecordT", bound=_Record)


def _check_faults(faults: Sequence[str]) -> None:
    """Refuse unknown fault names, and a bare string (which would otherwise read as one fault per character).

    Args:
        faults: The fault names to check.

    Raises:
        ValueError: If ``faults`` is a string or names a fault outside :data:`FAULTS`.
    """
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or isinstance(faults, str):
        raise ValueError(f"faults={faults!r} has unknown entries {unknown!r}; choose from {FAULTS!r}.")


class _FaultInjectingServer(LocalServer, Generic[_RecordT]):
    """A threading HTTP server on ``127.0.0.1`` (a free port) that draws faults and logs every request.

    Subclasses validate their own arguments, then call ``super().__init__``, which validates the fault settings
    and binds the socket (last, so a refused argument never leaves a socket open).

    Args:
        handler: The request handler class.
        failure_rate: Probability in ``[0, 1]`` that a request meets a random fault from ``faults``.
        faults: The faults to draw from.
        stall_seconds: How long a ``"stall"`` waits before answering.
        seed: Seeds the fault draws: the ``k``-th request meets the same fault in every run with this seed.
    """

    _thread_prefix = "fault-server"

    def __init__(
        self,
        handler: type[_FaultHandler],
        *,
        failure_rate: float,
        faults: Sequence[str],
        stall_seconds: float,
        seed: int,
    ) -> None:
        name = type(self).__name__
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"{name}(failure_rate={failure_rate!r}) must be in [0, 1].")
        _check_faults(faults)
        if failure_rate > 0 and not faults:
            raise ValueError(f"{name}(failure_rate={failure_rate!r}) needs at least one fault.")
        if stall_seconds < 0:
            raise ValueError(f"{name}(stall_seconds={stall_seconds!r}) must be >= 0.")
        # Plain attributes: tests may raise ``failure_rate`` on a running server once its fixtures are in place.
        self.failure_rate = failure_rate
        self.faults = tuple(faults)
        self.stall_seconds = stall_seconds
        self._rng = random.Random(seed)
        # One lock guards the draws, the schedule and the log: handler threads touch all three concurrently.
        self._lock = threading.Lock()
        self._log: list[_RecordT] = []
        self._scheduled: defaultdict[str, deque[str]] = defaultdict(deque)
        super().__init__(handler)

    # ------------------------------------------------------------------ faults

    def inject(self, path: str, *faults: str) -> None:
        """Make the next requests for ``path`` meet ``faults``, one fault per request, in order.

        Args:
            path: The URL path, e.g. ``"/a.bin"`` (a missing leading ``/`` is added).
            *faults: Faults from the module docstring, e.g. ``inject("/a.bin", "truncate", "500")``.
        """
        _check_faults(faults)
        with self._lock:
            self._scheduled["/" + path.lstrip("/")].extend(faults)

    def _choose_fault(self, path: str) -> str | None:
        with self._lock:
            scheduled = self._scheduled.get(path)
            if scheduled:
                return scheduled.popleft()
            # Draw only when faults are on, so turning them on later does not shift an earlier seeded sequence.
            if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
                return self._rng.choice(self.faults)
            return None

    # ------------------------------------------------------------------ request log

    def _record(self, record: _RecordT) -> int:
        with self._lock:
            self._log.append(record)
            return len(self._log) - 1

    def _amend(self, index: int, old: _RecordT, new: _RecordT) -> None:
        with self._lock:
            if index < len(self._log) and self._log[index] is old:  # reset_log() may have run meanwhile
                self._log[index] = new

    @property
    def requests(self) -> list[_RecordT]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def requests_for(self, path: str) -> list[_RecordT]:
        """The logged requests for one URL path.

        Args:
            path: e.g. ``"/a.bin"`` (a missing leading ``/`` is added).

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
    def fault_count(self) -> int:
        """How many logged requests met a fault."""
        with self._lock:
            return sum(r.fault is not None for r in self._log)

    def reset_log(self) -> None:
        """Forget the logged requests (not the scheduled faults)."""
        with self._lock:
            self._log.clear()


class _FaultHandler(QuietRequestHandler):
    """Request handler base: able to act out the faults that precede any real answer."""

    server: _FaultInjectingServer[Any]

    def _act_out_fault(self, fault: str | None, log: Callable[[int], object], answer: Callable[[int], None]) -> bool:
        """Act out ``"stall"``, ``"reset"``, ``"500"`` and ``"503"``; other faults need the real answer.

        Args:
            fault: The fault the request met, or ``None``.
            log: Logs the request with the status given (``0`` for a reset).
            answer: Sends an error answer with the status given.

        Returns:
            Whether the request is done with; after a stall (or no fault) it is still to be answered.
        """
        if fault == "stall":
            time.sleep(self.server.stall_seconds)
        elif fault == "reset":
            log(0)
            self._reset()
            return True
        elif fault in ("500", "503"):
            log(int(fault))
            answer(int(fault))
            return True
        return False

    def _reset(self) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0), as a crashing server or load balancer would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
