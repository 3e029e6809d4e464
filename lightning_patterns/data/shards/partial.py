"""Reading some rows of a shard: the head, then only the blocks that hold those rows, each one verified.

A shard with a block table (see :mod:`.layout`) whose manifest entry records its head
(:attr:`~.manifest.ShardInfo.has_blocks`) can be read in parts:

1. :func:`fetch_head` reads the head (prefix, header, block table) in one request and checks it against the
   manifest's ``head_checksum``, then makes every check of :func:`~.reader.parse_header`;
2. :func:`fetch_rows` reads, for rows ``[start, stop)``, the bytes of each fixed-size column and of each
   variable-length index, widened to whole blocks; then the payload the index points at; verifies every
   block against the table; and opens a :class:`~.reader.ShardReader` that holds only those rows.

The buffer is an anonymous memory map of the shard's size: pages never written take no memory, and the map
is returned to the system when the reader is dropped.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_patterns.data.shards.blocks import BlockTable, merge_ranges
from lightning_patterns.data.shards.manifest import ShardInfo
from lightning_patterns.data.shards.reader import ShardFormatError, ShardHeader, ShardReader, parse_header
from lightning_patterns.data.shards.schema import Schema
from lightning_patterns.exceptions import ChecksumMismatchError

__all__ = ["FetchRanges", "ShardHead", "fetch_head", "fetch_rows", "row_block_ranges"]

FetchRanges = Callable[[list[tuple[int, int]], memoryview], None]
"""Fetches each ``[start, stop)`` byte range of the shard into the same bytes of the given buffer."""


@dataclass(frozen=True)
class ShardHead:
    """A shard's verified head: its header and block table, trusted without the rest of the file.

    Args:
        shard: the shard's manifest entry.
        header: the checked header.
        data: the head's bytes ``[0, shard.head_bytes)``.
        url: the shard's URL, named in errors.
    """

    shard: ShardInfo
    header: ShardHeader
    data: bytes
    url: str

    @property
    def blocks(self) -> BlockTable:
        """The block table's layout."""
        assert self.header.blocks is not None  # fetch_head only returns heads with a table
        return self.header.blocks

    @property
    def digests(self) -> memoryview:
        """The block table: one sha256 digest per block."""
        return memoryview(self.data)[self.blocks.table_offset : self.blocks.table_stop]


def fetch_head(
    read_range: Callable[[int, int], bytes | bytearray],
    shard: ShardInfo,
    schema: Schema | None,
    url: str,
    *,
    verify: bool = True,
) -> ShardHead:
    """Read and check the head of ``shard``: one request for ``[0, head_bytes)``.

    Args:
        read_range: returns bytes ``[start, stop)`` of the shard file.
        shard: its manifest entry, which must record the head (``shard.has_blocks``).
        schema: the dataset's schema (``None`` skips that comparison).
        url: the shard's URL, named in errors.
        verify: check the head against the manifest's ``head_checksum``.

    Returns:
        The head.

    Raises:
        ValueError: the manifest records no head for the shard.
        ChecksumMismatchError: the head's bytes differ from ``head_checksum``.
        ShardFormatError: the header fails a check of :func:`~.reader.parse_header`, or disagrees with the
            manifest about the head's size.
    """
    if shard.head_bytes is None or shard.head_checksum is None:
        raise ValueError(
            f"Shard {url!r} has no block table recorded in the manifest, so it can only be read whole: use fetch_shard."
        )
    data = bytes(read_range(0, shard.head_bytes))
    if verify:
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != shard.head_checksum:
            raise ChecksumMismatchError(
                f"Shard {url!r}: its head (bytes [0, {shard.head_bytes}): header and block table) does not match "
                f"the manifest: expected {shard.head_checksum} got {actual}. The remote object is corrupt or the "
                "manifest is stale: write the shard again, or regenerate the manifest from the data you trust."
            )
    header = parse_header(data, shard.num_bytes, schema, url=url, num_samples=shard.num_samples)
    if header.head_bytes != shard.head_bytes:
        raise ShardFormatError(
            f"Shard {url!r}: its header puts the body at byte {header.head_bytes}, but the manifest records "
            f"head_bytes={shard.head_bytes}. The shard and the manifest disagree: rewrite the dataset."
        )
    return ShardHead(shard, header, data, url)


