"""The schema of a dataset: each field's dtype and per-sample shape, and the check of samples against it.

Supported sample values: ``torch.Tensor`` and ``numpy`` arrays/scalars of a numeric dtype (fixed shape),
Python ``bool``, ``int`` and ``float`` (scalars), ``bytes`` and ``str`` (variable length). Nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_patterns._lazy import instance_of_loaded
from lightning_patterns.data.shards.limits import MAX_NDIM, MAX_SHARD_BYTES
from lightning_patterns.exceptions import SchemaMismatchError

__all__ = ["FieldSpec", "Schema"]


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


def _torch_dtype_name(dtype: object) -> str:
    """``"float32"`` for ``torch.float32``: a tensor's dtype by name, so checking one needs no torch import."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class FieldSpec:
    """The type of one field of every sample.

    A shape has at most :data:`~.limits.MAX_NDIM` dimensions, and one sample may take at most
    :data:`~.limits.MAX_SHARD_BYTES` (counting each zero dimension as one, so that a shape such as
    ``[0, 2**62]`` is refused too: it describes no bytes but no array either).

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
            if self.shape is None or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.shape):
                raise ValueError(f"FieldSpec(dtype={self.dtype!r}) needs a tuple of non-negative ints as shape.")
            if len(self.shape) > MAX_NDIM:
                raise ValueError(
                    f"FieldSpec(shape=...) has {len(self.shape)} dimensions; at most {MAX_NDIM} are supported."
                )
            nominal = math.prod(max(d, 1) for d in self.shape) * np.dtype(self.dtype).itemsize
            if nominal > MAX_SHARD_BYTES:
                raise ValueError(
                    f"FieldSpec(dtype={self.dtype!r}, shape={list(self.shape)}) describes samples of up to {nominal} "
                    f"bytes, more than the {MAX_SHARD_BYTES} bytes a whole shard may take."
                )
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
    if instance_of_loaded(value, "torch", "Tensor"):
        name = _torch_dtype_name(value.dtype)
        if name not in _NUMERIC_DTYPES:
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
        self._torch_dtypes = {n: s.dtype for n, s in self._fields.items() if s.shape is not None}
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
            try:
                fields[name] = FieldSpec(str(entry["dtype"]), None if shape is None else tuple(shape))
            except ValueError as err:
                raise ValueError(f"Schema entry for field {name!r} is invalid: {err}") from err
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
            elif instance_of_loaded(value, "torch", "Tensor"):
                if _torch_dtype_name(value.dtype) != torch_dtype or tuple(value.shape) != shape:
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
