"""The contract of a transport: how the bytes of one fsspec filesystem are moved, one request at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from lightning_patterns.data.remote.deadline import Deadline

__all__ = ["ByteSink", "Transport"]


class ByteSink(Protocol):
    """Where a transport puts the bytes it receives: a ``bytearray``, or a fixed window of a larger buffer.

    Transports only append (``sink += data``) and ask how much arrived (``len(sink)``), so a reader can hand
    them a view of the memory the bytes are finally meant for (a shard's buffer, a cache's region) and no
    second copy is made. A sink of fixed size may also offer ``tail()`` (the writable memory not filled yet)
    and ``advance(n)`` (``n`` more bytes were written there), for transports that can read into memory.
    """

    def __len__(self) -> int:
        """Bytes appended so far."""
        ...

    def __iadd__(self, data: bytes | bytearray | memoryview, /) -> ByteSink:
        """Append ``data``."""
        ...


class Transport(ABC):
    """Moves bytes from one fsspec filesystem: one request per call, never retried here.

    A :class:`~lightning_patterns.data.remote.RemoteReader` picks one transport per filesystem (by its
    protocols, see :func:`~lightning_patterns.data.remote.transports.transport_for`) and wraps every call in
    its retry loop: a transport only has to raise on failure and keep, in the buffer it was given, the bytes
    that arrived before the failure, so that the next attempt resumes where this one stopped.

    Subclasses declare their registry key as ``name`` and the fsspec protocols they serve as ``protocols``
    (empty for the fallback that serves any filesystem).

    Args:
        fs: The filesystem to read from (the reader's own instance, created in this process).
        chunk_size: Bytes per request, for transports that read in chunks.
        timeout: Seconds without progress after which a request fails; ``None`` waits forever.
    """

    name: ClassVar[str]
    protocols: ClassVar[tuple[str, ...]] = ()
    # Whether read_into accepts end=None (read to the object's end); otherwise the reader looks up the size first.
    reads_to_end: ClassVar[bool] = False

    def __init__(self, fs: Any, *, chunk_size: int, timeout: float | None) -> None:
        self.fs = fs
        self.chunk_size = chunk_size
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chunk_size={self.chunk_size}, timeout={self.timeout})"

    def path(self, url: str) -> str:
        """What this transport's calls take for the object at ``url`` (the filesystem's own path by default)."""
        return str(self.fs._strip_protocol(url))

    @abstractmethod
    def read_into(
        self, path: str, start: int, end: int | None, buf: ByteSink, *, deadline: Deadline | None = None
    ) -> bool:
        """Append bytes of the object from ``start`` on to ``buf``, in one request.

        A transport may stop before ``end`` (after one chunk, say); the reader then asks for the rest. It never
        appends more than ``end - start`` bytes, whatever the backend sends.

        Args:
            path: The object, as :meth:`path` gave it.
            start: First byte to read.
            end: One past the last byte wanted; ``None`` (only where :attr:`reads_to_end`) reads to the end.
            buf: Where the bytes go; on failure it keeps those that arrived.
            deadline: When the request must stop (raising
                :class:`~lightning_patterns.exceptions.DeadlineExceededError`); a transport whose requests
                cannot be interrupted keeps each one short (one chunk), and the reader checks the deadline
                between them.

        Returns:
            ``True`` if the object ended before ``end`` (the answer was short), ``False`` if the transport
            stopped on its own and more may follow.

        Raises:
            FileNotFoundError: The object does not exist.
            Exception: Anything else the backend raised; the reader classifies it.
        """

    def size(self, path: str) -> int | None:
        """The object's size in bytes, ``None`` if the backend cannot tell (one request)."""
        value = self.fs.size(path)
        return None if value is None else int(value)

    def exists(self, path: str) -> bool:
        """Whether the object exists (one request)."""
        return bool(self.fs.exists(path))

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a file rather than a folder or nothing (one request)."""
        return bool(self.fs.isfile(path))

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to release
        """Release connections; the transport is not used afterwards."""
