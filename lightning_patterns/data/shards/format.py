"""The ``.lps`` shard format: a small JSON header, then one contiguous column per field.

Layout (little-endian, offsets relative to the start of the file, every region 64-byte aligned)::

    b"LPSHRD01"                 8-byte magic
    u64 H                       header length in bytes
    H bytes of UTF-8 JSON       {"num_samples": n,
                                 "fields": {name: {"dtype": ..., "shape": [...] or null,
                                                   "offset": o, "nbytes": b, "index_offset": int or null}}}
    columns                     fixed-size field: n * prod(shape) * itemsize bytes in C order;
                                variable-length field ("bytes"/"str"): n + 1 u64 offsets at ``index_offset``
                                (relative to ``offset``), then the concatenated payload at ``offset``.

Being columnar, a whole batch of a numeric field decodes with one ``numpy`` slice, and any single sample
is reached through the offset arithmetic or the index, never by scanning. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_patterns.exceptions import SchemaMismatchError

__all__ = [
    "FieldSpec",
    "MAGIC",
    "Schema",
    "ShardBuilder",
    "ShardFormatError",
    "ShardReader",
    "encode_shard",
    "read_column",
]

MAGIC = b"LPSHRD01"
_ALIGN = 64
_PREFIX = struct.Struct("<8sQ")

# Every numpy dtype that round-trips through ``torch.from_numpy``.
_NUMERIC_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)
_VARLEN_DTYPES = frozenset(["bytes", "str"])
_TORCH_TO_NUMPY = {getattr(torch, name): name for name in _NUMERIC_DTYPES}


class ShardFormatError(ValueError):
    """A buffer is not a valid ``.lps`` shard: wrong magic, truncated, or a corrupt header."""


@dataclass(frozen=True)
class FieldSpec:
    """The type of one field of every sample.

    Args:
        dtype: a numpy dtype name (``"uint8"``, ``"int64"``, ``"float32"``, ``"bool"``, ...) or ``"bytes"``/``"str"``.
        shape: the per-sample shape, ``()`` for scalars, ``None`` for variable-length ``bytes``/``str``.
    """

    dtype: str
    shape: tuple[int, ...] | None

    def __post_init__(self) -> None:
        if self.dtype in _VARLEN_DTYPES:
            if self.shape is not None:
                raise ValueError(f"FieldSpec(dtype={self.dtype!r}) is variable-length; expected shape=None.")
        elif self.dtype in _NUMERIC_DTYPES:
            if self.shape is None or any(not isinstance(d, int) or d < 0 for d in self.shape):
                raise ValueError(f"FieldSpec(dtype={self.dtype!r}) needs a tuple of non-negative ints as shape.")
        else:
            raise ValueError(
                f"Unsupported dtype {self.dtype!r}. "
                f"Expected one of: {', '.join(sorted(_NUMERIC_DTYPES | _VARLEN_DTYPES))}."
            )

    @property
    def variable_length(self) -> bool:
        """Whether the field is ``bytes``/``str``, stored with an offset index."""
        return self.shape is None

    @property
    def sample_nbytes(self) -> int:
        """Bytes one sample of a fixed-size field takes (0 for variable-length fields)."""
        if self.shape is None:
            return 0
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def describe(self) -> str:
        """A short human-readable form, used in error messages: ``uint8[28, 28]``, ``int64`` (a scalar), ``str``."""
        if not self.shape:
            return self.dtype
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


def _spec_of(field: str, value: Any) -> FieldSpec:
    """Infer the spec of one value; see :class:`Schema` for the supported types."""
    if isinstance(value, str):
        return FieldSpec("str", None)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return FieldSpec("bytes", None)
    if isinstance(value, bool):
        return FieldSpec("bool", ())
    if isinstance(value, int):
        return FieldSpec("int64", ())
    if isinstance(value, float):
        return FieldSpec("float64", ())
    if isinstance(value, torch.Tensor):
        name = _TORCH_TO_NUMPY.get(value.dtype)
        if name is None:
            raise TypeError(
                f"Field {field!r} is a tensor of dtype {value.dtype}, which has no numpy equivalent. "
                f"Convert it first, for example `tensor.float()`."
            )
        return FieldSpec(name, tuple(value.shape))
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.name in _NUMERIC_DTYPES:
        return FieldSpec(value.dtype.name, tuple(value.shape))
    raise TypeError(
        f"Field {field!r} has unsupported type {type(value).__name__}"
        f"{f' with dtype {value.dtype}' if hasattr(value, 'dtype') else ''}. Expected a torch.Tensor or numpy "
        f"array/scalar of a numeric dtype, a Python int/float/bool, bytes, or str."
    )


class Schema(Mapping[str, FieldSpec]):
    """Field name to :class:`FieldSpec`, in the order the fields first appeared.

    Supported sample values: ``torch.Tensor`` and ``numpy`` arrays/scalars of a numeric dtype (fixed shape),
    Python ``bool`` (``"bool"``), ``int`` (``"int64"``), ``float`` (``"float64"``), ``bytes`` and ``str``
    (variable length). A Python scalar is also accepted for any field of the same kind (an ``int`` for an
    ``"int32"`` field, say), so a schema read from a manifest takes plain Python values.

    Args:
        fields: field name to spec.
    """

    def __init__(self, fields: Mapping[str, FieldSpec]) -> None:
        if not fields:
            raise ValueError("A schema needs at least one field; got an empty sample. Samples must be non-empty dicts.")
        for name in fields:
            if not isinstance(name, str) or not name:
                raise ValueError(f"Field names must be non-empty strings; got {name!r}.")
        self._fields = dict(fields)
        self._order = tuple(self._fields)
        self._np_dtypes = {
            n: np.dtype(s.dtype).newbyteorder("<") for n, s in self._fields.items() if s.shape is not None
        }
        self._torch_dtypes = {n: getattr(torch, s.dtype) for n, s in self._fields.items() if s.shape is not None}
        self._plan = [
            (n, s.shape, self._np_dtypes.get(n), self._torch_dtypes.get(n), "U" if s.dtype == "str" else "S")
            if s.shape is None
            else (n, s.shape, self._np_dtypes[n], self._torch_dtypes[n], self._np_dtypes[n].kind)
            for n, s in self._fields.items()
        ]

    @classmethod
    def infer(cls, sample: Mapping[str, Any]) -> Schema:
        """Infer the schema from one sample."""
        if not isinstance(sample, Mapping):
            raise TypeError(f"A sample must be a dict of field name to value; got {type(sample).__name__}.")
        return cls({field: _spec_of(field, value) for field, value in sample.items()})

    def __getitem__(self, field: str) -> FieldSpec:
        return self._fields[field]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Schema):
            return self._fields == other._fields
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._fields.items())))

    def __repr__(self) -> str:
        return f"Schema({{{', '.join(f'{k!r}: {v.describe()}' for k, v in self._fields.items())}}})"

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in manifests: ``{field: {"dtype": ..., "shape": [...] or null}}``."""
        return {
            name: {"dtype": spec.dtype, "shape": None if spec.shape is None else list(spec.shape)}
            for name, spec in self._fields.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Schema:
        """Inverse of :meth:`to_json`; raises ``ValueError`` for a malformed entry."""
        if not isinstance(data, Mapping):
            raise ValueError(f"A schema must be a JSON object; got {type(data).__name__}.")
        fields = {}
        for name, entry in data.items():
            if not isinstance(entry, Mapping) or "dtype" not in entry or "shape" not in entry:
                raise ValueError(f"Schema entry for field {name!r} must have 'dtype' and 'shape'; got {entry!r}.")
            shape = entry["shape"]
            if shape is not None and not isinstance(shape, list):
                raise ValueError(f"Schema entry for field {name!r} has shape {shape!r}; expected a list or null.")
            fields[name] = FieldSpec(str(entry["dtype"]), None if shape is None else tuple(shape))
        return cls(fields)

    def describe_difference(self, other: Schema) -> str:
        """Explain how ``other`` differs from this schema, field by field."""
        parts = []
        for name in self._order:
            if name not in other:
                parts.append(f"field {name!r} ({self[name].describe()}) is missing")
            elif other[name] != self[name]:
                parts.append(f"field {name!r} is {other[name].describe()}, expected {self[name].describe()}")
        parts.extend(f"unexpected field {name!r} ({other[name].describe()})" for name in other if name not in self)
        return "; ".join(parts)

    def normalize(self, sample: Mapping[str, Any]) -> list[Any]:
        """Check ``sample`` against the schema and convert it for a :class:`ShardBuilder`.

        Returns:
            The values in schema order: numpy arrays/scalars or Python scalars for numeric fields, ``bytes``
            for variable-length ones.

        Raises:
            SchemaMismatchError: a field is missing, unexpected, or of another dtype or shape.
        """
        if type(sample) is not dict and not isinstance(sample, Mapping):
            raise TypeError(f"A sample must be a dict of field name to value; got {type(sample).__name__}.")
        if len(sample) != len(self._order):
            self._raise_field_set(sample)
        values: list[Any] = []
        # One pass over a precomputed plan: this runs once per sample, so it is kept lean.
        for name, shape, np_dtype, torch_dtype, np_kind in self._plan:
            try:
                value = sample[name]
            except KeyError:
                self._raise_field_set(sample)
            kind = type(value)
            if shape is None:
                if np_kind == "U":
                    if not isinstance(value, str):
                        self._mismatch(name, value)
                    value = value.encode("utf-8")
                elif kind is not bytes:
                    if not isinstance(value, (bytes, bytearray, memoryview)):
                        self._mismatch(name, value)
                    value = bytes(value)
            elif kind is np.ndarray or isinstance(value, np.generic):
                if value.dtype != np_dtype or value.shape != shape:
                    self._mismatch(name, value)
            elif isinstance(value, torch.Tensor):
                if value.dtype != torch_dtype or tuple(value.shape) != shape:
                    self._mismatch(name, value)
                value = value.numpy(force=True)
            # Python scalars are weakly typed: any field of their kind and shape () accepts them.
            elif not (
                shape == ()
                and (
                    (kind is int and np_kind in "iu")
                    or (kind is float and np_kind == "f")
                    or (kind is bool and np_kind == "b")
                )
            ):
                self._mismatch(name, value)
            values.append(value)
        return values

    def _mismatch(self, name: str, value: Any) -> None:
        try:
            got = _spec_of(name, value).describe()
        except TypeError:
            got = type(value).__name__
        expected = self._fields[name].describe()
        raise SchemaMismatchError(
            f"Field {name!r} is {got}, but the dataset schema expects {expected}. Every sample must have the same "
            f"dtype and shape per field: convert the value (for example "
            f"`np.asarray(x, dtype={self._fields[name].dtype!r})` or pad/crop it) before writing, or write it to a "
            f"new dataset."
        )

    def _raise_field_set(self, sample: Mapping[str, Any]) -> None:
        missing = [n for n in self._order if n not in sample]
        extra = [n for n in sample if n not in self._fields]
        raise SchemaMismatchError(
            f"Sample has fields {sorted(sample)}, but the dataset schema has {list(self._order)} "
            f"(missing: {missing}, unexpected: {extra}). Every sample must have the same fields: add the missing "
            f"ones or drop the unexpected ones before writing."
        )


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _header(n: int, fields: dict[str, Any]) -> bytes:
    return json.dumps({"num_samples": n, "fields": fields}, separators=(",", ":")).encode()


def _field_entry(spec: FieldSpec, offset: int, nbytes: int, index_offset: int | None) -> dict[str, Any]:
    shape = None if spec.shape is None else list(spec.shape)
    return {"dtype": spec.dtype, "shape": shape, "offset": offset, "nbytes": nbytes, "index_offset": index_offset}


def _data_start(schema: Schema) -> int:
    """Where the columns start: the header is padded to room for 20-digit numbers, so it never moves."""
    big = 10**19
    fields = {name: _field_entry(spec, big, big, big) for name, spec in schema.items()}
    return _align(_PREFIX.size + len(_header(big, fields)))


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
        self._data_start = _data_start(schema)
        specs = list(schema.values())
        self._fixed_rows = [s.sample_nbytes for s in specs if s.shape is not None]
        self._varlen_positions = [i for i, s in enumerate(specs) if s.shape is None]
        self._varlen_payload = [0] * len(self._varlen_positions)
        self._capacity: tuple[int, int] | None = None  # (target, samples that fit) for fixed-size schemas
        self.num_samples = 0

    def _size(self, n: int, payloads: list[int]) -> int:
        size = self._data_start
        for row in self._fixed_rows:
            size += -(-n * row // _ALIGN) * _ALIGN
        for payload in payloads:
            size += -(-8 * (n + 1) // _ALIGN) * _ALIGN + -(-payload // _ALIGN) * _ALIGN
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
            pos = _align(at + len(chunk))
            parts.extend((chunk, bytes(pos - at - len(chunk))))
            return at

        columns: list[Any] = list(zip(*self._rows, strict=True)) if self._rows else [() for _ in self.schema]
        for (name, spec), column in zip(self.schema.items(), columns, strict=True):
            if spec.shape is None:
                index = np.zeros(n + 1, dtype="<u8")
                np.cumsum(np.fromiter(map(len, column), dtype=np.uint64, count=n), out=index[1:])
                payload = b"".join(column)
                index_at = place(index.data.cast("B"))
                fields[name] = _field_entry(spec, place(payload), len(payload), index_at)
            else:
                data = _fixed_column(column, spec, n)
                fields[name] = _field_entry(spec, place(data), len(data), None)
        header_room = self._data_start - _PREFIX.size
        header = _header(n, fields).ljust(header_room, b" ")  # JSON allows trailing whitespace
        return b"".join([_PREFIX.pack(MAGIC, header_room), header, *parts])


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
        size = len(view)
        if size < _PREFIX.size:
            raise ShardFormatError(
                f"Shard is truncated: {size} bytes, but even the fixed prefix needs {_PREFIX.size}. "
                f"Re-fetch or rewrite the shard."
            )
        magic, header_len = _PREFIX.unpack_from(view, 0)
        if magic != MAGIC:
            raise ShardFormatError(f"Not a lightning_patterns shard: magic is {magic!r}, expected {MAGIC!r}.")
        if _PREFIX.size + header_len > size:
            raise ShardFormatError(
                f"Shard is truncated: the header claims {header_len} bytes but only {size - _PREFIX.size} follow "
                f"the prefix. Re-fetch or rewrite the shard."
            )
        try:
            header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + header_len]))
            n = header["num_samples"]
            fields = header["fields"]
            if not isinstance(n, int) or n < 0 or not isinstance(fields, dict):
                raise TypeError("num_samples or fields has the wrong type")
            self.schema = Schema({k: FieldSpec(v["dtype"], _shape(v["shape"])) for k, v in fields.items()})
        except (ValueError, KeyError, TypeError) as err:
            raise ShardFormatError(f"Shard header is corrupt ({err}); re-fetch or rewrite the shard.") from err
        if schema is not None and schema != self.schema:
            raise SchemaMismatchError(
                f"Shard does not match the expected schema: {schema.describe_difference(self.schema)}."
            )
        self.num_samples: int = n
        self._columns: dict[str, _Column] = {}
        for name, spec in self.schema.items():
            self._columns[name] = self._column(name, spec, fields[name], size)

    def _column(self, name: str, spec: FieldSpec, entry: dict[str, Any], size: int) -> _Column:
        n = self.num_samples
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
            index = np.frombuffer(self._buffer, dtype="<u8", count=n + 1, offset=index_offset).astype(np.int64)
            if index[0] != 0 or index[-1] != nbytes or (n and bool(np.any(index[1:] < index[:-1]))):
                raise ShardFormatError(f"Shard index of field {name!r} is corrupt; re-fetch or rewrite the shard.")
            return _Column(spec, offset, nbytes, index, None, 0)
        row = spec.sample_nbytes
        if row * n != nbytes:
            raise ShardFormatError(
                f"Shard field {name!r} has {nbytes} bytes, expected {n} samples x {row} bytes = {n * row}."
            )
        return _Column(spec, offset, nbytes, None, np.dtype(spec.dtype).newbyteorder("<"), row)

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


