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
    read's deadline; on a synchronous one the reader checks the deadline between chunks. A range at or past
    the object's end reads as empty, whether the backend answers with no bytes (``memory://``) or with
    ``416 Range Not Satisfiable`` (S3), so a short object is retried and ``short_ok`` reads stop at its end.
    """

    name = "range"

    def read_into(
        self, path: str, start: int, end: int | None, buf: ByteSink, *, deadline: Deadline | None = None
    ) -> bool:
        """Append at most ``chunk_size`` bytes from ``start``; ``True`` once the object has no more."""
        stop = end if end is None else min(end, start + self.chunk_size)
        fs = self.fs
        try:
            if isinstance(fs, fsspec.asyn.AsyncFileSystem) and not fs.asynchronous:
                request = _with_timeout(fs._cat_file(path, start=start, end=stop), self.timeout)
                data = run_bounded(fs.loop, request, deadline, path)
            else:
                data = fs.cat_file(path, start=start, end=stop)
        except OSError as err:
            if not _range_not_satisfiable(err):
                raise
            data = b""  # the range starts at or past the object's end (S3 answers 416, not an empty body)
        # A backend that ignores the range (or returns more) must not grow the buffer past what was asked for.
        buf += data if stop is None else memoryview(data)[: stop - start]
        # A non-empty answer shorter than asked may be the backend's own limit: only an empty one is the end.
        return len(data) == 0


def _range_not_satisfiable(err: OSError) -> bool:
    """Whether ``err`` is an object store's ``416 Range Not Satisfiable`` (S3's ``InvalidRange``, via s3fs)."""
    for cause in (err, err.__cause__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "InvalidRange" or status == 416:
                return True
        if getattr(cause, "status", None) == 416:  # aiohttp's ClientResponseError (gcsfs, adlfs, http)
            return True
    return False


async def _with_timeout(awaitable: Awaitable[_T], timeout: float | None) -> _T:
    return await asyncio.wait_for(awaitable, timeout)
