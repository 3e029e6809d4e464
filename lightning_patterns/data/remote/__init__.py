"""The one remote-read layer: every byte the data path reads from a URL goes through here.

- :mod:`.retry`: :class:`RetryPolicy` and the classification of errors (:func:`is_transient_error`).
- :mod:`.stats`: :class:`FetchStats` counters of bytes, requests, retries and seconds.
- :mod:`.deadline`: :class:`Deadline`, which bounds a read in time (the request in flight included) and lets
  whoever waits for it cancel it.
- :mod:`.transports`: one :class:`~.transports.Transport` per backend family (HTTP streaming with
  ``Range`` resume, fsspec range reads for S3/GCS/``memory://``, local files), behind the ``TRANSPORTS``
  registry and chosen once per filesystem.
- :mod:`.reader`: :class:`RemoteReader` (whole objects, byte ranges, sizes, seekable streams; checksums;
  retries written once) and :func:`open_url`; :mod:`.stream` holds the seekable stream, :mod:`.checksum` the
  one checksum check and its message.

Manifests, shards, IDX files and the writer's appends all read through a :class:`RemoteReader`.
"""

from __future__ import annotations

from lightning_patterns.data.remote.deadline import Deadline
from lightning_patterns.data.remote.reader import RemoteReader, open_url
from lightning_patterns.data.remote.retry import RetryPolicy, is_transient_error
from lightning_patterns.data.remote.stats import FetchStats, FetchStatsSnapshot
from lightning_patterns.data.remote.transports import TRANSPORTS, Transport

__all__ = [
    "Deadline",
    "FetchStats",
    "FetchStatsSnapshot",
    "RemoteReader",
    "RetryPolicy",
    "TRANSPORTS",
    "Transport",
    "is_transient_error",
    "open_url",
]
