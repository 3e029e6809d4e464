"""Buckets: the units a worker pushes as backward produces them, and a server answers as soon as it can.

Each server's chunks (:func:`~lightning_patterns.strategies.parameter_server.partition.partition_parameters`)
are grouped into buckets of consecutive chunks, so a bucket is one contiguous range ``[offset, offset + numel)``
of the server's flat buffer. The grouping walks each server's chunks from the last to the first, the order in
which backward produces gradients (the last layers first, as DDP's reducer buckets them): a bucket is closed
when the next chunk would take it past ``bucket_bytes`` (``first_bucket_bytes`` for the server's first bucket
in that order, so that communication starts early). Buckets are then numbered by offset, which is the order in
which the next forward needs the parameters.

Invariants (``tests/property/test_bucket_invariants.py``): every chunk is in exactly one bucket; a server's
buckets are contiguous, in offset order, and cover its whole buffer; a bucket of more than one chunk holds at
most ``bucket_bytes`` (``first_bucket_bytes``); the plan depends on its arguments only, so every worker and server
computes the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_patterns.strategies.parameter_server.partition import Chunk

__all__ = ["Bucket", "DEFAULT_BUCKET_BYTES", "DEFAULT_FIRST_BUCKET_BYTES", "plan_buckets"]

#: DDP's ``bucket_cap_mb`` default.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
#: DDP's first bucket: small, so that the first push starts early in backward.
DEFAULT_FIRST_BUCKET_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Bucket:
    """Consecutive chunks of one server, pushed and answered together.

    Attributes:
        server: the server's index.
        index: the bucket's index among the server's buckets (in offset order).
        offset: its first element in the server's flat buffer.
        numel: its number of elements.
        chunks: indices of its chunks in the server's chunk list.
        tensors: the tensors (indices in the partitioned sequence) its chunks are slices of, without repeats.
    """

    server: int
    index: int
    offset: int
    numel: int
    chunks: tuple[int, ...]
    tensors: tuple[int, ...]


def plan_buckets(
    chunks_by_server: Sequence[Sequence[Chunk]],
    itemsizes: Sequence[int],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    first_bucket_bytes: int = DEFAULT_FIRST_BUCKET_BYTES,
) -> list[list[Bucket]]:
    """Group each server's chunks into buckets.

    Args:
        chunks_by_server: each server's chunks, in the order of its flat buffer.
        itemsizes: bytes per element of each partitioned tensor.
        bucket_bytes: the most bytes of a bucket of several chunks.
        first_bucket_bytes: the same for the bucket backward fills first (the last by offset).

    Returns:
        Each server's buckets, in offset order.

    Example:
        Four 4-byte chunks of four tensors on one server, 8-byte buckets: the last two chunks (produced first by
        backward) share a bucket, and so do the first two.

        >>> chunks = [Chunk(0, t, 0, 1) for t in range(4)]
        >>> [(b.offset, b.numel, b.chunks) for b in plan_buckets([chunks], [4] * 4, 8, 8)[0]]
        [(0, 2, (0, 1)), (2, 2, (2, 3))]
    """
    if bucket_bytes < 1 or first_bucket_bytes < 1:
        raise ValueError(f"Bucket sizes must be >= 1 byte, got {bucket_bytes=} and {first_bucket_bytes=}.")
    plans = []
    for server, chunks in enumerate(chunks_by_server):
        groups: list[list[int]] = []
        current: list[int] = []
        size = 0
        for position in reversed(range(len(chunks))):
            chunk = chunks[position]
            nbytes = chunk.numel * itemsizes[chunk.tensor]
            cap = first_bucket_bytes if not groups else bucket_bytes
            if current and size + nbytes > cap:
                groups.append(current)
                current, size = [], 0
            current.append(position)
            size += nbytes
        if current:
            groups.append(current)
        buckets = []
        offset = 0
        for index, group in enumerate(reversed(groups)):
            positions = tuple(sorted(group))
            numel = sum(chunks[p].numel for p in positions)
            tensors = tuple(dict.fromkeys(chunks[p].tensor for p in positions))
            buckets.append(Bucket(server, index, offset, numel, positions, tensors))
            offset += numel
        plans.append(buckets)
    return plans
