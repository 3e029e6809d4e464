"""Data-ingestion patterns: shard formats and writers, sharding rules, streaming, caching and batching.

Names are imported on first use: ``import lightning_patterns.data`` imports neither torch nor Lightning, and only
the DataModules import Lightning (the package in use, see :mod:`lightning_patterns._lightning`).
"""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = [
    "CacheConfig",
    "ClassBalance",
    "ClassBalancer",
    "IDXDataModule",
    "IDXDataset",
    "InMemoryDataModule",
    "Manifest",
    "ReadAhead",
    "RetryPolicy",
    "Schema",
    "ShardReader",
    "ShardedStreamingDataModule",
    "StreamingDataLoader",
    "StreamingDataset",
    "load_manifest",
    "write_dataset",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "CacheConfig": "lightning_patterns.data.caching:CacheConfig",
        "ClassBalance": "lightning_patterns.data.streaming.options:ClassBalance",
        "ClassBalancer": "lightning_patterns.data.batching:ClassBalancer",
        "IDXDataModule": "lightning:IDXDataModule",
        "IDXDataset": "lightning_patterns.data.streaming:IDXDataset",
        "InMemoryDataModule": "lightning:InMemoryDataModule",
        "Manifest": "lightning_patterns.data.shards:Manifest",
        "ReadAhead": "lightning_patterns.data.streaming.options:ReadAhead",
        "RetryPolicy": "lightning_patterns.data.remote:RetryPolicy",
        "Schema": "lightning_patterns.data.shards:Schema",
        "ShardReader": "lightning_patterns.data.shards:ShardReader",
        "ShardedStreamingDataModule": "lightning:ShardedStreamingDataModule",
        "StreamingDataLoader": "lightning_patterns.data.streaming:StreamingDataLoader",
        "StreamingDataset": "lightning_patterns.data.streaming:StreamingDataset",
        "load_manifest": "lightning_patterns.data.shards:load_manifest",
        "write_dataset": "lightning_patterns.data.shards:write_dataset",
    },
)
