"""Counters of remote reads: bytes, requests, retries and seconds, shared by the readers of one process."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

__all__ = ["FetchStats", "FetchStatsSnapshot"]


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
