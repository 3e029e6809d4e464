"""Reading ``.lps`` shards (see :mod:`.layout`): every check of a header in one function, then random access.

:func:`parse_header` holds every check a shard's header must pass, from its first bytes and the file's size
alone; :class:`ShardReader` (a whole shard in memory) and :func:`read_column` (one column through range
reads) both go through it, so a check added there guards both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_patterns.data.shards.layout import MAGIC, PREFIX
from lightning_patterns.data.shards.schema import FieldSpec, Schema
from lightning_patterns.exceptions import SchemaMismatchError

__all__ = [
    "ColumnExtent",
    "ShardFormatError",
    "ShardHeader",
    "ShardReader",
    "header_end",
    "parse_header",
    "read_column",
]


class ShardFormatError(ValueError):
    """A buffer is not a valid ``.lps`` shard: wrong magic, truncated, or a corrupt header."""


@dataclass(frozen=True)
class ColumnExtent:
    """Where one field's column lies in the shard file, as its header says.

    Args:
        offset: first byte of the column (of the payload, for variable-length fields).
        nbytes: bytes of the column (of the payload).
        index_offset: first byte of the ``n + 1`` u64 offsets of a variable-length field; ``None`` otherwise.
    """

    offset: int
    nbytes: int
    index_offset: int | None


@dataclass(frozen=True)
class ShardHeader:
    """A shard's header after every check of :func:`parse_header`.

    Args:
        num_samples: samples in the shard.
        schema: its fields' dtypes and shapes.
        columns: field name to where its column lies, inside the file.
    """

    num_samples: int
    schema: Schema
    columns: Mapping[str, ColumnExtent] = field(hash=False)


def header_end(head: bytes | bytearray | memoryview, size: int) -> int:
    """Check a shard's fixed prefix (magic and header length) and return where its header ends.

    Args:
        head: the file's first bytes, at least the prefix (16 bytes) unless the file is shorter.
        size: the whole file's size in bytes.

    Returns:
        The offset one past the header's JSON text.

    Raises:
        ShardFormatError: wrong magic, or the file too short for the prefix or the header it announces.
    """
    if size < PREFIX.size or len(head) < PREFIX.size:
        raise ShardFormatError(
            f"Shard is truncated: {min(size, len(head))} bytes, but even the fixed prefix needs {PREFIX.size}. "
            f"Re-fetch or rewrite the shard."
        )
    magic, header_len = PREFIX.unpack_from(head, 0)
    if magic != MAGIC:
        raise ShardFormatError(f"Not a lightning_patterns shard: magic is {magic!r}, expected {MAGIC!r}.")
    if PREFIX.size + header_len > size:
        raise ShardFormatError(
            f"Shard is truncated: the header claims {header_len} bytes but only {size - PREFIX.size} follow "
            f"the prefix. Re-fetch or rewrite the shard."
        )
    return int(PREFIX.size + header_len)


def parse_header(head: bytes | bytearray | memoryview, size: int, schema: Schema | None = None) -> ShardHeader:
    """Parse and check a shard's header: every check a header must pass before any sample is read.

    Args:
        head: the file's first bytes, through the end of the header at least (the whole file will do).
        size: the whole file's size in bytes; every column must lie inside it.
        schema: when given, the shard's fields must match it exactly.

    Returns:
        The checked header.

    Raises:
        ShardFormatError: wrong magic, truncated, a corrupt header, or a column outside the file or of the
            wrong length.
        SchemaMismatchError: the shard does not match ``schema``.
    """
    end = header_end(head, size)
    if len(head) < end:
        raise ShardFormatError(
            f"Shard header is incomplete: {len(head)} bytes given, the header ends at byte {end}. Pass the whole "
            f"header."
        )
    try:
        header = json.loads(bytes(head[PREFIX.size : end]))
        n = header["num_samples"]
        fields = header["fields"]
        if not isinstance(n, int) or n < 0 or not isinstance(fields, dict):
            raise TypeError("num_samples or fields has the wrong type")
        found = Schema({k: FieldSpec(v["dtype"], _shape(v["shape"])) for k, v in fields.items()})
    except (ValueError, KeyError, TypeError) as err:
        raise ShardFormatError(f"Shard header is corrupt ({err}); re-fetch or rewrite the shard.") from err
    if schema is not None and schema != found:
        raise SchemaMismatchError(f"Shard does not match the expected schema: {schema.describe_difference(found)}.")
    columns = {name: _extent(name, spec, fields[name], n, size) for name, spec in found.items()}
    return ShardHeader(n, found, columns)


def _extent(name: str, spec: FieldSpec, entry: dict[str, Any], n: int, size: int) -> ColumnExtent:
    try:
        offset, nbytes, index_offset = int(entry["offset"]), int(entry["nbytes"]), entry["index_offset"]
    except (KeyError, TypeError, ValueError) as err:
        raise ShardFormatError(f"Shard header entry for field {name!r} is corrupt ({err}).") from err
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise ShardFormatError(
            f"Shard is truncated or corrupt: field {name!r} spans bytes [{offset}, {offset + nbytes}) of a "
            f"{size}-byte buffer. Re-fetch or rewrite the shard."
        )
    if spec.shape is None:
        if not isinstance(index_offset, int) or index_offset < 0 or index_offset + 8 * (n + 1) > size:
            raise ShardFormatError(f"Shard index of field {name!r} lies outside the {size}-byte buffer.")
        return ColumnExtent(offset, nbytes, index_offset)
    row = spec.sample_nbytes
    if row * n != nbytes:
        raise ShardFormatError(
            f"Shard field {name!r} has {nbytes} bytes, expected {n} samples x {row} bytes = {n * row}."
        )
    return ColumnExtent(offset, nbytes, None)


def _shape(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(d, int) for d in value):
        raise TypeError(f"shape {value!r} is not a list of ints")
    return tuple(value)


@dataclass(frozen=True)
class _Column:
    spec: FieldSpec
    offset: int
    nbytes: int
    index: np.ndarray | None  # n + 1 offsets into the payload for variable-length fields
    np_dtype: np.dtype[Any] | None
    row_nbytes: int


class ShardReader:
    """Random access to the samples of one ``.lps`` shard held in memory.

    Numeric fields come back as ``torch.Tensor`` (0-d for scalars), ``bytes`` fields as ``bytes`` and ``str``
    fields as ``str``. :meth:`read_range` returns tensors that share memory with ``buffer`` when it is
    writable (a ``bytearray``, or an ``mmap`` opened with ``ACCESS_COPY`` or ``ACCESS_WRITE``); with a
    read-only buffer (``bytes``, a read-only ``mmap``) it copies the slice once, because ``torch`` cannot
    safely share read-only memory. Keep the buffer alive and unchanged while tensors from it are in use.

    Args:
        buffer: the whole shard file as a bytes-like object.
        schema: when given, the shard's fields must match it exactly.

    Raises:
        ShardFormatError: ``buffer`` is not a valid shard (wrong magic, truncated, corrupt header).
        SchemaMismatchError: the shard does not match ``schema``.
    """

    def __init__(self, buffer: bytes | bytearray | memoryview | Any, schema: Schema | None = None) -> None:
        view = memoryview(buffer).cast("B")
        self._buffer = view
        self._writable = not view.readonly
        header = parse_header(view, len(view), schema)
        self.header = header
        self.schema = header.schema
        self.num_samples: int = header.num_samples
        self._columns = {name: self._column(name, spec, header.columns[name]) for name, spec in self.schema.items()}

    def _column(self, name: str, spec: FieldSpec, extent: ColumnExtent) -> _Column:
        if extent.index_offset is None:
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            return _Column(spec, extent.offset, extent.nbytes, None, dtype, spec.sample_nbytes)
        # The index lies in the body, which parse_header does not read: its order is checked here.
        n = self.num_samples
        index = np.frombuffer(self._buffer, dtype="<u8", count=n + 1, offset=extent.index_offset).astype(np.int64)
        if index[0] != 0 or index[-1] != extent.nbytes or (n and bool(np.any(index[1:] < index[:-1]))):
            raise ShardFormatError(f"Shard index of field {name!r} is corrupt; re-fetch or rewrite the shard.")
        return _Column(spec, extent.offset, extent.nbytes, index, None, 0)

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, i: int) -> int:
        n = self.num_samples
        if not -n <= i < n:
            raise IndexError(f"Sample index {i} is out of range for a shard of {n} samples.")
        return i + n if i < 0 else i

    def _rows(self, column: _Column, start: int, count: int) -> np.ndarray:
        assert column.np_dtype is not None
        assert column.spec.shape is not None
        per_row = math.prod(column.spec.shape)
        flat = np.frombuffer(
            self._buffer, dtype=column.np_dtype, count=count * per_row, offset=column.offset + start * column.row_nbytes
        )
        return flat.reshape(count, *column.spec.shape)

    def _varlen(self, column: _Column, i: int) -> bytes | str:
        assert column.index is not None
        data = self._buffer[column.offset + int(column.index[i]) : column.offset + int(column.index[i + 1])].tobytes()
        return data.decode("utf-8") if column.spec.dtype == "str" else data

    def read(self, i: int) -> dict[str, Any]:
        """Decode sample ``i`` (negative indices count from the end)."""
        import torch  # here, not at the top: reading a header (a light command) needs no torch

        i = self._check_index(i)
        out: dict[str, Any] = {}
        for name, column in self._columns.items():
            if column.index is not None:
                out[name] = self._varlen(column, i)
            else:
                out[name] = torch.from_numpy(self._rows(column, i, 1).reshape(column.spec.shape or ()).copy())
        return out

    def read_range(self, start: int, stop: int) -> dict[str, Any]:
        """Decode samples ``start`` to ``stop`` (exclusive) as a batch: tensors of shape ``(k, *shape)``, lists."""
        import torch  # here, not at the top: reading a header (a light command) needs no torch

        n = self.num_samples
        if not 0 <= start <= stop <= n:
            raise IndexError(f"Range [{start}, {stop}) is invalid for a shard of {n} samples; need 0 <= start <= stop.")
        out: dict[str, Any] = {}
        for name, column in self._columns.items():
            if column.index is not None:
                out[name] = [self._varlen(column, i) for i in range(start, stop)]
            else:
                rows = self._rows(column, start, stop - start)
                out[name] = torch.from_numpy(rows if self._writable else rows.copy())
        return out

    def read_field(self, field: str, indices: np.ndarray) -> np.ndarray:
        """The values of one fixed-size ``field`` at ``indices``, as a numpy array (no other field decoded)."""
        column = self._columns[field]
        if column.index is not None:
            raise ValueError(f"Field {field!r} has variable length; read_field reads fixed-size fields only.")
        return self._rows(column, 0, self.num_samples)[np.asarray(indices, dtype=np.int64)]

    def read_batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, Any]:
        """Decode the samples at ``indices`` (any order, repeats allowed) as a batch, like :meth:`read_range`."""
        import torch  # here, not at the top: reading a header (a light command) needs no torch

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"Indices must lie in [{-n}, {n}) for a shard of {n} samples.")
        idx = np.where(idx < 0, idx + n, idx)
        out: dict[str, Any] = {}
        for name, column in self._columns.items():
            if column.index is not None:
                out[name] = [self._varlen(column, int(i)) for i in idx]
            else:
                out[name] = torch.from_numpy(self._rows(column, 0, n)[idx])  # fancy indexing copies
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.num_samples):
            yield self.read(i)


def read_column(
    read_range: Callable[[int, int], bytes], field: str, *, size: int, schema: Schema | None = None
) -> np.ndarray:
    """One fixed-size field of a shard, read through byte ranges: the header, then that column only.

    The columnar layout lets a reader learn, say, every label of a remote shard without fetching its
    images: three small range requests (prefix, header, column) instead of the whole file. The header
    passes the same checks (:func:`parse_header`) as in a :class:`ShardReader`.

    Args:
        read_range: returns bytes ``[start, end)`` of the shard file.
        field: a fixed-size field of the schema.
        size: the shard file's size in bytes (the manifest's ``num_bytes``).
        schema: when given, the shard's fields must match it exactly.

    Returns:
        The column, shape ``(num_samples, *shape)``.

    Raises:
        ShardFormatError: the header fails a check of :func:`parse_header`.
        SchemaMismatchError: the shard does not match ``schema``.
        KeyError: the shard has no field ``field``.
        ValueError: ``field`` has variable length.
    """
    head = bytes(read_range(0, min(PREFIX.size, size)))
    head += read_range(PREFIX.size, header_end(head, size))
    header = parse_header(head, size, schema)
    extent = header.columns.get(field)
    if extent is None:
        raise KeyError(f"The shard has no field {field!r}; its fields are {sorted(header.columns)}.")
    spec = header.schema[field]
    if spec.shape is None:
        raise ValueError(f"Field {field!r} has variable length; read_column reads fixed-size fields only.")
    data = read_range(extent.offset, extent.offset + extent.nbytes)
    return np.frombuffer(data, dtype=np.dtype(spec.dtype).newbyteorder("<")).reshape(header.num_samples, *spec.shape)
