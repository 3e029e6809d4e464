"""The contract every registered transport keeps: the same read, range, retry and checksum cases for each.

The ``site`` fixture is parametrized over ``TRANSPORTS``, so a new transport runs every case here once it has a
site in ``SITES`` (somewhere to put objects that its protocol reads), and
``test_every_registered_transport_has_a_site`` fails until it does. Faults are real: an object shorter than
its declared size, completed while the reader backs off, on each backend (local files, ``memory://``, and the
project's HTTP server on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from lightning_patterns.data.remote import TRANSPORTS, RemoteReader, RetryPolicy
from lightning_patterns.exceptions import ChecksumMismatchError, ShardNotFoundError
from lightning_patterns.testing.http_server import serve_directory
from lightning_patterns.testing.s3_server import MotoS3Server, moto_s3_server

SIZE = 100_000
CHUNK = 16_384  # several chunks per object for transports that read in chunks
FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, timeout=5.0)


class Site:
    """Where a transport's objects live: a root URL, and a way to (re)write an object under it."""

    def __init__(self, transport: str, url: str, write: Callable[[str, bytes], None]) -> None:
        self.transport = transport
        self.url = url
        self.write = write
        self.storage_options: dict[str, Any] = {}

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"


@contextlib.contextmanager
def _local_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    yield Site("local", str(tmp_path), lambda name, data: (tmp_path / name).write_bytes(data))


@contextlib.contextmanager
def _memory_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    fs = fsspec.filesystem("memory")
    root = f"/transport-contract-{uuid.uuid4().hex}"
    try:
        yield Site("range", f"memory://{root}", lambda name, data: fs.pipe_file(f"{root}/{name}", data))
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


@contextlib.contextmanager
def _http_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    with serve_directory(tmp_path) as server:
        yield Site("http", server.url, lambda name, data: (tmp_path / name).write_bytes(data))


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoS3Server]:
    """One moto S3 server on 127.0.0.1 for the module's S3 cases (each uses a prefix of its own)."""
    with moto_s3_server() as server:
        server.create_bucket("transport-contract")
        yield server


@contextlib.contextmanager
def _s3_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    server: MotoS3Server = request.getfixturevalue("s3_server")
    fs = server.filesystem()
    root = f"transport-contract/{uuid.uuid4().hex}"
    site = Site("s3", f"s3://{root}", lambda name, data: fs.pipe_file(f"{root}/{name}", data))
    site.storage_options = server.storage_options
    yield site


# Registry name -> a site its transport serves.
SITES: dict[str, Callable[[Path, pytest.FixtureRequest], contextlib.AbstractContextManager[Site]]] = {
    "http": _http_site,
    "local": _local_site,
    "range": _memory_site,
    "s3": _s3_site,
}


def test_every_registered_transport_has_a_site() -> None:
    missing = sorted(set(TRANSPORTS.names()) - set(SITES))
    assert not missing, f"transports {missing} have no test site: add one to SITES to run the contract on them"


@pytest.fixture(params=TRANSPORTS.names())
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    name = request.param
    if name not in SITES:
        pytest.fail(f"transport {name!r} has no test site in SITES")
    with SITES[name](tmp_path, request) as served:
        yield served


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


