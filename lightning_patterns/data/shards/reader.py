"""Reading ``.lps`` shards (see :mod:`.layout`): every check of a header in one function, then random access.

:func:`parse_header` holds every check a shard's header must pass, from its first bytes and the file's size
alone; :class:`ShardReader` (a whole shard in memory) and :func:`read_column` (one column through range
reads) both go through it, so a check added there guards both.
"""

from __future__ import annotations

import codecs
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_patterns.data.shards.blocks import BlockTable, merge_ranges
from lightning_patterns.data.shards.layout import BLOCK_ALGORITHM, MAGIC, MIN_BLOCK_BYTES, PREFIX
from lightning_patterns.data.shards.limits import (
    MAX_HEADER_BYTES,
    MAX_SHARD_BYTES,
    MAX_SHARD_SAMPLES,
    is_count,
    parse_json,
)
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


# Bytes of a str column decoded at a time when it is checked (bounds the memory the check takes).
_UTF8_CHUNK = 2**20


class ShardFormatError(ValueError):
    """A shard is not a valid ``.lps`` file, or disagrees with its manifest entry.

    Raised for a wrong magic, a truncated file, a corrupt or undecodable header, a count or size beyond the
    documented limits (:mod:`.limits`), columns outside the body or overlapping, a non-monotone index, text
    that is not UTF-8, and a header whose sample count differs from the manifest's. The message names the
    shard's URL (when known), the field and both values.
    """


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
        blocks: where the body's checksummed blocks and their table lie; ``None`` for a shard without a block
            table (written before it existed), which is verified whole.
    """

    num_samples: int
    schema: Schema
    columns: Mapping[str, ColumnExtent] = field(hash=False)
    blocks: BlockTable | None = None

    @property
    def head_bytes(self) -> int | None:
        """Size of the head (prefix, header, block table) that the manifest's head checksum covers, if any."""
        return None if self.blocks is None else self.blocks.start


def _shard(url: str | None) -> str:
    return "Shard" if url is None else f"Shard {url!r}"


def _corrupt(url: str | None, problem: str, *, kind: str = "corrupt") -> ShardFormatError:
    return ShardFormatError(f"{_shard(url)} is {kind}: {problem}. Re-fetch or rewrite the shard.")


def header_end(head: bytes | bytearray | memoryview, size: int, *, url: str | None = None) -> int:
    """Check a shard's fixed prefix (magic and header length) and return where its header ends.

    Args:
        head: the file's first bytes, at least the prefix (16 bytes) unless the file is shorter.
        size: the whole file's size in bytes.
        url: the shard's URL, named in errors.

    Returns:
        The offset one past the header's JSON text.

    Raises:
        ShardFormatError: wrong magic, a file over :data:`~.limits.MAX_SHARD_BYTES`, a header over
            :data:`~.limits.MAX_HEADER_BYTES`, or the file too short for the prefix or the header it announces.
    """
    if size > MAX_SHARD_BYTES:
        raise _corrupt(url, f"it has {size} bytes, more than the {MAX_SHARD_BYTES} a shard may have")
    if size < PREFIX.size or len(head) < PREFIX.size:
        raise ShardFormatError(
            f"{_shard(url)} is truncated: {min(size, len(head))} bytes, but even the fixed prefix needs "
            f"{PREFIX.size}. Re-fetch or rewrite the shard."
        )
    magic, header_len = PREFIX.unpack_from(head, 0)
    if magic != MAGIC:
        raise ShardFormatError(
            f"{_shard(url)} is not a lightning_patterns shard: magic is {magic!r}, expected {MAGIC!r}."
        )
    if PREFIX.size + header_len > size:
        raise ShardFormatError(
            f"{_shard(url)} is truncated: the header claims {header_len} bytes but only {size - PREFIX.size} follow "
            f"the prefix. Re-fetch or rewrite the shard."
        )
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(
            url, f"its header length is {header_len}, more than the {MAX_HEADER_BYTES} bytes a header may take"
        )
    return int(PREFIX.size + header_len)


