"""The contract every remote backend keeps: the same read, range, retry and checksum cases on each of its sites.

Subclass :class:`RemoteSourceContract` in a test module (the subclass's name must start with ``Test``) and
every test here runs once per *site*: somewhere objects are put and then read back through
:class:`~lightning_patterns.data.remote.RemoteReader` over a real protocol. The sites we claim:

- ``local``: a folder (the ``"local"`` transport);
- ``memory``: fsspec's ``memory://`` (the ``"range"`` transport);
- ``http``: the project's HTTP server on 127.0.0.1 (the ``"http"`` transport);
- ``s3``: moto's S3 server on 127.0.0.1, through s3fs (the ``"range"`` transport).

``test_every_registered_transport_has_a_site`` fails until every transport of
:data:`~lightning_patterns.data.remote.TRANSPORTS` (a new one registered by another package too) is served by
a site: add one by overriding :meth:`RemoteSourceContract.sites`. Faults are real: an object shorter than its
declared size, completed while the reader backs off.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest

from lightning_patterns.data.remote import TRANSPORTS, RemoteReader, RetryPolicy
from lightning_patterns.exceptions import ChecksumMismatchError, ShardNotFoundError
from lightning_patterns.testing.http_server import serve_directory
from lightning_patterns.testing.s3_server import MotoS3Server, moto_s3_server

__all__ = ["RemoteSourceContract", "SITES", "Site", "SiteFactory", "SiteKind"]

_SIZE = 100_000
_CHUNK = 16_384  # several chunks per object for transports that read in chunks
_FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, timeout=5.0)


@dataclass(frozen=True)
class Site:
    """Where a backend's objects live for one test.

    Args:
        transport: The registry name of the transport that must serve ``url``.
        url: The root URL the reader reads under.
        write: ``write(name, data)`` puts (or replaces) the object ``name`` under ``url``.
        storage_options: What the reader passes to fsspec for ``url``.
    """

    transport: str
    url: str
    write: Callable[[str, bytes], object]
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def url_for(self, name: str) -> str:
        """The URL of object ``name``."""
        return f"{self.url}/{name}"


SiteFactory = Callable[[Path, pytest.FixtureRequest], contextlib.AbstractContextManager[Site]]
"""``factory(tmp_path, request)``: a context manager giving a :class:`Site` for one test."""


@contextlib.contextmanager
def _local_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    yield Site("local", str(tmp_path), lambda name, data: (tmp_path / name).write_bytes(data))


@contextlib.contextmanager
def _memory_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    fs = fsspec.filesystem("memory")
    root = f"/remote-contract-{uuid.uuid4().hex}"
    try:
        yield Site("range", f"memory://{root}", lambda name, data: fs.pipe_file(f"{root}/{name}", data))
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


@contextlib.contextmanager
def _http_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    with serve_directory(tmp_path) as server:
        yield Site("http", server.url, lambda name, data: (tmp_path / name).write_bytes(data))


class _LazyS3:
    """A moto S3 server, a bucket and a client writing to it, started on first use (only ``s3`` sites pay for it)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._started: tuple[MotoS3Server, str, Any] | None = None

    def get(self) -> tuple[MotoS3Server, str, Any]:
        """The server, the bucket's name, and an s3fs filesystem writing to it (one client for all tests)."""
        if self._started is None:
            pytest.importorskip("s3fs")
            server = self._stack.enter_context(moto_s3_server())
            bucket = server.create_bucket(f"remote-contract-{uuid.uuid4().hex[:12]}").removeprefix("s3://")
            self._started = server, bucket, server.filesystem()
        return self._started

    def close(self) -> None:
        """Stop the server, if it was started."""
        self._stack.close()


@contextlib.contextmanager
def _s3_site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    server, bucket, fs = request.getfixturevalue("s3_service").get()
    prefix = f"{bucket}/{uuid.uuid4().hex}"
    yield Site(
        "s3", f"s3://{prefix}", lambda name, data: fs.pipe_file(f"{prefix}/{name}", data), server.storage_options
    )