def _reader(site: Site, retry: RetryPolicy = FAST) -> RemoteReader:
    reader = RemoteReader(site.url, site.storage_options, retry=retry, chunk_size=CHUNK, seed=0)
    assert reader.transport.name == site.transport, "the site must be served by the transport under test"
    return reader


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _on_first_retry(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` once, when the reader logs its first retry (while it backs off, before asking again)."""
    logger = logging.getLogger("lightning_patterns.data.remote.reader")

    class _Hook(logging.Handler):
        fired = False

        def emit(self, record: logging.LogRecord) -> None:
            if not self.fired and "retrying" in record.getMessage():
                self.fired = True
                action()

    hook, level = _Hook(), logger.level
    logger.addHandler(hook)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(hook)
        logger.setLevel(level)
    assert hook.fired, "the read was expected to retry"


# ---------------------------------------------------------------- reads


@pytest.mark.parametrize("known_size", [True, False])
def test_fetch_reads_the_whole_object_and_counts_it(site: Site, payload: bytes, known_size: bool) -> None:
    site.write("a.bin", payload)
    with _reader(site) as reader:
        assert reader.fetch("a.bin", size=SIZE if known_size else None, checksum=sha256(payload)) == payload
        assert reader.fetch(site.url_for("a.bin")) == payload  # absolute URLs work too
        stats = reader.stats.snapshot()
    assert stats.bytes_read == 2 * SIZE
    assert stats.retries == 0
    assert stats.requests >= 2


def test_read_range_returns_exact_slices(site: Site, payload: bytes) -> None:
    site.write("a.bin", payload)
    with _reader(site) as reader:
        assert reader.read_range("a.bin", 0, 10) == payload[:10]
        assert reader.read_range("a.bin", 12_345, 67_890) == payload[12_345:67_890]
        assert reader.read_range("a.bin", SIZE - 7) == payload[-7:]
        assert reader.read_range("a.bin", 5, 5) == b""
        # short_ok: the end asked for is a most; the answer stops at the object's end.
        assert reader.read_range("a.bin", SIZE - 100, SIZE + 100, short_ok=True) == payload[-100:]
        assert reader.stats.retries == 0


def test_size_exists_and_is_file(site: Site, payload: bytes) -> None:
    site.write("a.bin", payload)
    with _reader(site) as reader:
        assert reader.size("a.bin") == SIZE
        assert reader.exists("a.bin")
        assert not reader.exists("nope.bin")
        assert reader.is_file("nope.bin") is False


def test_open_streams_seeks_and_reads_into_buffers(site: Site, payload: bytes) -> None:
    site.write("a.bin", payload)
    with _reader(site) as reader, reader.open("a.bin", block_size=10_000) as f:
        assert f.read(10) == payload[:10]
        buf = bytearray(300)
        assert f.readinto(buf) == 300
        assert bytes(buf) == payload[10:310]
        assert f.seek(-50, io.SEEK_END) == SIZE - 50
        assert f.read() == payload[-50:]


def test_reader_pickles_and_reads_after_unpickling(site: Site, payload: bytes) -> None:
    site.write("a.bin", payload)
    with _reader(site) as reader:
        assert reader.fetch("a.bin") == payload
        with pickle.loads(pickle.dumps(reader)) as clone:
            assert clone.fetch("a.bin", size=SIZE) == payload
            assert clone.transport.name == site.transport


# ---------------------------------------------------------------- faults


def test_missing_object_fails_at_once_naming_its_url(site: Site) -> None:
    with _reader(site) as reader:
        with pytest.raises(ShardNotFoundError, match=re.escape(site.url_for("missing.bin"))):
            reader.fetch("missing.bin")
        with pytest.raises(FileNotFoundError, match=re.escape(site.url_for("missing.bin"))):
            reader.read_range("missing.bin", 0, 10)
        assert reader.stats.retries == 0


def test_a_short_object_is_retried_and_resumes_at_the_byte_reached(site: Site, payload: bytes) -> None:
    """An object shorter than its declared size (still being written) is read on once it is complete."""
    site.write("a.bin", payload[: SIZE // 2])
    with _reader(site) as reader, _on_first_retry(lambda: site.write("a.bin", payload)):
        assert reader.fetch("a.bin", size=SIZE, checksum=sha256(payload)) == payload
        stats = reader.stats.snapshot()
    assert stats.retries == 1
    assert stats.bytes_read == SIZE, "the retry must resume at the byte reached, not read the object again"


def test_a_persistently_short_object_fails_after_max_attempts(site: Site, payload: bytes) -> None:
    site.write("a.bin", payload[: SIZE // 2])
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)
    with _reader(site, policy) as reader, pytest.raises(OSError, match="failed 3 times in a row") as info:
        reader.fetch("a.bin", size=SIZE)
    message = str(info.value)
    assert f"{site.url_for('a.bin')} at byte {SIZE // 2}" in message
    assert "EOFError" in message
    assert reader.stats.retries == 2


def test_checksum_mismatch_refetches_once_then_names_url_and_both_checksums(site: Site, payload: bytes) -> None:
    site.write("a.bin", payload)
    wrong = sha256(b"other bytes")
    with _reader(site) as reader:
        with pytest.raises(ChecksumMismatchError) as info:
            reader.fetch("a.bin", size=SIZE, checksum=wrong)
        stats = reader.stats.snapshot()
    message = str(info.value)
    assert f"Checksum mismatch for {site.url_for('a.bin')}: expected {wrong} got {sha256(payload)}" in message
    assert "on 2 fetches in a row" in message
    assert "write the shard again, or regenerate the manifest" in message
    assert stats.retries == 1
    assert stats.bytes_read == 2 * SIZE
