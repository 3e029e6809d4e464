"""Unit tests of RemoteReader: faults over HTTP, other backends, pickling and streams."""

from __future__ import annotations

import concurrent.futures
import errno
import gzip
import hashlib
import io
import logging
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from lightning_patterns.data.remote import (
    RemoteReader,
    RetryPolicy,
    open_url,
)
from lightning_patterns.exceptions import ChecksumMismatchError, ShardNotFoundError
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, timeout=1.0)
SIZE = 300_000


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    data = os.urandom(SIZE)
    (tmp_path / "a.bin").write_bytes(data)
    return data


@pytest.fixture
def server(tmp_path: Path, payload: bytes) -> Iterator[FaultInjectingHTTPServer]:
    with serve_directory(tmp_path, stall_seconds=0.4) as srv:
        yield srv


@pytest.fixture
def reader(server: FaultInjectingHTTPServer) -> Iterator[RemoteReader]:
    with RemoteReader(server.url, retry=FAST, seed=0) as r:
        yield r


# ---------------------------------------------------------------- RemoteReader arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": ""}, "url=''"),
        ({"url": "memory://x", "chunk_size": 0}, "chunk_size=0"),
        ({"url": "memory://x", "retry": 3}, "retry=3"),
    ],
)
def test_remote_reader_rejects_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        RemoteReader(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- faults over HTTP


@pytest.mark.remote
@pytest.mark.parametrize("fault", ["500", "503", "truncate", "stall"])
@pytest.mark.parametrize("known_size", [True, False])
def test_fetch_recovers_from_each_fault(
    server: FaultInjectingHTTPServer, payload: bytes, fault: str, known_size: bool
) -> None:
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, timeout=0.1 if fault == "stall" else 1.0)
    with RemoteReader(server.url, retry=policy) as reader:
        server.inject("a.bin", fault)
        data = reader.fetch("a.bin", size=SIZE if known_size else None)
        assert data == payload
        assert reader.stats.retries == 1
        assert reader.stats.bytes_read >= SIZE
    gets = [r for r in server.requests_for("a.bin") if r.method == "GET"]
    assert any(r.fault is None and r.bytes_sent > 0 for r in gets)
    # A stalled request is logged only when its (late) answer is done, so it may not be logged yet.
    assert fault == "stall" or gets[0].fault == fault


@pytest.mark.remote
def test_fetch_recovers_from_connection_resets(server: FaultInjectingHTTPServer, payload: bytes) -> None:
    with RemoteReader(server.url, retry=FAST) as reader:
        assert reader.fetch("a.bin") == payload  # opens a keep-alive connection
        server.inject("a.bin", "reset", "reset", "reset")
        assert reader.fetch("a.bin") == payload
        # aiohttp itself retries once on a reused connection; the rest are ours.
        assert reader.stats.retries >= 1
    assert server.fault_count == 3


