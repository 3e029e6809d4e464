"""Encoding samples as one ``.lps`` shard (see :mod:`.layout`), with the exact file size known in advance."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_patterns.data.shards.layout import ALIGN, MAGIC, PREFIX, align, data_start, encode_header, field_entry
from lightning_patterns.data.shards.schema import FieldSpec, Schema

__all__ = ["ShardBuilder", "encode_shard"]


class ShardBuilder:
    """Accumulates normalized samples (see :meth:`Schema.normalize`) column by column and encodes a shard.

    The header region has a fixed size per schema, so the exact file size is known before encoding; see
    :attr:`file_size` and :meth:`file_size_with`.

    Args:
        schema: the schema every appended sample was checked against.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._rows: list[list[Any]] = []
        self._data_start = data_start(schema)
        specs = list(schema.values())
        self._fixed_rows = [s.sample_nbytes for s in specs if s.shape is not None]
        self._varlen_positions = [i for i, s in enumerate(specs) if s.shape is None]
        self._varlen_payload = [0] * len(self._varlen_positions)
        self._capacity: tuple[int, int] | None = None  # (target, samples that fit) for fixed-size schemas
        self.num_samples = 0

    def _size(self, n: int, payloads: list[int]) -> int:
        size = self._data_start
        for row in self._fixed_rows:
            size += -(-n * row // ALIGN) * ALIGN
        for payload in payloads:
            size += -(-8 * (n + 1) // ALIGN) * ALIGN + -(-payload // ALIGN) * ALIGN
        return size

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
                n = max(0, (target - self._data_start) // row) + 1
                while n > 0 and self._size(n, []) > target:
                    n -= 1
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

    def finish(self) -> bytes:
        """Encode the accumulated samples as one ``.lps`` shard of exactly :attr:`file_size` bytes."""
        n = self.num_samples
        fields: dict[str, Any] = {}
        parts: list[bytes | memoryview] = []
        pos = self._data_start

        def place(chunk: bytes | memoryview) -> int:
            nonlocal pos
            at = pos
            pos = align(at + len(chunk))
            parts.extend((chunk, bytes(pos - at - len(chunk))))
            return at

        columns: list[Any] = list(zip(*self._rows, strict=True)) if self._rows else [() for _ in self.schema]
        for (name, spec), column in zip(self.schema.items(), columns, strict=True):
            if spec.shape is None:
                index = np.zeros(n + 1, dtype="<u8")
                np.cumsum(np.fromiter(map(len, column), dtype=np.uint64, count=n), out=index[1:])
                payload = b"".join(column)
                index_at = place(index.data.cast("B"))
                fields[name] = field_entry(spec, place(payload), len(payload), index_at)
            else:
                data = _fixed_column(column, spec, n)
                fields[name] = field_entry(spec, place(data), len(data), None)
        header_room = self._data_start - PREFIX.size
        header = encode_header(n, fields).ljust(header_room, b" ")  # JSON allows trailing whitespace
        return b"".join([PREFIX.pack(MAGIC, header_room), header, *parts])


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


def encode_shard(samples: Sequence[Mapping[str, Any]], schema: Schema) -> bytes:
    """Encode ``samples`` (each checked against ``schema``) as one ``.lps`` shard."""
    builder = ShardBuilder(schema)
    for sample in samples:
        builder.append(schema.normalize(sample))
    return builder.finish()
