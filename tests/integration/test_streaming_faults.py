"""The streaming dataset survives remote faults: over a fault-injecting HTTP server and over moto's S3 behind a proxy.

Every test starts its servers on 127.0.0.1. With 5% of the requests failing (resets, 500/503, truncated bodies,
stalls longer than the client's timeout), an epoch still yields every sample exactly once, with the bytes that
were written. A corrupt shard is fetched twice and then named in the error, with both checksums; a missing shard
is named in a ``FileNotFoundError``; a cut-off body is resumed from the offset reached.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_patterns.data.remote import RetryPolicy
from lightning_patterns.data.shards import Manifest, ShardReader, write_dataset
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.streaming.options import ReadAhead
from lightning_patterns.data.synthetic import fashion_like_arrays
from lightning_patterns.exceptions import ChecksumMismatchError, ShardNotFoundError
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

pytestmark = pytest.mark.remote

NUM_SAMPLES = 5000
SHARD_BYTES = 100_000  # about 125 fashion-like samples: 40 shards, so 5% of the requests is a handful of faults
FAILURE_RATE = 0.05
# Stalls outlast the client's inactivity timeout, so they fail like the other faults and must be retried.
STALL_SECONDS = 0.3
FAST_RETRY = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, timeout=0.1)


class _Data:
    """The samples written, to check what an epoch yields against."""

    def __init__(self, num_samples: int) -> None:
        self.images, self.labels = fashion_like_arrays(num_samples)
        self.num_samples = num_samples

    def samples(self) -> Iterator[dict[str, Any]]:
        for i in range(self.num_samples):
            yield {"index": np.int64(i), "image": self.images[i], "label": self.labels[i]}

    def check_epoch(self, batches: Iterable[dict[str, Any]]) -> np.ndarray:
        """Assert that ``batches`` hold every sample exactly once, with its written values; return the order."""
        indices, images, labels = [], [], []
        for batch in batches:
            indices.append(batch["index"].numpy())
            images.append(batch["image"].numpy())
            labels.append(batch["label"].numpy())
        order = np.concatenate(indices)
        counts = np.bincount(order, minlength=self.num_samples)
        assert order.size == self.num_samples, f"{order.size} samples yielded, expected {self.num_samples}"
        assert np.flatnonzero(counts != 1).size == 0, f"yielded not exactly once: {np.flatnonzero(counts != 1)[:10]}"
        np.testing.assert_array_equal(np.concatenate(images), self.images[order])
        np.testing.assert_array_equal(np.concatenate(labels), self.labels[order])
        return order


@pytest.fixture(scope="module")
def data() -> _Data:
    return _Data(NUM_SAMPLES)


@pytest.fixture(scope="module")
def written(data: _Data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("fashion")
    manifest = write_dataset(data.samples(), str(root), shard_bytes=SHARD_BYTES, progress=False)
    assert len(manifest.shards) >= 30
    return root, manifest


def _start_faults(server: FaultInjectingHTTPServer) -> None:
    # The manifest is read in the constructor, before the faults start, so the faults land on shards only (a failed
    # manifest read is retried too: see test_a_failed_manifest_read_is_retried below).
    server.failure_rate = FAILURE_RATE


# ---------------------------------------------------------------------------------------------- HTTP, 5% faults


def test_http_epoch_is_exact_despite_five_percent_faults(data: _Data, written: tuple[Path, Manifest]) -> None:
    root, manifest = written
    with serve_directory(root, stall_seconds=STALL_SECONDS, seed=32) as server:
        dataset = StreamingDataset(server.url, batch_size=100, retry=FAST_RETRY)
        _start_faults(server)
        data.check_epoch(dataset)
        fault_count = server.fault_count
    # The seed puts four faults of four kinds among the first 40 requests (a stall is logged once it answers).
    assert fault_count >= 3
    metrics = dataset.metrics()
    assert metrics["retries"] >= 1
    assert metrics["samples"] == NUM_SAMPLES
    # Every retry is one more request; resuming keeps the bytes read close to the data size.
    assert metrics["remote_requests"] >= len(manifest.shards) + 1
    assert metrics["remote_bytes"] < 1.5 * sum(s.num_bytes for s in manifest.shards)


def test_http_shuffled_epoch_with_two_workers_is_exact_despite_faults(
    data: _Data, written: tuple[Path, Manifest]
) -> None:
    root, _ = written
    with serve_directory(root, stall_seconds=STALL_SECONDS, seed=123) as server:
        dataset = StreamingDataset(server.url, batch_size=64, shuffle=True, seed=11, retry=FAST_RETRY)
        loader = StreamingDataLoader(dataset, num_workers=2)
        _start_faults(server)
        order = data.check_epoch(loader)
        fault_count = server.fault_count
    assert fault_count >= 3
    assert not np.array_equal(order, np.sort(order)), "shuffle=True must change the order"
    assert dataset.metrics()["retries"] >= 1  # summed over the two worker processes


def test_truncated_and_stalled_shard_resumes_from_the_offset_reached(
    data: _Data, written: tuple[Path, Manifest]
) -> None:
    root, manifest = written
    shard = manifest.shards[len(manifest.shards) // 2]
    with serve_directory(root, stall_seconds=STALL_SECONDS) as server:
        dataset = StreamingDataset(server.url, batch_size=100, retry=FAST_RETRY)
        # Cut the first answer in half, then let the resumed request stall past the client's 0.1 s timeout.
        server.inject(shard.path, "truncate", "stall")
        data.check_epoch(dataset)
        # A stalled request is logged when it answers, after the client gave up on it: wait for it.
        deadline = time.monotonic() + 5.0
        while len(server.requests_for(shard.path)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        log = server.requests_for(shard.path)
    assert [r.fault for r in log].count("stall") == 1
    truncated, retries = log[0], log[1:]
    assert truncated.fault == "truncate"
    assert truncated.range == (0, shard.num_bytes)
    resumed = truncated.bytes_sent
    assert 0 < resumed < shard.num_bytes
    # Every retry asks only for the bytes still missing (a loaded machine may add timeouts: never a restart).
    assert all(r.range is not None and resumed <= r.range[0] < shard.num_bytes for r in retries)
    assert retries[0].range == (resumed, shard.num_bytes)
    answered = [r for r in retries if r.fault is None and r.status == 206]
    assert answered[-1].range is not None
    assert answered[-1].range[1] == shard.num_bytes
    assert answered[-1].range[0] + answered[-1].bytes_sent == shard.num_bytes
    assert dataset.metrics()["retries"] >= 2


# ---------------------------------------------------------------------------------------------- corrupt or missing


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Manifest]:
    root = tmp_path / "small"
    manifest = write_dataset(_Data(400).samples(), str(root), shard_bytes=SHARD_BYTES, progress=False)
    assert len(manifest.shards) >= 3
    return root, manifest


@pytest.fixture
def small_without_blocks(tmp_path: Path) -> tuple[Path, Manifest]:
    root = tmp_path / "small"
    manifest = write_dataset(_Data(400).samples(), str(root), shard_bytes=SHARD_BYTES, block_bytes=None, progress=False)
    assert len(manifest.shards) >= 3
    assert not any(shard.has_blocks for shard in manifest.shards)
    return root, manifest


def _read_until_the_checksum_fails(root: Path, shard_path: str) -> tuple[str, list[Any], str]:
    """Stream ``root`` over HTTP until a checksum fails: the error's message, the shard's GETs and its URL."""
    with serve_directory(root) as server:
        dataset = StreamingDataset(
            server.url, batch_size=50, read_ahead=ReadAhead(shards=0, threads=1), retry=FAST_RETRY
        )
        with pytest.raises(ChecksumMismatchError) as info:
            list(dataset)
        fetches = [r for r in server.requests_for(shard_path) if r.method == "GET"]
        url = server.url_for(shard_path)
    return str(info.value), fetches, url


def test_corrupt_shard_is_fetched_twice_then_named_with_both_checksums(
    small_without_blocks: tuple[Path, Manifest],
) -> None:
    # A shard without a block table is fetched whole, twice, and its checksums named.
    root, manifest = small_without_blocks
    shard = manifest.shards[1]
    path = root / shard.path
    corrupt = bytearray(path.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(corrupt))
    actual = "sha256:" + hashlib.sha256(corrupt).hexdigest()
    assert shard.checksum.startswith("sha256:")
    assert actual != shard.checksum
    message, fetches, url = _read_until_the_checksum_fails(root, shard.path)
    assert url in message
    assert f"expected {shard.checksum}" in message
    assert f"got {actual}" in message
    assert len(fetches) == 2
    assert all(r.bytes_sent == shard.num_bytes for r in fetches)


def test_a_corrupt_block_is_fetched_twice_then_named_with_the_shards_and_the_blocks_checksums(
    small: tuple[Path, Manifest],
) -> None:
    # With a block table, every block is verified as it arrives; only the blocks that differ are fetched again.
    root, manifest = small
    shard = manifest.shards[1]
    assert shard.has_blocks
    path = root / shard.path
    corrupt = bytearray(path.read_bytes())
    at = len(corrupt) // 2
    corrupt[at] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    actual = "sha256:" + hashlib.sha256(corrupt).hexdigest()
    header = ShardReader(bytes(corrupt)).header
    assert header.blocks is not None
    block = header.blocks.blocks_of(at, at + 1)[0]
    start, stop = header.blocks.bounds(block)
    message, fetches, url = _read_until_the_checksum_fails(root, shard.path)
    assert url in message
    assert f"expected {shard.checksum}" in message
    assert f"got {actual}" in message
    assert f"on 2 fetches in a row; block {block} of {header.blocks.count} (bytes [{start}, {stop}))" in message
    assert len(fetches) == 2
    assert fetches[0].bytes_sent == shard.num_bytes  # the whole shard
    assert fetches[1].range == (start, stop)  # then the block that differed
    assert fetches[1].bytes_sent == stop - start


def test_corrupt_shard_is_not_an_error_without_verification(small: tuple[Path, Manifest]) -> None:
    root, manifest = small
    path = root / manifest.shards[0].path
    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0xFF  # the last byte of the last sample's image: still decodable
    path.write_bytes(bytes(corrupt))
    with serve_directory(root) as server:
        dataset = StreamingDataset(server.url, batch_size=50, verify_checksums=False)
        assert sum(len(batch["index"]) for batch in dataset) == manifest.num_samples


def test_missing_shard_fails_at_once_with_its_url(small: tuple[Path, Manifest]) -> None:
    root, manifest = small
    shard = manifest.shards[-1]
    (root / shard.path).unlink()
    with serve_directory(root) as server:
        dataset = StreamingDataset(server.url, batch_size=50, retry=FAST_RETRY)
        with pytest.raises(ShardNotFoundError) as info:
            list(dataset)
        fetches = server.requests_for(shard.path)
        url = server.url_for(shard.path)
    assert isinstance(info.value, FileNotFoundError)
    assert url in str(info.value)
    assert [r.status for r in fetches] == [404], "a missing shard must not be retried"


def test_a_failed_manifest_read_is_retried(small: tuple[Path, Manifest]) -> None:
    root, manifest = small
    with serve_directory(root) as server:
        server.inject("manifest.json", "503")
        dataset = StreamingDataset(server.url, batch_size=50, retry=FAST_RETRY)
        assert sum(len(batch["index"]) for batch in dataset) == manifest.num_samples


# ---------------------------------------------------------------------------------------------- S3 through a proxy

S3_SAMPLES = 2000


@pytest.fixture(scope="module")
def s3_dataset(data: _Data) -> Iterator[tuple[Any, str, Manifest]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from lightning_patterns.testing import moto_s3_server

    # moto's server logs every request through werkzeug; keep the test output readable.
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    try:
        with moto_s3_server() as s3:
            root = s3.create_bucket("streaming-faults") + "/fashion"
            samples = list(data.samples())[:S3_SAMPLES]
            # Written straight to moto: only the reads go through the faulty proxy.
            manifest = write_dataset(
                samples, root, shard_bytes=40_000, storage_options=s3.storage_options, progress=False
            )
            yield s3, root, manifest
    finally:
        werkzeug.setLevel(level)


def _through(s3: Any, proxy_url: str) -> dict[str, Any]:
    """Storage options that reach the bucket only through ``proxy_url`` (so its endpoint must be honoured)."""
    options = dict(s3.storage_options)
    options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": proxy_url}
    options["skip_instance_cache"] = True
    return options


# Each seed puts four faults of four kinds among the first 33 requests.
@pytest.mark.parametrize(("num_workers", "seed"), [(0, 11), (2, 164)])
def test_s3_epoch_through_faulty_proxy_is_exact(
    data: _Data, s3_dataset: tuple[Any, str, Manifest], num_workers: int, seed: int
) -> None:
    from lightning_patterns.testing.fault_proxy import fault_proxy

    s3, root, manifest = s3_dataset
    subset = _Data.__new__(_Data)
    subset.images, subset.labels, subset.num_samples = data.images[:S3_SAMPLES], data.labels[:S3_SAMPLES], S3_SAMPLES
    with fault_proxy(s3.endpoint_url, stall_seconds=STALL_SECONDS, seed=seed) as proxy:
        dataset = StreamingDataset(
            root,
            batch_size=50,
            shuffle=num_workers > 0,
            storage_options=_through(s3, proxy.url),
            # botocore retries 5xx and resets itself; ours catch what it gives up on. Stalls only delay here.
            retry=RetryPolicy(initial_backoff=0.001, max_backoff=0.01, timeout=5.0),
        )
        proxy.failure_rate = FAILURE_RATE
        subset.check_epoch(StreamingDataLoader(dataset, num_workers=num_workers))
        log = proxy.requests
    bucket_path = "/" + root.removeprefix("s3://")
    proxied = {r.path for r in log if r.method == "GET"}
    assert {f"{bucket_path}/{s.path}" for s in manifest.shards} <= proxied, "every shard must come through the proxy"
    assert len({r.fault for r in log} - {None}) == 4
