"""Streaming from remote filesystems: resilient fsspec reads and sources that decode data as it arrives.

- :mod:`.fetch`: :class:`RemoteReader` reads objects with retries, exponential backoff with jitter, resume from
  the byte offset reached, checksum verification and :class:`FetchStats` metrics.
- :mod:`.idx`: :class:`IDXDataset` streams MNIST-style IDX files (raw or gzip) from any fsspec URL.
- :mod:`.dataset`: :class:`StreamingDataset` streams sharded datasets, rank- and worker-aware, with read-ahead.
- :mod:`.loader`: :class:`StreamingDataLoader` advances epochs and resumes mid-epoch, also on another topology.
"""

from __future__ import annotations

from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.fetch import (
    FetchStats,
    FetchStatsSnapshot,
    RemoteReader,
    RetryPolicy,
    is_transient_error,
    open_url,
)
from lightning_patterns.data.streaming.idx import IDXDataset, IDXHeader, read_idx_header
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.streaming.resume import ResumePoint

__all__ = [
    "FetchStats",
    "FetchStatsSnapshot",
    "IDXDataset",
    "IDXHeader",
    "RemoteReader",
    "ResumePoint",
    "RetryPolicy",
    "StreamingDataLoader",
    "StreamingDataset",
    "is_transient_error",
    "open_url",
    "read_idx_header",
]
