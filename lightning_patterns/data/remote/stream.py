"""A sequential, seekable file object over retried range reads, with gzip decompressed on the fly."""

from __future__ import annotations

import gzip
import io
from typing import TYPE_CHECKING, Any

from lightning_patterns.data.remote.retry import redact_url

if TYPE_CHECKING:
    from lightning_patterns.data.remote.reader import RemoteReader

__all__ = ["GZIP_MAGIC", "buffered_stream"]

GZIP_MAGIC = b"\x1f\x8b"


class _RangeStream(io.RawIOBase):
    """A raw, seekable stream whose reads are retried range requests through a :class:`RemoteReader`."""

    def __init__(self, reader: RemoteReader, url: str, size: int | None, *, owns_reader: bool) -> None:
        super().__init__()
        self._reader = reader
        self._owns_reader = owns_reader
        self._url = url
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._size is not None

    def close(self) -> None:
        if not self.closed and self._owns_reader:
            self._reader.close()
        super().close()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END and self._size is not None:
            pos = self._size + offset
        else:
            raise io.UnsupportedOperation(f"cannot seek with whence={whence!r} on {redact_url(self._url)}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if len(view) == 0:
            return 0
        if self._size is not None:
            end = min(self._size, self._pos + len(view))
            if end <= self._pos:
                return 0
            data = self._reader.read_range(self._url, self._pos, end)
        else:
            # Size unknown: a short answer is the end of the object, not a truncation.
            data = self._reader.read_range(self._url, self._pos, self._pos + len(view), short_ok=True)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def buffered_stream(
    reader: RemoteReader, url: str, *, block_size: int, compression: str | None, owns_reader: bool
) -> io.BufferedIOBase:
    """A buffered file object over ``url`` that reads ``block_size`` bytes per request through ``reader``.

    Args:
        reader: Reads the blocks, with retries.
        url: The object's absolute URL.
        block_size: Bytes per range request.
        compression: ``"gzip"``, ``"infer"`` (gzip for a ``.gz`` suffix or the gzip magic bytes) or ``None``.
        owns_reader: Close ``reader`` when the stream is closed.

    Returns:
        A binary file object.
    """
    if compression not in (None, "gzip", "infer"):
        raise ValueError(f"open(compression={compression!r}) must be None, 'gzip' or 'infer'.")
    if block_size < 1:
        raise ValueError(f"open(block_size={block_size!r}) must be a positive number of bytes.")
    raw = _RangeStream(reader, url, reader.size(url), owns_reader=owns_reader)
    buffered = io.BufferedReader(raw, buffer_size=block_size)
    if compression == "infer":
        gzipped = url.split("?", 1)[0].endswith(".gz") or buffered.peek(2)[:2] == GZIP_MAGIC
        compression = "gzip" if gzipped else None
    if compression is None:
        return buffered
    decompressed = gzip.GzipFile(fileobj=buffered, mode="rb")
    # GzipFile closes `myfileobj` (else only files it opened itself): closing it closes the stream too.
    decompressed.myfileobj = buffered  # type: ignore[assignment]
    return decompressed
