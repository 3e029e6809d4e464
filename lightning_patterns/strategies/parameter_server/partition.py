"""Byte-balanced partition of a model's parameters over parameter servers.

The parameters are laid end to end as one virtual byte stream and cut into ``num_servers`` contiguous
ranges of (nearly) equal bytes; a cut may fall inside a tensor, so one large tensor cannot overload a
server. Each range is then cut at tensor boundaries and every ``chunk_bytes`` into chunks. Server loads
therefore differ by less than two elements, far less than one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Chunk", "partition_parameters", "server_loads"]


class Chunk(NamedTuple):
    """A contiguous slice ``[start, stop)`` of the flattened tensor ``tensor``, held by ``server``.

    Attributes:
        server: index of the server (0-based) that holds the chunk.
        tensor: index of the tensor in the sequence that was partitioned.
        start: first element of the slice in the flattened tensor.
        stop: one past the last element.
    """

    server: int
    tensor: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        """Number of elements in the chunk."""
        return self.stop - self.start


def partition_parameters(
    numels: Sequence[int],
    itemsizes: Sequence[int],
    num_servers: int,
    chunk_bytes: int | None = None,
) -> list[Chunk]:
    """Split tensors of ``numels`` elements (of ``itemsizes`` bytes each) into chunks over ``num_servers``.

    A pure function: the same inputs give the same chunks on every process, so workers and servers agree
    on the layout without talking.

    Args:
        numels: number of elements of each tensor.
        itemsizes: bytes per element of each tensor.
        num_servers: number of servers (at least 1).
        chunk_bytes: the most bytes in one chunk (at least the largest ``itemsize``); ``None`` for no limit
            other than server and tensor boundaries.

    Returns:
        The chunks, ordered by server, then tensor, then offset. Every element of every tensor is in
        exactly one chunk.

    Example:
        Two servers, a 6-element and a 2-element float32 tensor: 16 bytes each, the first tensor split.

        >>> for chunk in partition_parameters([6, 2], [4, 4], num_servers=2):
        ...     print(chunk)
        Chunk(server=0, tensor=0, start=0, stop=4)
        Chunk(server=1, tensor=0, start=4, stop=6)
        Chunk(server=1, tensor=1, start=0, stop=2)
    """
    if len(numels) != len(itemsizes):
        raise ValueError(f"`numels` and `itemsizes` must have the same length, got {len(numels)} and {len(itemsizes)}.")
    if num_servers < 1:
        raise ValueError(f"`num_servers` must be at least 1, got num_servers={num_servers!r}.")
    if any(n < 0 for n in numels) or any(s < 1 for s in itemsizes):
        raise ValueError("`numels` must be >= 0 and `itemsizes` >= 1.")
    largest_item = max(itemsizes, default=1)
    if chunk_bytes is not None and chunk_bytes < largest_item:
        raise ValueError(
            f"`chunk_bytes` must hold at least one element ({largest_item} bytes), got chunk_bytes={chunk_bytes!r}. "
            f"Pass `chunk_bytes={largest_item}` or more, or `None` for no limit."
        )
    total = sum(n * s for n, s in zip(numels, itemsizes, strict=True))
    # Server s owns the bytes [s * total / S, (s + 1) * total / S); an element belongs to the server whose
    # range holds its first byte.
    bounds = [math.ceil(s * total / num_servers) for s in range(num_servers + 1)]
    chunks: list[Chunk] = []
    offset = 0  # byte offset of the current tensor in the virtual stream
    for index, (numel, itemsize) in enumerate(zip(numels, itemsizes, strict=True)):
        start = 0
        while start < numel:
            first_byte = offset + start * itemsize
            server = _server_of(first_byte, bounds)
            # Elements whose first byte lies before the next server's bound stay on this server.
            end_bytes = bounds[server + 1] - offset
            stop = min(numel, max(start + 1, math.ceil(end_bytes / itemsize)))
            piece = stop - start
            per_chunk = piece if chunk_bytes is None else max(1, chunk_bytes // itemsize)
            for lo in range(start, stop, per_chunk):
                chunks.append(Chunk(server, index, lo, min(stop, lo + per_chunk)))
            start = stop
        offset += numel * itemsize
    chunks.sort(key=lambda c: (c.server, c.tensor, c.start))
    return chunks


def _server_of(byte: int, bounds: Sequence[int]) -> int:
    # The last server whose lower bound is <= byte (bounds are non-decreasing; empty ranges are skipped).
    lo, hi = 0, len(bounds) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bounds[mid] <= byte:
            lo = mid
        else:
            hi = mid - 1
    return lo


def server_loads(chunks: Sequence[Chunk], itemsizes: Sequence[int], num_servers: int) -> list[int]:
    """Bytes held by each server under ``chunks``."""
    loads = [0] * num_servers
    for chunk in chunks:
        loads[chunk.server] += chunk.numel * itemsizes[chunk.tensor]
    return loads
