"""Encoding samples as one ``.lps`` shard (see :mod:`.layout`), with the exact file size known in advance."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_patterns.data.shards.blocks import block_digests
from lightning_patterns.data.shards.layout import (
    ALIGN,
    DEFAULT_BLOCK_BYTES,
    DIGEST_BYTES,
    MAGIC,
    MIN_BLOCK_BYTES,
    PREFIX,
    align,
    blocks_entry,
    data_start,
    encode_header,
    field_entry,
    table_nbytes,
)
from lightning_patterns.data.shards.schema import FieldSpec, Schema

__all__ = ["ShardBuilder", "check_block_bytes", "encode_shard"]


class ShardBuilder:
    """Accumulates normalized samples (see :meth:`Schema.normalize`) column by column and encodes a shard.

    The header region has a fixed size per schema, so the exact file size is known before encoding; see
    :attr:`file_size` and :meth:`file_size_with`.

    Args:
        schema: the schema every appended sample was checked against.
        block_bytes: bytes per checksummed block of the body (see :mod:`.layout`), ``>= 4096``; ``None`` writes
            no block table (the format of shards written before it existed, read and verified only whole). A
            shard whose body fits in one block gets no table either: any part of it means all of it.

    Raises:
        ValueError: ``block_bytes`` out of range.
    """

    def __init__(self, schema: Schema, *, block_bytes: int | None = DEFAULT_BLOCK_BYTES) -> None:
        self.schema = schema
        self.block_bytes = check_block_bytes(block_bytes)
        self._rows: list[list[Any]] = []
        self._data_start = data_start(schema)
        self._data_start_blocks = data_start(schema, blocks=True)
        specs = list(schema.values())
        self._fixed_rows = [s.sample_nbytes for s in specs if s.shape is not None]
        self._varlen_positions = [i for i, s in enumerate(specs) if s.shape is None]
        self._varlen_payload = [0] * len(self._varlen_positions)
        self._capacity: tuple[int, int] | None = None  # (target, samples that fit) for fixed-size schemas
        self.num_samples = 0

    def _size(self, n: int, payloads: list[int]) -> int:
        body = 0
        for row in self._fixed_rows:
            body += -(-n * row // ALIGN) * ALIGN
        for payload in payloads:
            body += -(-8 * (n + 1) // ALIGN) * ALIGN + -(-payload // ALIGN) * ALIGN
        return self._head_layout(body)[1] + body

    def _head_layout(self, body: int) -> tuple[int, int]:
        """``(table_offset, body_start)`` for a body of ``body`` bytes; ``table_offset`` is -1 without a table."""
        if self.block_bytes is None or body <= self.block_bytes:
            return -1, self._data_start
        return self._data_start_blocks, self._data_start_blocks + table_nbytes(body, self.block_bytes)

    @property
    def file_size(self) -> int:
        """The exact size in bytes the shard has if encoded now."""
        return self._size(self.num_samples, self._varlen_payload)

    def file_size_with(self, values: list[Any]) -> int:
        """The exact size of the shard after appending ``values`` (one normalized sample)."""
        payloads = [p + len(values[i]) for p, i in zip(self._varlen_payload, self._varlen_positions, strict=True)]
        return self._size(self.num_samples + 1, payloads)

    def fits(self, values: list[Any], target: int) -> bool:
        """Whether the shard stays within ``target`` bytes after appending ``values``."""
        if self._varlen_positions:
            return self.file_size_with(values) <= target
        # Fixed-size samples: the size depends on the count alone, so find the capacity once.
        if self._capacity is None or self._capacity[0] != target:
            row = sum(self._fixed_rows)
            if row:
                # The size grows with the count (by a step where a block table appears): the largest count
                # that fits, by bisection below a bound that cannot fit.
                n, too_many = 0, max(0, (target - self._data_start) // row) + 1
                while too_many - n > 1:
                    middle = (n + too_many) // 2
                    n, too_many = (middle, too_many) if self._size(middle, []) <= target else (n, middle)
                if self._size(too_many, []) <= target:
                    n = too_many
            else:  # only zero-size fields: any number of samples fits in the header's room
                n = sys.maxsize if self._data_start <= target else 0
            self._capacity = (target, n)
        return self.num_samples < self._capacity[1]

    def append(self, values: list[Any]) -> None:
        """Add one sample's values, as returned by :meth:`Schema.normalize`."""
        self._rows.append(values)
        if self._varlen_positions:
            for k, i in enumerate(self._varlen_positions):
                self._varlen_payload[k] += len(values[i])
        self.num_samples += 1

    def finish(self) -> bytearray:
        """Encode the accumulated samples as one ``.lps`` shard of exactly :attr:`file_size` bytes."""
        n = self.num_samples
        columns: list[Any] = list(zip(*self._rows, strict=True)) if self._rows else [() for _ in self.schema]
        # Every column's bytes first, so that the body's size (and so the block table's) is known.
        parts: list[tuple[str, Any, Any]] = []
        for (name, spec), column in zip(self.schema.items(), columns, strict=True):
            if spec.shape is None:
                index = np.zeros(n + 1, dtype="<u8")
                np.cumsum(np.fromiter(map(len, column), dtype=np.uint64, count=n), out=index[1:])
                parts.append((name, index.data.cast("B"), b"".join(column)))
            else:
                parts.append((name, None, _fixed_column(column, spec, n)))
        body = sum(align(len(index)) if index is not None else 0 for _, index, _ in parts)
        body += sum(align(len(payload)) for _, _, payload in parts)
        table_offset, start = self._head_layout(body)
        out = bytearray(start + body)  # one buffer, filled in place: no second copy of the shard
        fields: dict[str, Any] = {}
        pos = start

        def place(chunk: Any) -> int:
            nonlocal pos
            at = pos
            out[at : at + len(chunk)] = chunk
            pos = align(at + len(chunk))
            return at

        for (name, spec), (_, index, payload) in zip(self.schema.items(), parts, strict=True):
            index_at = None if index is None else place(index)
            fields[name] = field_entry(spec, place(payload), len(payload), index_at)
        blocks = None
        header_end = self._data_start
        if table_offset >= 0:
            assert self.block_bytes is not None
            digests = block_digests(memoryview(out)[start:], self.block_bytes)
            out[table_offset : table_offset + len(digests)] = digests
            blocks = blocks_entry(self.block_bytes, start, table_offset, len(digests) // DIGEST_BYTES)
            header_end = table_offset
        header_room = header_end - PREFIX.size
        header = encode_header(n, fields, blocks).ljust(header_room, b" ")  # JSON allows trailing whitespace
        out[:header_end] = PREFIX.pack(MAGIC, header_room) + header
        return out


def _fixed_column(column: Sequence[Any], spec: FieldSpec, n: int) -> bytes | memoryview:
    # Values were checked to be little-endian arrays/scalars of the right dtype and shape, or Python scalars;
    # joining their buffers is the fastest gather. Python scalars and non-contiguous arrays take numpy's path.
    try:
        data = b"".join(column)
    except (TypeError, BufferError):
        pass
    else:
        if len(data) == n * spec.sample_nbytes:
            return data
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    assert spec.shape is not None
    if n == 0:
        array = np.empty((0, *spec.shape), dtype=dtype)
    elif spec.shape == ():
        array = np.asarray(column, dtype=dtype)
    else:
        array = np.stack(column).astype(dtype, copy=False)
    return np.ascontiguousarray(array).data.cast("B")


def check_block_bytes(block_bytes: int | None) -> int | None:
    """``block_bytes`` if it is ``None`` or an int ``>= 4096``, else raise ``ValueError`` saying so."""
    if block_bytes is None:
        return None
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < MIN_BLOCK_BYTES:
        raise ValueError(
            f"`block_bytes` must be a number of bytes >= {MIN_BLOCK_BYTES} or None (no block table), got "
            f"block_bytes={block_bytes!r}. The default, {DEFAULT_BLOCK_BYTES}, suits most datasets."
        )
    return block_bytes


def encode_shard(
    samples: Sequence[Mapping[str, Any]], schema: Schema, *, block_bytes: int | None = DEFAULT_BLOCK_BYTES
) -> bytes:
    """Encode ``samples`` (each checked against ``schema``) as one ``.lps`` shard (see :class:`ShardBuilder`)."""
    builder = ShardBuilder(schema, block_bytes=block_bytes)
    for sample in samples:
        builder.append(schema.normalize(sample))
    return bytes(builder.finish())
