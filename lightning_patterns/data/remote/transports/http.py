"""HTTP(S): one streamed ``GET`` per attempt, resumed with ``Range: bytes=<reached>-`` after a cut-off body."""

from __future__ import annotations

import errno
from typing import Any

from lightning_patterns.data.remote.deadline import Deadline, run_bounded
from lightning_patterns.data.remote.transports.base import ByteSink, Transport

__all__ = ["HTTPTransport"]

_STREAM_CHUNK = 256 * 1024


class HTTPTransport(Transport):
    """Streams the body of one ``GET`` into the reader's buffer, so the bytes of a response cut short are kept.

    The next attempt then asks only for what is missing (``Range: bytes=<reached>-``). Bodies are requested
    with ``Accept-Encoding: identity`` (a compressed transfer would make byte offsets meaningless), and a
    server that ignores ``Range`` is handled by skipping the bytes already held. ``timeout`` bounds the
    connect and each read's inactivity; the read's ``deadline`` bounds the whole transfer (a server sending
    one byte a second never trips an inactivity timeout), and no more than ``end - start`` bytes are kept
    however long the body is.

    A ``416 Range Not Satisfiable`` (a range starting at or past the object's end) reads as an empty body, so
    an object shorter than expected is a truncation to retry, as on other backends. HTTP has no folders:
    :meth:`is_file` cannot tell a file from a folder and answers ``False``.
    """

    name = "http"
    protocols = ("http", "https")
    reads_to_end = True

    def path(self, url: str) -> str:
        """The URL itself: HTTP paths are URLs."""
        return url

    def read_into(
        self, path: str, start: int, end: int | None, buf: ByteSink, *, deadline: Deadline | None = None
    ) -> bool:
        """Stream ``path[start:end]`` into ``buf``; ``True`` once the body ended (short or complete)."""
        run_bounded(self.fs.loop, _get_into(self.fs, path, start, end, buf, self.timeout), deadline, path)
        return True

    def is_file(self, path: str) -> bool:
        """``False``: over HTTP a file cannot be told from a folder."""
        return False

    def close(self) -> None:
        """Close the aiohttp session, so no connection outlives the reader."""
        session = getattr(self.fs, "_session", None)
        if session is not None:
            self.fs.close_session(self.fs.loop, session)
            self.fs._session = None


async def _get_into(fs: Any, url: str, start: int, end: int | None, buf: ByteSink, timeout: float | None) -> None:
    import aiohttp

    session = await fs.set_session()
    kwargs = dict(fs.kwargs)
    headers = dict(kwargs.pop("headers", None) or {})
    headers.setdefault("Accept-Encoding", "identity")
    if start > 0 or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    if timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 404:
            raise FileNotFoundError(errno.ENOENT, "No such remote object", url)
        if response.status == 416:
            return  # nothing at or after `start`: the object ends there, as an empty body says on other backends
        response.raise_for_status()
        skip = start if start > 0 and response.status != 206 else 0  # the server ignored the Range header
        want = None if end is None else end - start
        got = 0
        async for chunk in response.content.iter_chunked(_STREAM_CHUNK):
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            if want is not None and got + len(chunk) > want:
                chunk = chunk[: want - got]
            buf += chunk
            got += len(chunk)
            if want is not None and got >= want:
                break
