"""Deadlines for remote reads: a point in time, a cancellation, or both, honoured by every retry loop.

A :class:`Deadline` travels with one read through :class:`~lightning_patterns.data.remote.RemoteReader`:
its retry loop checks it before every attempt and sleeps its backoff on it, and the transports pass it to
the request in flight (:func:`run_bounded` runs a coroutine on fsspec's event loop and cancels it when the
deadline passes or is cancelled). Several deadlines may share one cancellation event, so that a read-ahead
pipeline that is closed stops every download it started, and the process can exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from lightning_patterns.data.remote.retry import redact_url
from lightning_patterns.exceptions import DeadlineExceededError

__all__ = ["Deadline", "run_bounded"]

_T = TypeVar("_T")
# How often a thread waiting for a request in flight looks at its deadline's cancellation.
_POLL_SECONDS = 0.05


class Deadline:
    """When a read must give up: ``seconds`` from now, or as soon as ``cancelled`` is set.

    Args:
        seconds: seconds from now; ``None`` sets no time limit (only the cancellation).
        cancelled: an event shared with other deadlines (one :meth:`cancel` stops them all); a new one when
            ``None``.

    Example:
        >>> deadline = Deadline(60.0)
        >>> deadline.expired(), 59.0 < deadline.remaining() <= 60.0
        (False, True)
        >>> deadline.cancel()
        >>> deadline.expired(), deadline.remaining()
        (True, 0.0)
    """

    def __init__(self, seconds: float | None = None, *, cancelled: threading.Event | None = None) -> None:
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"Deadline(seconds={seconds!r}) must be >= 0, or None for no time limit.")
        self.seconds = seconds
        self._at = None if seconds is None else time.monotonic() + seconds
        self._cancelled = cancelled if cancelled is not None else threading.Event()

    def __repr__(self) -> str:
        return f"Deadline(seconds={self.seconds!r}, cancelled={self.cancelled})"

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called (on this deadline or one sharing its event)."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop every read bound by this deadline (and by those sharing its event)."""
        self._cancelled.set()

    def remaining(self) -> float | None:
        """Seconds left (``0.0`` once passed or cancelled), ``None`` without a time limit."""
        if self._cancelled.is_set():
            return 0.0
        if self._at is None:
            return None
        return max(0.0, self._at - time.monotonic())

    def expired(self) -> bool:
        """Whether the read must stop now."""
        return self.remaining() == 0.0

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the deadline passes or is cancelled first."""
        remaining = self.remaining()
        self._cancelled.wait(seconds if remaining is None else min(seconds, remaining))

    def error(self, url: str, *, received: int | None = None) -> DeadlineExceededError:
        """The error for a read of ``url`` stopped by this deadline (naming the URL and what arrived)."""
        got = "" if received is None else f" after {received} bytes"
        if self._cancelled.is_set():
            return DeadlineExceededError(
                f"Reading {redact_url(url)} was cancelled{got}: whoever waited for it stopped waiting (a "
                "read-ahead pipeline closed, or its own timeout fired)."
            )
        return DeadlineExceededError(
            f"Reading {redact_url(url)} did not finish within its deadline of {self.seconds} s{got}, retries "
            "included. Check the remote (a server that sends very slowly looks like this), or allow more time "
            "(`ReadAhead(timeout=...)` of StreamingDataset, `timeout` of load_manifest)."
        )


def run_bounded(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T], deadline: Deadline | None, url: str
) -> _T:
    """Run ``coro`` on ``loop`` (fsspec's I/O thread) and return its result, cancelling it at ``deadline``.

    Unlike ``fsspec.asyn.sync``, the coroutine is cancelled (its connection closed) when the deadline passes
    or is cancelled, so no download outlives the read that asked for it.

    Args:
        loop: a running event loop in another thread.
        coro: the request.
        deadline: when to give up; ``None`` waits as long as the coroutine runs.
        url: named in the error.

    Returns:
        The coroutine's result.

    Raises:
        DeadlineExceededError: the deadline passed or was cancelled first.
        Exception: whatever the coroutine raised.
    """
    if loop is None or loop.is_closed():
        coro.close()
        raise RuntimeError("fsspec's event loop is not running")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    while True:
        remaining = None if deadline is None else deadline.remaining()
        wait = None if deadline is None else min(_POLL_SECONDS, remaining if remaining is not None else _POLL_SECONDS)
        done, _ = concurrent.futures.wait([future], timeout=wait)
        if done:
            return future.result()
        if deadline is not None and deadline.expired():
            future.cancel()
            raise deadline.error(url)