@dataclass(frozen=True)
class SiteKind:
    """A kind of site: the transport that serves it, and how to open one for a test.

    Args:
        transport: The registry name of the transport that must serve the site.
        open: ``open(tmp_path, request)``: a context manager giving a :class:`Site` for one test.
    """

    transport: str
    open: SiteFactory


SITES: dict[str, SiteKind] = {
    "http": SiteKind("http", _http_site),
    "local": SiteKind("local", _local_site),
    "memory": SiteKind("range", _memory_site),
    "s3": SiteKind("s3", _s3_site),
}
"""The sites every backend we claim is tested on, by name."""


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _on_first_retry(action: Callable[[], object]) -> Iterator[None]:
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


class RemoteSourceContract:
    """Tests every remote backend must pass on each of its sites (see the module)."""

    def sites(self) -> dict[str, SiteKind]:
        """The sites to test, by name: :data:`SITES` (override to add a new backend's)."""
        return dict(SITES)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run each test that takes ``site`` once per site of :meth:`sites`."""
        if "site_name" in metafunc.fixturenames:
            metafunc.parametrize("site_name", sorted(self.sites()))

    @pytest.fixture(scope="class")
    @classmethod
    def s3_service(cls) -> Iterator[_LazyS3]:
        """One moto S3 server on 127.0.0.1 and a bucket for the class, started when an ``s3`` site first needs it."""
        service = _LazyS3()
        try:
            yield service
        finally:
            service.close()

    @pytest.fixture
    def site(
        self, site_name: str, tmp_path: Path, request: pytest.FixtureRequest, s3_service: _LazyS3
    ) -> Iterator[Site]:
        """The site under test, for this test only (``s3_service`` starts nothing unless the site needs S3)."""
        kind = self.sites()[site_name]
        with kind.open(tmp_path, request) as served:
            assert served.transport == kind.transport, f"site {site_name!r} must be served by {kind.transport!r}"
            yield served

    @pytest.fixture
    def payload(self) -> bytes:
        """Random bytes, several chunks long."""
        return os.urandom(_SIZE)

    def _reader(self, site: Site, retry: RetryPolicy = _FAST) -> RemoteReader:
        reader = RemoteReader(site.url, site.storage_options, retry=retry, chunk_size=_CHUNK, seed=0)
        assert reader.transport.name == site.transport, "the site must be served by the transport under test"
        return reader

    # ---------------------------------------------------------------- registry

    def test_every_registered_transport_has_a_site(self) -> None:
        """A transport no site exercises would run none of this contract."""
        missing = sorted(set(TRANSPORTS.names()) - {kind.transport for kind in self.sites().values()})
        assert not missing, f"transports {missing} have no test site: add one to sites() to run the contract on them"

    # ---------------------------------------------------------------- reads

    @pytest.mark.parametrize("known_size", [True, False])
    def test_fetch_reads_the_whole_object_and_counts_it(self, site: Site, payload: bytes, known_size: bool) -> None:
        """A fetch returns the whole object, by relative or absolute URL, counted in the reader's stats."""
        site.write("a.bin", payload)
        with self._reader(site) as reader:
            assert reader.fetch("a.bin", size=_SIZE if known_size else None, checksum=_sha256(payload)) == payload
            assert reader.fetch(site.url_for("a.bin")) == payload  # absolute URLs work too
            stats = reader.stats.snapshot()
        assert stats.bytes_read == 2 * _SIZE
        assert stats.retries == 0
        assert stats.requests >= 2

    def test_read_range_returns_exact_slices(self, site: Site, payload: bytes) -> None:
        """Byte ranges are exact, empty ranges are empty, and ``short_ok`` stops at the object's end."""
        site.write("a.bin", payload)
        with self._reader(site) as reader:
            assert reader.read_range("a.bin", 0, 10) == payload[:10]
            assert reader.read_range("a.bin", 12_345, 67_890) == payload[12_345:67_890]
            assert reader.read_range("a.bin", _SIZE - 7) == payload[-7:]
            assert reader.read_range("a.bin", 5, 5) == b""
            assert reader.read_range("a.bin", _SIZE - 100, _SIZE + 100, short_ok=True) == payload[-100:]
            assert reader.stats.retries == 0

    def test_size_exists_and_is_file(self, site: Site, payload: bytes) -> None:
        """Sizes and existence checks of present and missing objects."""
        site.write("a.bin", payload)
        with self._reader(site) as reader:
            assert reader.size("a.bin") == _SIZE
            assert reader.exists("a.bin")
            assert not reader.exists("nope.bin")
            assert reader.is_file("nope.bin") is False

    def test_open_streams_seeks_and_reads_into_buffers(self, site: Site, payload: bytes) -> None:
        """A seekable stream over the object reads, reads into buffers and seeks from the end."""
        site.write("a.bin", payload)
        with self._reader(site) as reader, reader.open("a.bin", block_size=10_000) as f:
            assert f.read(10) == payload[:10]
            buf = bytearray(300)
            assert f.readinto(buf) == 300
            assert bytes(buf) == payload[10:310]
            assert f.seek(-50, io.SEEK_END) == _SIZE - 50
            assert f.read() == payload[-50:]

    def test_reader_pickles_and_reads_after_unpickling(self, site: Site, payload: bytes) -> None:
        """A reader sent to a DataLoader worker reads the same objects with the same transport."""
        site.write("a.bin", payload)
        with self._reader(site) as reader:
            assert reader.fetch("a.bin") == payload
            with pickle.loads(pickle.dumps(reader)) as clone:
                assert clone.fetch("a.bin", size=_SIZE) == payload
                assert clone.transport.name == site.transport

    # ---------------------------------------------------------------- faults

    def test_missing_object_fails_at_once_naming_its_url(self, site: Site) -> None:
        """A missing object is not retried, and the error names its URL."""
        with self._reader(site) as reader:
            with pytest.raises(ShardNotFoundError, match=re.escape(site.url_for("missing.bin"))):
                reader.fetch("missing.bin")
            with pytest.raises(FileNotFoundError, match=re.escape(site.url_for("missing.bin"))):
                reader.read_range("missing.bin", 0, 10)
            assert reader.stats.retries == 0

    def test_a_short_object_is_retried_and_resumes_at_the_byte_reached(self, site: Site, payload: bytes) -> None:
        """An object shorter than its declared size (still being written) is read on once it is complete."""
        site.write("a.bin", payload[: _SIZE // 2])
        with self._reader(site) as reader, _on_first_retry(lambda: site.write("a.bin", payload)):
            assert reader.fetch("a.bin", size=_SIZE, checksum=_sha256(payload)) == payload
            stats = reader.stats.snapshot()
        assert stats.retries == 1
        assert stats.bytes_read == _SIZE, "the retry must resume at the byte reached, not read the object again"

    def test_a_persistently_short_object_fails_after_max_attempts(self, site: Site, payload: bytes) -> None:
        """A remote that never completes the object fails after ``max_attempts``, naming the URL and the byte."""
        site.write("a.bin", payload[: _SIZE // 2])
        policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)
        with self._reader(site, policy) as reader, pytest.raises(OSError, match="failed 3 times in a row") as info:
            reader.fetch("a.bin", size=_SIZE)
        message = str(info.value)
        assert f"{site.url_for('a.bin')} at byte {_SIZE // 2}" in message
        assert "EOFError" in message
        assert reader.stats.retries == 2

    def test_checksum_mismatch_refetches_once_then_names_url_and_both_checksums(
        self, site: Site, payload: bytes
    ) -> None:
        """A checksum mismatch is fetched once more, then fails naming the URL, both checksums and the fix."""
        site.write("a.bin", payload)
        wrong = _sha256(b"other bytes")
        with self._reader(site) as reader:
            with pytest.raises(ChecksumMismatchError) as info:
                reader.fetch("a.bin", size=_SIZE, checksum=wrong)
            stats = reader.stats.snapshot()
        message = str(info.value)
        assert f"Checksum mismatch for {site.url_for('a.bin')}: expected {wrong} got {_sha256(payload)}" in message
        assert "on 2 fetches in a row" in message
        assert "write the shard again, or regenerate the manifest" in message
        assert stats.retries == 1
        assert stats.bytes_read == 2 * _SIZE
