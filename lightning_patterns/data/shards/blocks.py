"""Per-block checksums of a shard's body: computing them, finding the blocks of a byte range, verifying them.

A shard's body (every column, see :mod:`.layout`) is cut into blocks of ``block_bytes``; the head holds the
sha256 of each. A reader that trusts the head (its sha256 is in the manifest) can fetch any byte range,
widened to whole blocks, and verify it without the rest of the file. That is what lets a DataLoader worker
read only its own rows of a shard that straddles two workers, and ``StreamingDataset[i]`` fetch only the
blocks that hold sample ``i``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_patterns.data.shards.layout import DIGEST_BYTES
from lightning_patterns.exceptions import ChecksumMismatchError

__all__ = ["BlockTable", "block_digests", "merge_ranges"]


def block_digests(body: memoryview | bytes | bytearray, block_bytes: int) -> bytes:
    """The concatenated sha256 digests of ``body`` cut into blocks of ``block_bytes`` (the last one shorter)."""
    view = memoryview(body)
    return b"".join(hashlib.sha256(view[at : at + block_bytes]).digest() for at in range(0, len(view), block_bytes))


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty ``[start, stop)`` ranges with overlapping or touching ones merged."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


@dataclass(frozen=True)
class BlockTable:
    """Where a shard's blocks lie, as its header says (checked by :func:`~.reader.parse_header`).

    Args:
        block_bytes: bytes per block (the last one may be shorter).
        start: first byte of the body (and of block 0): the size of the head.
        table_offset: where the ``count`` digests of :data:`~.layout.DIGEST_BYTES` bytes lie in the head.
        count: blocks in the body.
        size: the shard file's size; the last block ends there.
    """

    block_bytes: int
    start: int
    table_offset: int
    count: int
    size: int

    @property
    def table_stop(self) -> int:
        """One past the last byte of the table."""
        return self.table_offset + self.count * DIGEST_BYTES

    def bounds(self, block: int) -> tuple[int, int]:
        """Bytes ``[start, stop)`` of ``block``."""
        start = self.start + block * self.block_bytes
        return start, min(start + self.block_bytes, self.size)

    def blocks_of(self, start: int, stop: int) -> range:
        """The blocks overlapping bytes ``[start, stop)`` of the body (empty for an empty range)."""
        if stop <= start:
            return range(0)
        first = max(start - self.start, 0) // self.block_bytes
        last = (min(stop, self.size) - self.start - 1) // self.block_bytes
        return range(first, last + 1)

    def widen(self, start: int, stop: int) -> tuple[int, int]:
        """``[start, stop)`` widened to whole blocks: the range to fetch so that it can be verified."""
        blocks = self.blocks_of(start, stop)
        if not blocks:
            return start, start
        return self.bounds(blocks[0])[0], self.bounds(blocks[-1])[1]

    def mismatch(
        self, data: memoryview | bytes | bytearray, at: int, digests: bytes | memoryview
    ) -> tuple[int, str, str] | None:
        """The first block of ``data`` (from offset ``at``, whole blocks) that differs from the table, or ``None``.

        Returns:
            ``(block, expected, actual)`` with the two digests as ``"sha256:<hex>"``.

        Raises:
            ValueError: ``data`` does not start or end on a block boundary.
        """
        view = memoryview(data)
        blocks = self.blocks_of(at, at + len(view))
        if not blocks:
            return None
        if self.bounds(blocks[0])[0] != at or self.bounds(blocks[-1])[1] != at + len(view):
            raise ValueError(
                f"bytes [{at}, {at + len(view)}) do not start and end on block boundaries of {self.block_bytes} "
                f"bytes from byte {self.start}; widen the range with BlockTable.widen() before fetching it."
            )
        for block in blocks:
            start, stop = self.bounds(block)
            actual = hashlib.sha256(view[start - at : stop - at]).digest()
            expected = bytes(digests[block * DIGEST_BYTES : (block + 1) * DIGEST_BYTES])
            if actual != expected:
                return block, "sha256:" + expected.hex(), "sha256:" + actual.hex()
        return None

    def describe_mismatch(self, block: int, expected: str, actual: str) -> str:
        """``block k of n (bytes [a, b)) does not match ...``: what differs, for error messages."""
        start, stop = self.bounds(block)
        return (
            f"block {block} of {self.count} (bytes [{start}, {stop})) does not match its checksum in the shard's "
            f"block table: expected {expected} got {actual}"
        )

    def verify(
        self, data: memoryview | bytes | bytearray, at: int, digests: bytes | memoryview, url: str | None
    ) -> None:
        """Check that ``data``, the bytes from offset ``at`` (a block boundary), matches the block table.

        Every block ``data`` covers must be whole (it may end at the end of the file).

        Args:
            data: the bytes, starting at a block boundary and ending at one (or at the end of the file).
            at: their offset in the shard file.
            digests: the shard's block table (``count`` digests).
            url: the shard's URL, named in the error.

        Raises:
            ChecksumMismatchError: a block differs from its digest; the message names the block, its bytes and
                the shard.
            ValueError: ``data`` does not start or end on a block boundary.
        """
        found = self.mismatch(data, at, digests)
        if found is not None:
            where = "Shard" if url is None else f"Shard {url!r}"
            raise ChecksumMismatchError(
                f"{where}: {self.describe_mismatch(*found)}. The remote object is corrupt (or changed since the "
                "manifest was written): write the shard again, or regenerate the manifest from the data you trust."
            )
