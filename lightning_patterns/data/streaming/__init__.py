"""Streaming from remote filesystems: sources that decode sharded data as it arrives.

- :class:`RemoteReader`, :class:`RetryPolicy`, :class:`FetchStats`, :func:`open_url`: re-exported from
  :mod:`lightning_patterns.data.remote`, the one remote-read layer.
- :mod:`.idx`: :class:`IDXDataset` streams MNIST-style IDX files (raw or gzip) from any fsspec URL, sharded over
  ranks and workers, optionally shuffled and cached; :class:`IDXDataLoader` sets its epoch.
- :mod:`.dataset`: :class:`StreamingDataset` streams sharded datasets, rank- and worker-aware, with read-ahead
  (:class:`ReadAhead`) and class-balanced batches (:class:`ClassBalance`); its position is one :class:`StreamCursor`.
- :mod:`.loader`: :class:`StreamingDataLoader` advances epochs and resumes mid-epoch, also on another topology.

Names are imported on first use (a DataLoader worker or a light command pays only for what it uses).
"""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = [
    "ClassBalance",
    "FetchStats",
    "FetchStatsSnapshot",
    "IDXDataLoader",
    "IDXDataset",
    "IDXHeader",
    "ReadAhead",
    "RemoteReader",
    "ResumePoint",
    "RetryPolicy",
    "StreamCursor",
    "StreamingDataLoader",
    "StreamingDataset",
    "is_transient_error",
    "open_url",
    "read_idx_header",
]

_REMOTE = "lightning_patterns.data.remote"
_HERE = "lightning_patterns.data.streaming"
__getattr__ = lazy_exports(
    __name__,
    {
        "ClassBalance": f"{_HERE}.options:ClassBalance",
        "FetchStats": f"{_REMOTE}:FetchStats",
        "FetchStatsSnapshot": f"{_REMOTE}:FetchStatsSnapshot",
        "IDXDataLoader": f"{_HERE}.idx_loader:IDXDataLoader",
        "IDXDataset": f"{_HERE}.idx:IDXDataset",
        "IDXHeader": f"{_HERE}.idx:IDXHeader",
        "ReadAhead": f"{_HERE}.options:ReadAhead",
        "RemoteReader": f"{_REMOTE}:RemoteReader",
        "ResumePoint": f"{_HERE}.resume:ResumePoint",
        "RetryPolicy": f"{_REMOTE}:RetryPolicy",
        "StreamCursor": f"{_HERE}.cursor:StreamCursor",
        "StreamingDataLoader": f"{_HERE}.loader:StreamingDataLoader",
        "StreamingDataset": f"{_HERE}.dataset:StreamingDataset",
        "is_transient_error": f"{_REMOTE}:is_transient_error",
        "open_url": f"{_REMOTE}:open_url",
        "read_idx_header": f"{_HERE}.idx:read_idx_header",
    },
)
