"""The documented maxima of manifests and shards, and the one bounded JSON parse both go through.

Every count and size a manifest or a shard header declares is checked against these maxima before it is
used in arithmetic, in an allocation or in a request, so no declared value can make a reader allocate
without bound, and every offset and total stays far inside ``int64`` (the plan and the readers use numpy):

=========================  ===============  ==========================================================
limit                      value            why
=========================  ===============  ==========================================================
``MAX_SHARD_SAMPLES``      2**32            samples per shard
``MAX_SHARD_BYTES``        2**34 (16 GiB)   bytes per shard file: a shard is read whole into memory
``MAX_SHARDS``             2**20            shards per dataset
``MAX_HEADER_BYTES``       2**24 (16 MiB)   a shard's JSON header (ours take ~160 bytes per field)
``MAX_NDIM``               32               dimensions of one field's per-sample shape
``MAX_JSON_DEPTH``         64               nesting of manifest and header JSON (ours nest 4 deep)
``MAX_MANIFEST_BYTES``     2**28 (256 MiB)  default cap on a manifest read (``max_manifest_bytes``)
``MAX_LABEL_CLASSES``      2**16            classes in one shard's recorded label histogram
=========================  ===============  ==========================================================

A dataset therefore holds at most 2**52 samples and 2**54 bytes, so cumulative sample offsets and byte
totals fit ``int64`` with room to spare; a manifest beyond these limits is refused when it is loaded.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeGuard

import numpy as np

__all__ = [
    "DEFAULT_MANIFEST_TIMEOUT",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_LABEL_CLASSES",
    "MAX_MANIFEST_BYTES",
    "MAX_NDIM",
    "MAX_SHARDS",
    "MAX_SHARD_BYTES",
    "MAX_SHARD_SAMPLES",
    "is_count",
    "parse_json",
]

MAX_SHARD_SAMPLES = 2**32
MAX_SHARD_BYTES = 2**34
MAX_SHARDS = 2**20
MAX_HEADER_BYTES = 2**24
MAX_NDIM = 32
MAX_JSON_DEPTH = 64
MAX_MANIFEST_BYTES = 2**28
MAX_LABEL_CLASSES = 2**16
# Seconds a whole manifest read may take, retries included, unless the caller says otherwise.
DEFAULT_MANIFEST_TIMEOUT = 300.0

# Every byte but the four brackets: deleting them leaves the nesting structure (strings included).
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
# A JSON string, escapes included (the "unrolled loop" form, linear time).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def is_count(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is a non-negative ``int`` (``bool`` is not a count, though Python says it is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _max_depth(brackets: bytes | bytearray) -> int:
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _nesting_depth(data: bytes | bytearray) -> int:
    # Counting every bracket is fast (C speed) and can only over-count (brackets inside strings); only
    # when that bound is over the limit is the exact count, with strings removed, worth its cost.
    bound = _max_depth(data.translate(None, _NOT_BRACKETS))
    if bound <= MAX_JSON_DEPTH:
        return bound
    return _max_depth(_JSON_STRING.sub(b'""', data).translate(None, _NOT_BRACKETS))


def parse_json(data: str | bytes | bytearray | memoryview) -> Any:
    """Parse JSON text nested at most :data:`MAX_JSON_DEPTH` deep.

    Python's parser recurses once per nesting level, so deeply nested input would raise ``RecursionError``
    (or worse, in a thread with a small stack); the depth is measured first, without recursion.

    Args:
        data: the JSON text (UTF-8, -16 or -32 when given as bytes).

    Returns:
        The parsed value.

    Raises:
        ValueError: the text is not valid JSON (invalid UTF-8 included) or nests too deeply.
    """
    if isinstance(data, str):
        raw: bytes | bytearray = data.encode("utf-8", "surrogatepass")
    else:
        raw = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    depth = _nesting_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"it nests {depth} levels deep, more than the {MAX_JSON_DEPTH} levels JSON may nest here")
    try:
        return json.loads(data if isinstance(data, str) else raw)
    except RecursionError as err:  # not expected after the depth check; never let it out raw
        raise ValueError("it nests too deeply to parse") from err
