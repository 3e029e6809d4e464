"""Shards: the ``.lps`` file format, the dataset manifest, and the writer.

Write any dataset with :func:`write_dataset`; read a dataset's :class:`Manifest` with :func:`load_manifest`
and a shard with :func:`read_shard` (or :class:`ShardReader` over bytes you fetched yourself); remove what a
killed writer or an ``overwrite`` left behind with :func:`collect_garbage`. The limits every manifest and
shard is held to are in :mod:`.limits`.
"""

from __future__ import annotations

from lightning_patterns.data.shards.builder import ShardBuilder, encode_shard
from lightning_patterns.data.shards.garbage import DEFAULT_GRACE_PERIOD, GarbageReport, collect_garbage
from lightning_patterns.data.shards.layout import MAGIC
from lightning_patterns.data.shards.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    RetiredGeneration,
    ShardInfo,
    checksum_of,
    load_manifest,
    manifest_exists,
    manifest_url,
    publish_manifest,
    read_shard,
    shard_url,
    validate_shard_path,
    verify_checksum,
    verify_dataset,
)
from lightning_patterns.data.shards.reader import ShardFormatError, ShardReader
from lightning_patterns.data.shards.schema import FieldSpec, Schema
from lightning_patterns.data.shards.writer import ShardWriter, write_dataset

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "FORMAT_VERSION",
    "FieldSpec",
    "GarbageReport",
    "MAGIC",
    "MANIFEST_NAME",
    "Manifest",
    "RetiredGeneration",
    "Schema",
    "ShardBuilder",
    "ShardFormatError",
    "ShardInfo",
    "ShardReader",
    "ShardWriter",
    "checksum_of",
    "collect_garbage",
    "encode_shard",
    "load_manifest",
    "manifest_exists",
    "manifest_url",
    "publish_manifest",
    "read_shard",
    "shard_url",
    "validate_shard_path",
    "verify_checksum",
    "verify_dataset",
    "write_dataset",
]
