"""Local files: a plain ``open``/``seek``/``read``, without fsspec's buffering in between."""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from lightning_patterns.data.remote.transports.base import ByteSink, Transport

if TYPE_CHECKING:
    from lightning_patterns.data.remote.deadline import Deadline

__all__ = ["LocalTransport"]


class LocalTransport(Transport):
    """Reads ``[start, end)`` of a local file in one call (to the end of the file when ``end`` is ``None``).

    A file shorter than asked is reported as ended; the reader treats that as a truncation (a file still
    being written, say) and retries, resuming at the byte reached. Only regular files are read: a FIFO or a
    device (``/dev/zero``) would block or never end, so it is refused at once.
    """

    name = "local"
    protocols = ("file", "local")
    reads_to_end = True

    def read_into(
        self, path: str, start: int, end: int | None, buf: ByteSink, *, deadline: Deadline | None = None
    ) -> bool:
        """Append ``path[start:end]`` to ``buf``; ``True`` if the file ended before ``end``."""
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it can be refused.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, "Not a regular file (a FIFO, device or folder is never read)", path)
            f.seek(start)
            tail = getattr(buf, "tail", None)
            if end is not None and tail is not None:
                # Straight into the reader's memory: no intermediate copy of the range.
                got = f.readinto(tail()[: end - start])
                buf.advance(got)  # type: ignore[attr-defined]
                return start + got < end
            data = f.read() if end is None else f.read(end - start)
        buf += data
        return end is None or start + len(data) < end

    def size(self, path: str) -> int:
        """The file's size."""
        return os.stat(path).st_size

    def exists(self, path: str) -> bool:
        """Whether anything exists at ``path``."""
        return os.path.exists(path)

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a regular file."""
        return os.path.isfile(path)
