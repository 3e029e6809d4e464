"""Data-ingestion patterns: shard formats and writers, sharding rules, streaming, caching and batching."""

from __future__ import annotations

from lightning_patterns.data.batching import ClassBalancer
from lightning_patterns.data.datamodule import ShardedStreamingDataModule
from lightning_patterns.data.idx_datamodule import IDXDataModule
from lightning_patterns.data.in_memory import InMemoryDataModule
from lightning_patterns.data.shards import Manifest, Schema, ShardReader, load_manifest, write_dataset
from lightning_patterns.data.streaming import IDXDataset, RetryPolicy, StreamingDataLoader, StreamingDataset

__all__ = [
    "ClassBalancer",
    "IDXDataModule",
    "IDXDataset",
    "InMemoryDataModule",
    "Manifest",
    "RetryPolicy",
    "Schema",
    "ShardReader",
    "ShardedStreamingDataModule",
    "StreamingDataLoader",
    "StreamingDataset",
    "load_manifest",
    "write_dataset",
]
