"""The ``.lps`` shard layout: a small JSON header, then one contiguous column per field.

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
is reached through the offset arithmetic or the index, never by scanning. Nothing is pickled. The writer
side lives in :mod:`.builder`, the reader side (with every check of a header) in :mod:`.reader`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from lightning_patterns.data.shards.schema import FieldSpec, Schema

__all__ = ["ALIGN", "MAGIC", "PREFIX", "align", "data_start", "encode_header", "field_entry"]

MAGIC = b"LPSHRD01"
ALIGN = 64
# The magic, then the header's length.
PREFIX = struct.Struct("<8sQ")


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def encode_header(num_samples: int, fields: dict[str, Any]) -> bytes:
    """The header's JSON text, compact."""
    return json.dumps({"num_samples": num_samples, "fields": fields}, separators=(",", ":")).encode()


def field_entry(spec: FieldSpec, offset: int, nbytes: int, index_offset: int | None) -> dict[str, Any]:
    """One field's entry in the header."""
    shape = None if spec.shape is None else list(spec.shape)
    return {"dtype": spec.dtype, "shape": shape, "offset": offset, "nbytes": nbytes, "index_offset": index_offset}


def data_start(schema: Schema) -> int:
    """Where the columns start: the header is padded to room for 20-digit numbers, so it never moves."""
    big = 10**19
    fields = {name: field_entry(spec, big, big, big) for name, spec in schema.items()}
    return align(PREFIX.size + len(encode_header(big, fields)))
