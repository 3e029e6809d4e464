"""S3 (s3fs): one ranged ``GetObject`` per chunk, its body streamed into the reader's buffer as it arrives.

``cat_file`` would first collect a whole chunk in memory (the body's pieces, then one ``bytes`` of them all)
and the reader would copy it once more into its buffer. Streaming the body writes each piece straight into
the buffer the bytes are meant for, so a read holds no copy of its chunk and costs one copy less: at a few
requests in flight of several MiB each, that is tens of MiB of memory that never grows the heap.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from lightning_patterns.data.remote.deadline import run_bounded
from lightning_patterns.data.remote.transports.base import ByteSink
from lightning_patterns.data.remote.transports.ranged import RangeTransport

if TYPE_CHECKING:
    from lightning_patterns.data.remote.deadline import Deadline

__all__ = ["S3Transport"]

# Bytes asked of the body at a time: about what one socket read brings.
_PIECE = 256 * 1024


class S3Transport(RangeTransport):
    """Reads ``chunk_size`` bytes per ranged ``GetObject`` of s3fs, streaming the body into the buffer.

    A retry repeats only what is missing of the chunk (the bytes that arrived are kept). A range that starts
    at or past the object's end (HTTP 416) reads as an empty answer, so an object shorter than expected is a
    truncation to retry, as on the other backends. A filesystem this cannot stream (one in asynchronous mode,
    or another implementation of the ``s3`` protocol) is read as :class:`RangeTransport` reads it.
    """

    name = "s3"
    protocols = ("s3", "s3a")

    def read_into(
        self, path: str, start: int, end: int | None, buf: ByteSink, *, deadline: Deadline | None = None
    ) -> bool:
        """Stream at most ``chunk_size`` bytes from ``start`` into ``buf``; ``True`` once the object has no more."""
        fs = self.fs
        if end is None or fs.asynchronous or not hasattr(fs, "_call_s3") or not hasattr(fs, "split_path"):
            return super().read_into(path, start, end, buf, deadline=deadline)
        stop = min(end, start + self.chunk_size)
        if stop <= start:
            return False
        request = _stream(fs, path, start, stop, buf)
        if self.timeout is not None:
            request = asyncio.wait_for(request, self.timeout)
        got = run_bounded(fs.loop, request, deadline, path)
        return got < stop - start


async def _stream(fs: Any, path: str, start: int, stop: int, buf: ByteSink) -> int:
    """Append bytes ``[start, stop)`` of ``path`` to ``buf`` as the body arrives; return how many arrived."""
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    try:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}", **extra)
    except OSError as err:
        if _not_satisfiable(err):
            return 0
        raise
    body = response["Body"]
    got = 0
    try:
        while got < stop - start:
            piece = await body.read(min(_PIECE, stop - start - got))
            if not piece:
                break
            buf += piece
            got += len(piece)
    finally:
        body.close()
    return got


def _not_satisfiable(err: BaseException) -> bool:
    """Whether ``err`` is S3's answer to a range past the object's end (416, ``InvalidRange``)."""
    text = f"{err!r} {getattr(err, '__cause__', '')!r}"
    return "InvalidRange" in text or "416" in text