def _shape(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(d, int) for d in value):
        raise TypeError(f"shape {value!r} is not a list of ints")
    return tuple(value)


def read_column(read_range: Callable[[int, int], bytes], field: str) -> np.ndarray:
    """One fixed-size field of a shard, read through byte ranges: the header, then that column only.

    The columnar layout lets a reader learn, say, every label of a remote shard without fetching its
    images: two small range requests instead of the whole file.

    Args:
        read_range: returns bytes ``[start, end)`` of the shard file.
        field: a fixed-size field of the schema.

    Returns:
        The column, shape ``(num_samples, *shape)``.
    """
    prefix = read_range(0, _PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
        raise ShardFormatError(f"Not a lightning_patterns shard: it starts with {prefix[:8]!r}, expected {MAGIC!r}.")
    _, header_len = _PREFIX.unpack(prefix)
    header = json.loads(read_range(_PREFIX.size, _PREFIX.size + header_len))
    entry = header["fields"].get(field)
    if entry is None:
        raise KeyError(f"The shard has no field {field!r}; its fields are {sorted(header['fields'])}.")
    if entry["shape"] is None:
        raise ValueError(f"Field {field!r} has variable length; read_column reads fixed-size fields only.")
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    data = read_range(entry["offset"], entry["offset"] + entry["nbytes"])
    return np.frombuffer(data, dtype=dtype).reshape(header["num_samples"], *entry["shape"])
