"""The ``.lps`` shard layout: a small JSON header, a block table, then one contiguous column per field.

Layout (little-endian, offsets relative to the start of the file, every region 64-byte aligned)::

    b"LPSHRD01"                 8-byte magic
    u64 H                       header length in bytes
    H bytes of UTF-8 JSON       {"num_samples": n,
                                 "fields": {name: {"dtype": ..., "shape": [...] or null,
                                                   "offset": o, "nbytes": b, "index_offset": int or null}},
                                 "blocks": {"algorithm": "sha256", "block_bytes": B, "start": S,
                                            "table_offset": T, "count": k}}
    block table                 k digests of 32 bytes at ``T``: the sha256 of each block of the body
    columns                     fixed-size field: n * prod(shape) * itemsize bytes in C order;
                                variable-length field ("bytes"/"str"): n + 1 u64 offsets at ``index_offset``
                                (relative to ``offset``), then the concatenated payload at ``offset``.

The *head* is bytes ``[0, S)``: prefix, header and block table. The *body* ``[S, size)`` holds every column
and is cut into blocks of ``B`` bytes (the last one shorter), block ``j`` being bytes
``[S + j * B, min(S + (j + 1) * B, size))``. The manifest records the head's size and sha256 next to the
whole file's, so a reader can verify the head alone, then any block alone: a byte range is read and
verified without the rest of the shard (see :mod:`.blocks` and :mod:`.partial`). Shards written before the
block table existed have no ``"blocks"`` key; they are read, and verified, whole.

Being columnar, a whole batch of a numeric field decodes with one ``numpy`` slice, and any single sample
is reached through the offset arithmetic or the index, never by scanning. Nothing is pickled. The writer
side lives in :mod:`.builder`, the reader side (with every check of a header) in :mod:`.reader`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from lightning_patterns.data.shards.schema import FieldSpec, Schema

__all__ = [
    "ALIGN",
    "BLOCK_ALGORITHM",
    "DEFAULT_BLOCK_BYTES",
    "DIGEST_BYTES",
    "MAGIC",
    "MIN_BLOCK_BYTES",
    "PREFIX",
    "align",
    "blocks_entry",
    "data_start",
    "encode_header",
    "field_entry",
    "table_nbytes",
]

MAGIC = b"LPSHRD01"
ALIGN = 64
# The magic, then the header's length.
PREFIX = struct.Struct("<8sQ")
# Bytes per checksummed block of the body: small enough that a worker reading part of a shard, or one
# sample, fetches little beyond what it needs; large enough that the table stays under 0.05% of the file.
DEFAULT_BLOCK_BYTES = 64 * 2**10
MIN_BLOCK_BYTES = 4096
BLOCK_ALGORITHM = "sha256"
DIGEST_BYTES = 32


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def encode_header(num_samples: int, fields: dict[str, Any], blocks: dict[str, Any] | None = None) -> bytes:
    """The header's JSON text, compact (``blocks`` only when the shard has a block table)."""
    header: dict[str, Any] = {"num_samples": num_samples, "fields": fields}
    if blocks is not None:
        header["blocks"] = blocks
    return json.dumps(header, separators=(",", ":")).encode()


def field_entry(spec: FieldSpec, offset: int, nbytes: int, index_offset: int | None) -> dict[str, Any]:
    """One field's entry in the header."""
    shape = None if spec.shape is None else list(spec.shape)
    return {"dtype": spec.dtype, "shape": shape, "offset": offset, "nbytes": nbytes, "index_offset": index_offset}


def blocks_entry(block_bytes: int, start: int, table_offset: int, count: int) -> dict[str, Any]:
    """The header's ``"blocks"`` entry: where the body starts, the block size, and where the table lies."""
    return {
        "algorithm": BLOCK_ALGORITHM,
        "block_bytes": block_bytes,
        "start": start,
        "table_offset": table_offset,
        "count": count,
    }


def table_nbytes(body_nbytes: int, block_bytes: int) -> int:
    """Bytes the block table of a body of ``body_nbytes`` takes, padded to :data:`ALIGN`."""
    return align(-(-body_nbytes // block_bytes) * DIGEST_BYTES)


def data_start(schema: Schema, *, blocks: bool = False) -> int:
    """Where the region after the header starts: the header has room for 20-digit numbers, so it never moves."""
    big = 10**19
    fields = {name: field_entry(spec, big, big, big) for name, spec in schema.items()}
    table = blocks_entry(big, big, big, big) if blocks else None
    return align(PREFIX.size + len(encode_header(big, fields, table)))
