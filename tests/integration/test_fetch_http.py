"""Fetching many objects through a server that fails 5% of requests still gives exactly the right bytes."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path

import pytest

from lightning_patterns.data.remote import FetchStats, RemoteReader, RetryPolicy
from lightning_patterns.testing.http_server import serve_directory

pytestmark = pytest.mark.remote

NUM_OBJECTS = 200
OBJECT_SIZE = 64 * 1024


@pytest.mark.parametrize("known_size", [True, False])
def test_every_object_is_exact_despite_five_percent_failures(tmp_path: Path, known_size: bool) -> None:
    objects = {f"shard-{i:04d}.bin": os.urandom(OBJECT_SIZE) for i in range(NUM_OBJECTS)}
    for name, data in objects.items():
        (tmp_path / name).write_bytes(data)
    # A stall (0.3 s) outlasts the client's timeout (0.1 s): it must be retried like the other faults.
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.02, timeout=0.1)
    stats = FetchStats()
    with (
        serve_directory(tmp_path, failure_rate=0.05, stall_seconds=0.3, seed=7) as server,
        RemoteReader(server.url, retry=policy, stats=stats, seed=0) as reader,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):

        def fetch(name: str) -> bytes:
            checksum = "sha256:" + hashlib.sha256(objects[name]).hexdigest()
            return reader.fetch(name, size=OBJECT_SIZE if known_size else None, checksum=checksum)

        results = dict(zip(objects, pool.map(fetch, objects), strict=True))
        faults = server.fault_count
        served = server.bytes_sent
    assert results == objects
    assert faults > 0
    assert stats.retries >= 1
    assert stats.requests >= NUM_OBJECTS + stats.retries - faults  # every retry is one more request
    # Resuming means the bytes served stay close to the data size: no object is downloaded twice in full.
    assert NUM_OBJECTS * OBJECT_SIZE <= served < NUM_OBJECTS * OBJECT_SIZE * 1.2