@pytest.mark.remote
@pytest.mark.parametrize("known_size", [True, False])
def test_truncated_body_resumes_from_the_offset_reached(
    server: FaultInjectingHTTPServer, reader: RemoteReader, payload: bytes, known_size: bool
) -> None:
    server.inject("a.bin", "truncate", "truncate")
    assert reader.fetch("a.bin", size=SIZE if known_size else None) == payload
    gets = [r for r in server.requests_for("a.bin") if r.method == "GET"]
    assert len(gets) == 3
    first, second, third = gets
    assert first.fault == second.fault == "truncate"
    assert first.bytes_sent == SIZE // 2
    # Each retry asks only for what is missing, starting exactly where the last body stopped.
    assert second.range == (SIZE // 2, SIZE)
    assert third.range == (SIZE // 2 + second.bytes_sent, SIZE)
    assert sum(r.bytes_sent for r in gets) == SIZE
    assert reader.stats.bytes_read == SIZE
    assert reader.stats.retries == 2


@pytest.mark.remote
def test_checksum_mismatch_refetches_once_then_names_url_and_both_checksums(
    server: FaultInjectingHTTPServer, reader: RemoteReader, payload: bytes
) -> None:
    wrong = sha256(b"something else")
    actual = sha256(payload)
    with pytest.raises(ChecksumMismatchError) as info:
        reader.fetch("a.bin", size=SIZE, checksum=wrong)
    message = str(info.value)
    assert server.url_for("a.bin") in message
    assert wrong in message
    assert actual in message
    assert len(server.requests_for("a.bin")) == 2
    assert reader.stats.retries == 1


@pytest.mark.remote
def test_checksum_match_is_accepted(server: FaultInjectingHTTPServer, reader: RemoteReader, payload: bytes) -> None:
    server.inject("a.bin", "truncate")
    assert reader.fetch(server.url_for("a.bin"), checksum=sha256(payload)) == payload


@pytest.mark.parametrize("checksum", ["abc", "sha256", "nohash:abcd", "sha256:"])
def test_malformed_checksum_is_a_clear_value_error(checksum: str) -> None:
    with RemoteReader("memory://x") as reader, pytest.raises(ValueError, match="<algorithm>:<hex digest>"):
        reader.fetch("a.bin", checksum=checksum)


@pytest.mark.remote
def test_missing_object_raises_shard_not_found_without_retrying(
    server: FaultInjectingHTTPServer, reader: RemoteReader
) -> None:
    url = server.url_for("missing.bin")
    with pytest.raises(ShardNotFoundError) as info:
        reader.fetch(url)
    assert url in str(info.value)
    assert info.value.errno == errno.ENOENT
    assert len(server.requests_for("missing.bin")) == 1
    assert reader.stats.retries == 0


@pytest.mark.remote
def test_persistent_fault_gives_up_after_max_attempts(server: FaultInjectingHTTPServer, payload: bytes) -> None:
    server.inject("a.bin", *["503"] * 10)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)
    with RemoteReader(server.url, retry=policy) as reader, pytest.raises(OSError, match="failed 3 times") as info:
        reader.fetch("a.bin", size=SIZE)
    assert server.url_for("a.bin") in str(info.value)
    assert "HTTP 503" in str(info.value)
    assert "max_attempts=6" in str(info.value)
    assert len(server.requests_for("a.bin")) == 3


@pytest.mark.remote
def test_retry_logs_never_show_storage_options(
    server: FaultInjectingHTTPServer, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"headers": {"Authorization": "Bearer TOPSECRET"}}
    server.inject("a.bin", "500", "truncate")
    with caplog.at_level(logging.INFO), RemoteReader(server.url, options, retry=FAST) as reader:
        assert reader.fetch("a.bin") == payload
    assert "retrying" in caplog.text
    assert "TOPSECRET" not in caplog.text


@pytest.mark.remote
def test_concurrent_fetches_from_threads_share_one_reader(tmp_path: Path) -> None:
    blobs = {f"o{i}.bin": os.urandom(20_000 + i) for i in range(24)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    with (
        serve_directory(tmp_path, failure_rate=0.2, faults=("500", "503", "truncate", "reset"), seed=1) as server,
        RemoteReader(server.url, retry=FAST) as reader,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        results = dict(zip(blobs, pool.map(reader.fetch, blobs), strict=True))
        assert server.fault_count > 0
    assert results == blobs
    assert reader.stats.requests >= len(blobs)


# ---------------------------------------------------------------- other backends, pickling, streams


def test_memory_urls_are_read_in_chunked_range_requests() -> None:
    data = os.urandom(10_000)
    fs = fsspec.filesystem("memory")
    fs.pipe("/fetch-test/a.bin", data)
    try:
        with RemoteReader("memory://fetch-test", chunk_size=4096, retry=FAST) as reader:
            assert reader.fetch("a.bin", checksum=sha256(data)) == data
            assert reader.stats.requests == 1 + 3  # one size lookup, three chunks
            assert reader.fetch("memory://fetch-test/a.bin", size=len(data)) == data
            assert reader.read_range("a.bin", 100, 5000) == data[100:5000]
            with pytest.raises(ShardNotFoundError, match=re.escape("memory://fetch-test/nope.bin")):
                reader.fetch("nope.bin")
            with pytest.raises(ChecksumMismatchError, match="expected sha256:"):
                reader.fetch("a.bin", checksum=sha256(b"x"))
    finally:
        fs.rm("/fetch-test", recursive=True)


@pytest.mark.remote
def test_reader_pickles_by_constructor_arguments(
    server: FaultInjectingHTTPServer, reader: RemoteReader, payload: bytes
) -> None:
    assert reader.fetch("a.bin") == payload  # the filesystem exists now and must not travel
    with pickle.loads(pickle.dumps(reader)) as clone:
        assert clone is not reader
        assert (clone.url, clone.retry, clone.chunk_size, clone.seed) == (
            reader.url,
            reader.retry,
            reader.chunk_size,
            reader.seed,
        )
        assert clone.stats.bytes_read == SIZE
        server.inject("a.bin", "truncate")
        assert clone.fetch("a.bin") == payload
        assert clone.fs is not reader.fs


@pytest.mark.remote
def test_open_streams_blocks_and_seeks(server: FaultInjectingHTTPServer, reader: RemoteReader, payload: bytes) -> None:
    with reader.open("a.bin", block_size=50_000) as f:
        assert f.read(10) == payload[:10]
        f.seek(200_000)
        server.inject("a.bin", "truncate")
        assert f.read(60_000) == payload[200_000:260_000]
        assert f.read() == payload[260_000:]
    served = sum(r.bytes_sent for r in server.requests_for("a.bin"))
    assert served < SIZE  # bytes 50_000..200_000 were never requested


@pytest.mark.remote
def test_open_url_decompresses_gzip_and_closes_its_reader(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "a.bin.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "a.gzipped").write_bytes(gzip.compress(payload))
    with serve_directory(tmp_path) as server:
        for name in ("a.bin.gz", "a.gzipped"):
            with open_url(server.url_for(name), retry=FAST, block_size=8192) as f:
                assert f.read() == payload
        with open_url(server.url_for("a.bin.gz"), compression=None) as f:
            assert f.read(2) == b"\x1f\x8b"


# ---------------------------------------------------------------- streams


def test_open_stream_reads_into_buffers() -> None:
    data = bytes(range(256)) * 10
    fs = fsspec.filesystem("memory")
    fs.pipe("/fetch-stream/a.bin", data)
    try:
        with RemoteReader("memory://fetch-stream") as reader, reader.open("a.bin", block_size=100) as f:
            assert isinstance(f, io.BufferedReader)
            buf = bytearray(300)
            assert f.readinto(buf) == 300
            assert bytes(buf) == data[:300]
            assert f.seek(-10, io.SEEK_END) == len(data) - 10
            assert f.read() == data[-10:]
    finally:
        fs.rm("/fetch-stream", recursive=True)


@pytest.mark.parametrize("block", [7, 4096])
def test_a_stream_of_unknown_size_ends_without_retries(block: int) -> None:
    """When the backend cannot tell an object's size, the short read at its end is the end, not a fault to retry."""
    from lightning_patterns.data.remote.stream import _RangeStream

    data = bytes(range(256)) * 4 + b"tail"
    fsspec.filesystem("memory").pipe("/unknown_size/object.bin", data)
    with RemoteReader("memory://unknown_size", retry=RetryPolicy(max_attempts=5, initial_backoff=0.01)) as reader:
        stream = io.BufferedReader(_RangeStream(reader, "object.bin", None, owns_reader=False), buffer_size=block)
        assert stream.read() == data
        stats = reader.stats.snapshot()
    assert stats.retries == 0
    assert stats.bytes_read == len(data)


def test_a_relative_local_root_reads_urls_built_from_it_and_paths_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``StreamingDataset("data/train")`` builds shard URLs as ``data/train/<shard>``: no root added twice."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "a.bin").write_bytes(b"payload")
    monkeypatch.chdir(tmp_path)
    reader = RemoteReader("data/train")
    assert reader.fetch("data/train/a.bin") == b"payload"  # built from the root, as shard_url does
    assert reader.fetch("a.bin") == b"payload"  # relative to the root