def _runs(blocks: set[int], table: BlockTable) -> list[tuple[int, int]]:
    """Byte ranges of maximal runs of consecutive blocks."""
    ranges: list[tuple[int, int]] = []
    for block in sorted(blocks):
        start, stop = table.bounds(block)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def _blocks(table: BlockTable, ranges: Sequence[tuple[int, int]]) -> set[int]:
    return {block for start, stop in ranges for block in table.blocks_of(start, stop)}


def row_block_ranges(head: ShardHead, rows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Whole-block byte ranges holding rows ``rows`` of every fixed-size column and variable-length index.

    The payload of a variable-length column is located through its index, so it is not included (see
    :func:`fetch_rows`).
    """
    wanted = []
    for start, stop in merge_ranges(rows):
        for name, extent in head.header.columns.items():
            if extent.index_offset is not None:
                wanted.append((extent.index_offset + 8 * start, extent.index_offset + 8 * (stop + 1)))
            else:
                row = head.header.schema[name].sample_nbytes
                wanted.append((extent.offset + start * row, extent.offset + stop * row))
    return _runs(_blocks(head.blocks, wanted), head.blocks)


def _payload_ranges(head: ShardHead, buffer: memoryview, rows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of the payload that rows ``rows`` of each variable-length column point at (clipped to it)."""
    wanted = []
    for start, stop in merge_ranges(rows):
        for extent in head.header.columns.values():
            if extent.index_offset is None:
                continue
            first = int(np.frombuffer(buffer, dtype="<u8", count=1, offset=extent.index_offset + 8 * start)[0])
            last = int(np.frombuffer(buffer, dtype="<u8", count=1, offset=extent.index_offset + 8 * stop)[0])
            # A corrupt index is reported by the reader's checks; only what lies in the payload is fetched.
            lo, hi = min(first, extent.nbytes), min(max(first, last), extent.nbytes)
            wanted.append((extent.offset + lo, extent.offset + hi))
    return wanted


def fetch_rows(
    head: ShardHead,
    rows: Sequence[tuple[int, int]],
    fetch: FetchRanges,
    *,
    verify: bool = True,
) -> ShardReader:
    """Fetch rows ``rows`` of the shard whose head is ``head``, and nothing of the others beyond whole blocks.

    Args:
        head: the shard's verified head (:func:`fetch_head`).
        rows: ``[start, stop)`` ranges of rows to read.
        fetch: fetches byte ranges of the shard into a buffer (in parallel, if it likes).
        verify: check every block fetched against the block table.

    Returns:
        A reader holding only ``rows`` (reading another row raises ``IndexError``).

    Raises:
        ChecksumMismatchError: a block differs from its digest, naming the block and the shard.
        ShardFormatError: an index of the rows read is corrupt, or a ``str`` value is not UTF-8.
    """
    shard, table = head.shard, head.blocks
    present = merge_ranges(rows)
    # Anonymous and of the shard's size: pages never written take no memory, and offsets stay the file's.
    region = mmap.mmap(-1, shard.num_bytes)
    buffer = memoryview(region)
    buffer[: len(head.data)] = head.data
    fetched: set[int] = set()
    for phase in (row_block_ranges(head, present), None):
        if phase is None:
            needed = _blocks(table, _payload_ranges(head, buffer, present)) - fetched
            if not needed:
                break
            phase = _runs(needed, table)
        fetch(phase, buffer)
        if verify:
            for start, stop in phase:
                table.verify(buffer[start:stop], start, head.digests, head.url)
        fetched |= _blocks(table, phase)
    return ShardReader(buffer, head.header.schema, url=head.url, num_samples=shard.num_samples, rows=present)