def parse_header(
    head: bytes | bytearray | memoryview,
    size: int,
    schema: Schema | None = None,
    *,
    url: str | None = None,
    num_samples: int | None = None,
) -> ShardHeader:
    """Parse and check a shard's header: every check a header must pass before any sample is read.

    The checks: the prefix (:func:`header_end`); the header is JSON nested at most
    :data:`~.limits.MAX_JSON_DEPTH` deep; ``num_samples`` is a count up to
    :data:`~.limits.MAX_SHARD_SAMPLES` and equals the manifest's; every field has a valid dtype and shape
    (:class:`FieldSpec`); a fixed-size column has exactly ``num_samples x`` (bytes per sample) bytes;
    every region (each column, each index of ``num_samples + 1`` offsets) lies in the body, after the
    header and inside the file, and no two overlap. A block table (``"blocks"``, see :mod:`.layout`) names
    sha256, a block size of at least :data:`~.layout.MIN_BLOCK_BYTES`, exactly the blocks that cover the body,
    and lies between the header and the body, which then starts where it says. Keys the header holds beyond
    these are ignored, so a later version of the format can add regions (each then joins the overlap check).

    Args:
        head: the file's first bytes, through the end of the header at least (the whole file will do).
        size: the whole file's size in bytes (the manifest's ``num_bytes``); every region must lie inside it.
        schema: when given, the shard's fields must match it exactly.
        url: the shard's URL, named in every error.
        num_samples: the manifest's sample count for the shard; the header must say the same.

    Returns:
        The checked header.

    Raises:
        ShardFormatError: any check failed; the message names the shard, the header field and both values.
        SchemaMismatchError: the shard does not match ``schema``.
    """
    end = header_end(head, size, url=url)
    if len(head) < end:
        raise ShardFormatError(
            f"{_shard(url)} header is incomplete: {len(head)} bytes given, the header ends at byte {end}. Pass the "
            f"whole header."
        )
    try:
        header = parse_json(head[PREFIX.size : end])
    except ValueError as err:
        raise _corrupt(url, f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(url, f"its header is a JSON {type(header).__name__}, expected an object")
    n, fields = header.get("num_samples"), header.get("fields")
    if not is_count(n) or n > MAX_SHARD_SAMPLES:
        raise _corrupt(url, f"header field 'num_samples' is {n!r}, expected a count from 0 to {MAX_SHARD_SAMPLES}")
    if num_samples is not None and n != num_samples:
        raise ShardFormatError(
            f"{_shard(url)}: header field 'num_samples' is {n}, but the manifest records num_samples={num_samples}. "
            "The shard and the manifest disagree (the shard was replaced, or the manifest edited): rewrite the "
            "dataset, or restore the shard the manifest was written with."
        )
    if not isinstance(fields, dict) or not fields:
        raise _corrupt(url, f"header field 'fields' is {_short(fields)}, expected an object of field entries")
    found = Schema({name: _spec(url, name, entry) for name, entry in fields.items()})
    if schema is not None and schema != found:
        raise SchemaMismatchError(
            f"{_shard(url)} does not match the expected schema: {schema.describe_difference(found)}."
        )
    columns = {name: _extent(url, name, spec, fields[name], n) for name, spec in found.items()}
    blocks = _blocks(url, header.get("blocks"), end, size)
    _check_regions(url, end if blocks is None else blocks.start, size, _regions(columns, n))
    return ShardHeader(n, found, columns, blocks)


def _blocks(url: str | None, entry: Any, header_end: int, size: int) -> BlockTable | None:
    """The block table the header describes, checked to lie between the header and a body it covers exactly."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise _corrupt(url, f"header field 'blocks' is {_short(entry)}, expected an object")
    if entry.get("algorithm") != BLOCK_ALGORITHM:
        raise _corrupt(url, f"header field 'blocks.algorithm' is {_short(entry.get('algorithm'))}, expected 'sha256'")
    values: dict[str, int] = {}
    for key in ("block_bytes", "start", "table_offset", "count"):
        value = entry.get(key)
        if not is_count(value) or value > MAX_SHARD_BYTES:
            raise _corrupt(url, f"header field 'blocks.{key}' is {_short(value)}, expected a byte offset or count")
        values[key] = value
    table = BlockTable(values["block_bytes"], values["start"], values["table_offset"], values["count"], size)
    if table.block_bytes < MIN_BLOCK_BYTES:
        raise _corrupt(
            url, f"header field 'blocks.block_bytes' is {table.block_bytes}, less than the {MIN_BLOCK_BYTES} allowed"
        )
    if not header_end <= table.table_offset <= table.table_stop <= table.start <= size:
        raise _corrupt(
            url,
            f"its block table spans bytes [{table.table_offset}, {table.table_stop}) and its body starts at byte "
            f"{table.start}; expected the table between the header's end (byte {header_end}) and the body, and the "
            f"body inside the file ({size} bytes)",
            kind="truncated or corrupt",
        )
    expected = -(-(size - table.start) // table.block_bytes)
    if table.count != expected:
        raise _corrupt(
            url,
            f"header field 'blocks.count' is {table.count}, but a body of {size - table.start} bytes in blocks of "
            f"{table.block_bytes} has {expected}",
        )
    return table


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _spec(url: str | None, name: str, entry: Any) -> FieldSpec:
    if not isinstance(entry, dict):
        raise _corrupt(url, f"header field 'fields[{name!r}]' is {_short(entry)}, expected an object")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    try:
        if not isinstance(dtype, str):
            raise ValueError(f"dtype {_short(dtype)} is not a string")
        if shape is not None and not isinstance(shape, list):
            raise ValueError(f"shape {_short(shape)} is not a list or null")
        return FieldSpec(dtype, None if shape is None else tuple(shape))
    except ValueError as err:
        raise _corrupt(url, f"header field 'fields[{name!r}]' has an invalid dtype or shape ({err})") from err


def _extent(url: str | None, name: str, spec: FieldSpec, entry: dict[str, Any], n: int) -> ColumnExtent:
    offset: Any = entry.get("offset")
    nbytes: Any = entry.get("nbytes")
    index_offset: Any = entry.get("index_offset")
    keys = [("offset", offset), ("nbytes", nbytes)]
    if spec.variable_length:
        keys.append(("index_offset", index_offset))
    elif index_offset is not None:
        raise _corrupt(url, f"header field 'fields[{name!r}].index_offset' is {index_offset!r} for a fixed-size field")
    for key, value in keys:
        if not is_count(value) or value > MAX_SHARD_BYTES:
            raise _corrupt(
                url, f"header field 'fields[{name!r}].{key}' is {_short(value)}, expected a byte offset or count"
            )
    if not spec.variable_length and nbytes != n * spec.sample_nbytes:
        raise ShardFormatError(
            f"{_shard(url)}: header field 'fields[{name!r}].nbytes' is {nbytes}, but {n} samples of "
            f"{spec.describe()} ({spec.sample_nbytes} bytes each) take {n * spec.sample_nbytes}. The file is "
            "corrupt: re-fetch or rewrite it."
        )
    return ColumnExtent(offset, nbytes, index_offset)


def _regions(columns: Mapping[str, ColumnExtent], n: int) -> list[tuple[int, int, str]]:
    """Every byte range the header places in the body, as ``(start, stop, what)``."""
    regions = []
    for name, extent in columns.items():
        regions.append((extent.offset, extent.offset + extent.nbytes, f"column of {name!r}"))
        if extent.index_offset is not None:
            regions.append((extent.index_offset, extent.index_offset + 8 * (n + 1), f"index of {name!r}"))
    return regions


def _check_regions(url: str | None, body_start: int, size: int, regions: list[tuple[int, int, str]]) -> None:
    """Every region lies in the body ``[body_start, size)``, and no two (of non-zero length) overlap."""
    for start, stop, what in regions:
        if start < body_start or stop > size:
            raise _corrupt(
                url,
                f"the {what} spans bytes [{start}, {stop}), outside the body [{body_start}, {size}) (the header "
                f"ends at byte {body_start}, the file at byte {size})",
                kind="truncated or corrupt",
            )
    ordered = sorted(region for region in regions if region[1] > region[0])
    for (start, stop, what), (next_start, next_stop, next_what) in itertools.pairwise(ordered):
        if next_start < stop:
            raise _corrupt(
                url,
                f"the {what} (bytes [{start}, {stop})) and the {next_what} (bytes [{next_start}, {next_stop})) overlap",
            )


@dataclass(frozen=True)
class _Column:
    name: str
    spec: FieldSpec
    offset: int
    nbytes: int
    index: np.ndarray | None  # n + 1 offsets into the payload for variable-length fields
    np_dtype: np.dtype[Any] | None
    row_nbytes: int
    shape: tuple[int, ...] = ()  # per-sample shape of a fixed-size field
    per_row: int = 0  # items per sample of a fixed-size field


class ShardReader:
    """Random access to the samples of one ``.lps`` shard held in memory.

    Numeric fields come back as ``torch.Tensor`` (0-d for scalars), ``bytes`` fields as ``bytes`` and ``str``
    fields as ``str``. :meth:`read_range` returns tensors that share memory with ``buffer`` when it is
    writable (a ``bytearray``, or an ``mmap`` opened with ``ACCESS_COPY`` or ``ACCESS_WRITE``); with a
    read-only buffer (``bytes``, a read-only ``mmap``) it copies the slice once, because ``torch`` cannot
    safely share read-only memory. Keep the buffer alive and unchanged while tensors from it are in use.

    The header passes every check of :func:`parse_header` (against the manifest's sample count when
    ``num_samples`` is given) and each variable-length index is checked to be monotone before this returns,
    so a shard that fails them yields no sample at all; so is every ``str`` value (valid UTF-8).

    A *partial* shard (``rows`` given) is a buffer of the shard's full size holding only the head and the
    bytes of those rows (see :func:`~.partial.fetch_rows`): the checks above cover the index entries and
    text of those rows, and reading any other row raises ``IndexError``.

    A shard still *arriving* (``ready`` given) is read as its bytes come in: ``ready(start, stop)`` returns
    once bytes ``[start, stop)`` of ``buffer`` are in place and verified (or raises why they never will be).
    The head must be in place already; variable-length fields are waited for whole when the reader opens
    (their checks need them), fixed-size ones row by row as they are read.

    Args:
        buffer: the whole shard file as a bytes-like object.
        schema: when given, the shard's fields must match it exactly.
        url: where the shard was read from, named in every error.
        num_samples: the manifest's sample count for the shard; the header must say the same.
        rows: ``[start, stop)`` ranges of the only rows ``buffer`` holds; ``None`` when it holds the whole shard.
        ready: waits until bytes ``[start, stop)`` of ``buffer`` are in place; ``None`` when they all are.

    Raises:
        ShardFormatError: ``buffer`` is not a valid shard, or disagrees with ``num_samples``.
        SchemaMismatchError: the shard does not match ``schema``.
    """

    def __init__(
        self,
        buffer: bytes | bytearray | memoryview | Any,
        schema: Schema | None = None,
        *,
        url: str | None = None,
        num_samples: int | None = None,
        rows: Sequence[tuple[int, int]] | None = None,
        ready: Callable[[int, int], None] | None = None,
    ) -> None:
        view = memoryview(buffer).cast("B")
        self._buffer = view
        self._ready = ready
        self._writable = not view.readonly
        self.url = url
        header = parse_header(view, len(view), schema, url=url, num_samples=num_samples)
        self.header = header
        self.schema = header.schema
        self.num_samples: int = header.num_samples
        n = self.num_samples
        self._present: list[tuple[int, int]] | None = None
        if rows is not None:
            present = merge_ranges(rows)
            if present and (present[0][0] < 0 or present[-1][1] > n):
                raise IndexError(f"Rows {present} are out of range for a shard of {n} samples.")
            self._present = present
        self._columns = {name: self._column(name, spec, header.columns[name]) for name, spec in self.schema.items()}

    @property
    def rows(self) -> list[tuple[int, int]] | None:
        """The ``[start, stop)`` ranges of rows this reader holds, or ``None`` when it holds the whole shard."""
        return None if self._present is None else list(self._present)

    def _column(self, name: str, spec: FieldSpec, extent: ColumnExtent) -> _Column:
        if extent.index_offset is None:
            dtype = np.dtype(spec.dtype).newbyteorder("<")
            shape = spec.shape or ()
            return _Column(
                name, spec, extent.offset, extent.nbytes, None, dtype, spec.sample_nbytes, shape, math.prod(shape)
            )
        # The index lies in the body, which parse_header does not read: it is checked here, once. Offsets of
        # 2**63 and more turn negative as int64, so they fail the order check too.
        n = self.num_samples
        if self._ready is not None:
            self._ready(extent.index_offset, extent.index_offset + 8 * (n + 1))
            self._ready(extent.offset, extent.offset + extent.nbytes)
        index = np.frombuffer(self._buffer, dtype="<u8", count=n + 1, offset=extent.index_offset).astype(np.int64)
        for start, stop in [(0, n)] if self._present is None else self._present:
            self._check_offsets(name, extent, index, start, stop)
            if spec.dtype == "str":
                self._check_utf8(name, extent, index, start, stop)
        return _Column(name, spec, extent.offset, extent.nbytes, index, None, 0)

    def _check_offsets(self, name: str, extent: ColumnExtent, index: np.ndarray, start: int, stop: int) -> None:
        """Entries ``start .. stop`` of a variable-length index are monotone and inside the payload."""
        part = index[start : stop + 1]
        first, last = int(part[0]), int(part[-1])
        low, high = (0, extent.nbytes) if self._present is None else (first, last)
        if start == 0:
            low = 0
        if stop == self.num_samples:
            high = extent.nbytes
        if first != low or last != high or first < 0 or last > extent.nbytes:
            samples = "" if self._present is None else f" for samples [{start}, {stop})"
            raise _corrupt(
                self.url,
                f"the index of field {name!r} runs from {first} to {last}, expected from {low} to {high}{samples} "
                f"(its payload has {extent.nbytes} bytes)",
            )
        if stop > start and bool(np.any(part[1:] < part[:-1])):
            at = start + int(np.flatnonzero(part[1:] < part[:-1])[0])
            raise _corrupt(
                self.url,
                f"the index of field {name!r} decreases at sample {at} ({int(index[at])} then {int(index[at + 1])}); "
                "an index must be monotone",
            )

    def _check_utf8(self, name: str, extent: ColumnExtent, index: np.ndarray, start: int, stop: int) -> None:
        """Every value of samples ``[start, stop)`` of a ``str`` column is UTF-8, checked once so no read fails later.

        The whole payload of those samples must decode (in bounded chunks), and no value may start inside a
        character (on a continuation byte): together these mean each value decodes alone.
        """
        lo, hi = int(index[start]), int(index[stop])
        payload = self._buffer[extent.offset + lo : extent.offset + hi]
        local = index[start : stop + 1] - lo
        decoder = codecs.getincrementaldecoder("utf-8")()
        for at in range(0, len(payload) + 1, _UTF8_CHUNK):
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(payload[at : at + _UTF8_CHUNK], final=at + _UTF8_CHUNK > len(payload))
            except UnicodeDecodeError as err:
                sample = start + int(np.searchsorted(local, at - held + err.start, side="right")) - 1
                raise _corrupt(
                    self.url, f"field {name!r} of sample {sample} is not valid UTF-8 ({err.reason})"
                ) from err
        starts = local[:-1][local[:-1] < len(payload)]
        if starts.size:
            first_bytes = np.frombuffer(payload, dtype=np.uint8)[starts]
            split = np.flatnonzero((first_bytes & 0xC0) == 0x80)
            if split.size:
                sample = start + int(np.flatnonzero(local[:-1] == starts[split[0]])[0])
                raise _corrupt(
                    self.url, f"field {name!r} of sample {sample} is not valid UTF-8 (it starts inside a character)"
                )

    def _require(self, start: int, stop: int) -> None:
        """Raise unless this reader holds rows ``[start, stop)`` (always true of a whole shard)."""
        present = self._present
        if present is None or stop <= start:
            return
        for lo, hi in present:
            if lo <= start and stop <= hi:
                return
        raise IndexError(
            f"Rows [{start}, {stop}) of {self.url or 'this shard'} were not fetched: this partial shard holds rows "
            f"{present}. Fetch those rows (fetch_rows) or the whole shard."
        )

    def _require_indices(self, idx: np.ndarray) -> None:
        present = self._present
        if present is None or idx.size == 0:
            return
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if any(a <= lo and hi <= b for a, b in present):
            return
        starts = np.array([a for a, _ in present], dtype=np.int64)
        stops = np.array([b for _, b in present], dtype=np.int64)
        k = np.searchsorted(starts, idx, side="right") - 1
        missing = (k < 0) | (idx >= stops[np.maximum(k, 0)])
        if bool(np.any(missing)):
            row = int(idx[np.flatnonzero(missing)[0]])
            self._require(row, row + 1)

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, i: int) -> int:
        n = self.num_samples
        if not -n <= i < n:
            raise IndexError(f"Sample index {i} is out of range for a shard of {n} samples.")
        return i + n if i < 0 else i

    def _rows(self, column: _Column, start: int, count: int) -> np.ndarray:
        assert column.np_dtype is not None
        if self._ready is not None:
            at = column.offset + start * column.row_nbytes
            self._ready(at, at + count * column.row_nbytes)
        flat = np.frombuffer(
            self._buffer,
            dtype=column.np_dtype,
            count=count * column.per_row,
            offset=column.offset + start * column.row_nbytes,
        )
        return flat.reshape(count, *column.shape)

    def _rows_at(self, column: _Column, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (in range) of a fixed-size column: a copy, from the span of rows between them only."""
        lo = int(idx.min()) if idx.size else 0
        count = int(idx.max()) + 1 - lo if idx.size else 0
        rows: np.ndarray = self._rows(column, lo, count)[idx - lo]
        return rows

    def _varlen(self, column: _Column, i: int) -> bytes | str:
        assert column.index is not None
        data = self._buffer[column.offset + int(column.index[i]) : column.offset + int(column.index[i + 1])].tobytes()
        # Checked to be UTF-8 when the shard was opened.
        return data.decode("utf-8") if column.spec.dtype == "str" else data

    def read(self, i: int) -> dict[str, Any]:
        """Decode sample ``i`` (negative indices count from the end)."""
        import torch  # here, not at the top: reading a header (a light command) needs no torch

        i = self._check_index(i)
        self._require(i, i + 1)
        out: dict[str, Any] = {}
        for name, column in self._columns.items():
            if column.index is not None:
                out[name] = self._varlen(column, i)
            else:
                out[name] = torch.from_numpy(self._rows(column, i, 1).reshape(column.spec.shape or ()).copy())
        return out

    def read_range(self, start: int, stop: int) -> dict[str, Any]:
        """Decode samples ``start`` to ``stop`` (exclusive) as a batch: tensors of shape ``(k, *shape)``, lists.

        Each numeric field is one slice of its column: shared with the buffer when it is writable, else one
        copy (the batch's own memory, nothing else allocated per field).
        """
        import torch  # here, not at the top: reading a header (a light command) needs no torch

        n = self.num_samples
        if not 0 <= start <= stop <= n:
            raise IndexError(f"Range [{start}, {stop}) is invalid for a shard of {n} samples; need 0 <= start <= stop.")
        if self._present is not None:
            self._require(start, stop)
        out: dict[str, Any] = {}
        count = stop - start
        buffer, writable = self._buffer, self._writable
        for name, column in self._columns.items():
            if column.index is not None:
                out[name] = [self._varlen(column, i) for i in range(start, stop)]
                continue
            at = column.offset + start * column.row_nbytes
            if self._ready is not None:
                self._ready(at, at + count * column.row_nbytes)
            rows = np.frombuffer(buffer, column.np_dtype, count * column.per_row, at).reshape(count, *column.shape)
            out[name] = torch.from_numpy(rows if writable else rows.copy())
        return out

    def empty_batch(self, size: int) -> dict[str, Any]:
        """Output buffers for a batch of ``size`` samples: a numpy array per numeric field, a list per other field.

        Fill them with :meth:`copy_rows` and :meth:`take_rows` (possibly from several shards of one dataset).
        """
        return {
            name: [None] * size if column.index is not None else np.empty((size, *column.shape), column.np_dtype)
            for name, column in self._columns.items()
        }

    def copy_rows(self, start: int, stop: int, out: dict[str, Any], at: int) -> None:
        """Copy samples ``[start, stop)`` into the buffers of :meth:`empty_batch`, from position ``at`` on."""
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"Range [{start}, {stop}) is invalid for a shard of {self.num_samples} samples.")
        self._require(start, stop)
        for name, column in self._columns.items():
            if column.index is not None:
                out[name][at : at + stop - start] = [self._varlen(column, i) for i in range(start, stop)]
            else:
                out[name][at : at + stop - start] = self._rows(column, start, stop - start)

    def take_rows(self, indices: np.ndarray, out: dict[str, Any], positions: np.ndarray) -> None:
        """Copy samples ``indices`` into the buffers of :meth:`empty_batch` at ``positions`` (same length)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"Indices must lie in [0, {n}) for a shard of {n} samples.")
        self._require_indices(idx)
        for name, column in self._columns.items():
            if column.index is not None:
                values = out[name]
                for position, i in zip(positions.tolist(), idx.tolist(), strict=True):
                    values[position] = self._varlen(column, i)
            else:
                out[name][positions] = self._rows_at(column, idx)

    def read_field(self, field: str, indices: np.ndarray) -> np.ndarray:
        """The values of one fixed-size ``field`` at ``indices``, as a numpy array (no other field decoded)."""
        column = self._columns[field]
        if column.index is not None:
            raise ValueError(f"Field {field!r} has variable length; read_field reads fixed-size fields only.")
        n = self.num_samples
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"Indices must lie in [{-n}, {n}) for a shard of {n} samples.")
        idx = np.where(idx < 0, idx + n, idx)
        self._require_indices(idx.reshape(-1))
        return self._rows_at(column, idx)

    def read_batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, Any]:
        """Decode the samples at ``indices`` (any order, repeats allowed) as a batch, like :meth:`read_range`."""
        import torch  # here, not at the top: reading a header (a light command) needs no torch

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"Indices must lie in [{-n}, {n}) for a shard of {n} samples.")
        idx = np.where(idx < 0, idx + n, idx)
        self._require_indices(idx)
        out: dict[str, Any] = {}
        for name, column in self._columns.items():
            if column.index is not None:
                out[name] = [self._varlen(column, int(i)) for i in idx]
            else:
                out[name] = torch.from_numpy(self._rows_at(column, idx))  # fancy indexing copies
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.num_samples):
            yield self.read(i)


def read_column(
    read_range: Callable[[int, int], bytes],
    field: str,
    *,
    size: int,
    schema: Schema | None = None,
    url: str | None = None,
    num_samples: int | None = None,
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
        url: the shard's URL, named in every error.
        num_samples: the manifest's sample count for the shard; the header must say the same.

    Returns:
        The column, shape ``(num_samples, *shape)``.

    Raises:
        ShardFormatError: the header fails a check of :func:`parse_header`.
        SchemaMismatchError: the shard does not match ``schema``.
        KeyError: the shard has no field ``field``.
        ValueError: ``field`` has variable length.
    """
    head = bytes(read_range(0, min(PREFIX.size, size)))
    head += read_range(PREFIX.size, header_end(head, size, url=url))
    header = parse_header(head, size, schema, url=url, num_samples=num_samples)
    extent = header.columns.get(field)
    if extent is None:
        raise KeyError(f"The shard has no field {field!r}; its fields are {sorted(header.columns)}.")
    spec = header.schema[field]
    if spec.shape is None:
        raise ValueError(f"Field {field!r} has variable length; read_column reads fixed-size fields only.")
    data = read_range(extent.offset, extent.offset + extent.nbytes)
    return np.frombuffer(data, dtype=np.dtype(spec.dtype).newbyteorder("<")).reshape(header.num_samples, *spec.shape)
