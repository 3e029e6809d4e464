"""Any fsspec filesystem (S3, GCS, Azure, ``memory://``, ...): ``cat_file(path, start, end)`` one chunk at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import fsspec.asyn

from lightning_patterns.data.remote.deadline import Deadline, run_bounded
from lightning_patterns.data.remote.transports.base import ByteSink, Transport

__all__ = ["RangeTransport"]

_T = TypeVar("_T")


class RangeTransport(Transport):
    """Reads ``chunk_size`` bytes per range request through the filesystem's ``cat_file``.

    The fallback for every protocol no other transport claims. A retry repeats only the chunk that failed.
    On an asynchronous filesystem (s3fs, gcsfs) each request is bounded by ``timeout`` and cancelled at the
    read's deadline; on a synchronous one the reader checks the deadline between chunks.
    """

    name = "range"

    def read_into(
        self, path: str, start: int, end: int | None, buf: ByteSink, *, deadline: Deadline | None = None
    ) -> bool:
        """Append at most ``chunk_size`` bytes from ``start``; ``True`` once the object has no more."""
        stop = end if end is None else min(end, start + self.chunk_size)
        fs = self.fs
        if isinstance(fs, fsspec.asyn.AsyncFileSystem) and not fs.asynchronous:
            request = _with_timeout(fs._cat_file(path, start=start, end=stop), self.timeout)
            data = run_bounded(fs.loop, request, deadline, path)
        else:
            data = fs.cat_file(path, start=start, end=stop)
        # A backend that ignores the range (or returns more) must not grow the buffer past what was asked for.
        buf += data if stop is None else memoryview(data)[: stop - start]
        # A non-empty answer shorter than asked may be the backend's own limit: only an empty one is the end.
        return len(data) == 0


async def _with_timeout(awaitable: Awaitable[_T], timeout: float | None) -> _T:
    return await asyncio.wait_for(awaitable, timeout)
