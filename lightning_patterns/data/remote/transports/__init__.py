"""Transports, by registry name: how the bytes of one kind of filesystem are moved.

- ``"http"`` (:class:`HTTPTransport`): HTTP(S), each attempt one streamed ``GET`` resumed with ``Range``.
- ``"local"`` (:class:`LocalTransport`): local files, plain reads.
- ``"s3"`` (:class:`S3Transport`): S3 through s3fs, each chunk one ranged ``GetObject`` whose body is streamed
  into the reader's buffer (no copy of the chunk is held).
- ``"range"`` (:class:`RangeTransport`): any other fsspec filesystem (GCS, ``memory://``, ...), in
  ``cat_file(path, start, end)`` chunks; the fallback for every protocol no transport claims.

:func:`transport_for` picks one per filesystem, by the filesystem's protocols. Third parties register more
through the ``lightning_patterns.transports`` entry-point group, or with ``TRANSPORTS.register(name, cls)``;
a transport class subclasses :class:`Transport` and names the ``protocols`` it serves.
"""

from __future__ import annotations

from typing import Any

from lightning_patterns._registry import Registry
from lightning_patterns.data.remote.transports.base import Transport
from lightning_patterns.data.remote.transports.http import HTTPTransport
from lightning_patterns.data.remote.transports.local import LocalTransport
from lightning_patterns.data.remote.transports.ranged import RangeTransport
from lightning_patterns.data.remote.transports.s3 import S3Transport

__all__ = [
    "HTTPTransport",
    "LocalTransport",
    "RangeTransport",
    "S3Transport",
    "TRANSPORTS",
    "Transport",
    "transport_for",
]

TRANSPORTS: Registry[type[Transport]] = Registry("transport", entry_point_group="lightning_patterns.transports")
for _cls in (HTTPTransport, LocalTransport, S3Transport, RangeTransport):
    TRANSPORTS.register(_cls.name, _cls)
del _cls


def transport_for(fs: Any) -> type[Transport]:
    """The transport class for filesystem ``fs``: the first registered one serving one of its protocols.

    Args:
        fs: An fsspec filesystem.

    Returns:
        That transport class, or the one registered as ``"range"`` when none claims the protocol.

    Example:
        >>> import fsspec
        >>> transport_for(fsspec.filesystem("memory")).name, transport_for(fsspec.filesystem("file")).name
        ('range', 'local')
    """
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    for name in TRANSPORTS.names():
        cls = TRANSPORTS.get(name)
        if set(cls.protocols).intersection(protocols):
            return cls
    return TRANSPORTS.get(RangeTransport.name)
