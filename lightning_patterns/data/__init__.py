"""Data-ingestion patterns: shard formats and writers, sharding rules, streaming and caching."""

from __future__ import annotations

from lightning_patterns.data.shards import Manifest, Schema, ShardReader, load_manifest, write_dataset

__all__ = ["Manifest", "Schema", "ShardReader", "load_manifest", "write_dataset"]
