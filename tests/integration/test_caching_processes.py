"""The disk cache across real processes: reuse after ``kill -9`` mid-epoch, and one cache shared by 2 × 2 workers.

Each test counts what the HTTP server sent: after a crash the next run fetches exactly the shards that had
no complete entry, and two processes with two DataLoader workers each fetch every shard once in total.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_patterns.data.caching import cache_info
from lightning_patterns.data.caching.layout import store_root
from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.shards.manifest import Manifest
from lightning_patterns.data.synthetic import fashion_like_arrays
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

pytestmark = [pytest.mark.remote, pytest.mark.slow]

# Streams the dataset with a disk cache; prints one JSON line per batch, then one per finished epoch.
_STREAMER = """
import json, sys
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
url, cache_dir, num_workers, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dataset = StreamingDataset(url, batch_size=100, cache="disk", cache_dir=cache_dir,
                           storage_options={"skip_instance_cache": True})
loader = StreamingDataLoader(dataset, num_workers=num_workers)
for epoch in range(epochs):
    before = dataset.metrics()["remote_bytes"]
    total = 0
    for index, batch in enumerate(loader):
        total += int(batch["label"].sum())
        print(json.dumps({"batch": index}), flush=True)
    remote = dataset.metrics()["remote_bytes"] - before
    print(json.dumps({"epoch": epoch, "label_sum": total, "remote_bytes": remote}), flush=True)
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FaultInjectingHTTPServer, Manifest]]:
    images, labels = fashion_like_arrays(3000)
    samples = [{"image": images[i], "label": int(labels[i])} for i in range(len(labels))]
    manifest = write_dataset(samples, str(tmp_path / "remote" / "ds"), shard_bytes=192 * 1024, progress=False)
    with serve_directory(tmp_path / "remote", stall_seconds=30) as server:
        yield server, manifest


def _start(server: FaultInjectingHTTPServer, cache_dir: Path, num_workers: int, epochs: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-c", _STREAMER, server.url + "/ds", str(cache_dir), str(num_workers), str(epochs)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _shard_gets(server: FaultInjectingHTTPServer, manifest: Manifest) -> Counter[str]:
    paths = {"/ds/" + shard.path: shard.path for shard in manifest.shards}
    return Counter(paths[r.path] for r in server.requests if r.method == "GET" and r.path in paths)


def _complete_entries(cache_dir: Path) -> set[str]:
    return {p.name.removesuffix(".lps") for p in (store_root(cache_dir) / "entries").glob("*.lps")}


def _expected_label_sum(manifest: Manifest) -> int:
    _, labels = fashion_like_arrays(manifest.num_samples)
    return int(labels.sum())


def test_after_kill_9_mid_epoch_the_next_run_fetches_only_what_was_missing(
    served: tuple[FaultInjectingHTTPServer, Manifest], tmp_path: Path
) -> None:
    server, manifest = served
    cache_dir = tmp_path / "cache"
    middle = len(manifest.shards) // 2
    # The shard after the middle stalls, so the killed process holds its entry lock and is mid-fetch.
    server.inject("ds/" + manifest.shards[middle + 1].path, "stall")
    process = _start(server, cache_dir, num_workers=0, epochs=1)
    assert process.stdout is not None
    batches_before_stall = sum(s.num_samples for s in manifest.shards[: middle + 1]) // 100 - 1
    for line in process.stdout:
        if json.loads(line).get("batch") == batches_before_stall:
            break
    else:
        pytest.fail(f"the streamer ended early: {process.stderr.read() if process.stderr else ''}")
    time.sleep(0.3)  # let read-ahead threads start on the stalled shard
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    process.stdout.close()
    if process.stderr is not None:
        process.stderr.close()
    # A writer that died mid-write would leave a temp file: plant one too, for a shard not yet complete.
    complete = _complete_entries(cache_dir)
    digests = [shard.checksum.removeprefix("sha256:") for shard in manifest.shards]
    missing = [shard.path for shard, digest in zip(manifest.shards, digests, strict=True) if digest not in complete]
    assert 0 < len(complete) < len(manifest.shards)
    partial = store_root(cache_dir) / "entries" / f"{digests[-1]}.lps.{process.pid}.0badc0de.tmp"
    partial.write_bytes(b"partial")

    server.reset_log()
    started = time.monotonic()
    rerun = _start(server, cache_dir, num_workers=0, epochs=1)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert time.monotonic() - started < 60  # the dead process's locks did not block
    result = json.loads(out.strip().splitlines()[-1])
    assert result["label_sum"] == _expected_label_sum(manifest)
    # Every complete entry was reused; only what was missing or partial was fetched, once.
    assert _shard_gets(server, manifest) == Counter(missing)
    assert result["remote_bytes"] == sum(s.num_bytes for s in manifest.shards if s.path in missing)
    assert not partial.exists()
    info = cache_info(cache_dir)
    assert (info.entries, info.temp_files) == (len(manifest.shards), 0)


def test_two_processes_with_two_workers_share_one_cache_and_fetch_each_shard_once(
    served: tuple[FaultInjectingHTTPServer, Manifest], tmp_path: Path
) -> None:
    server, manifest = served
    cache_dir = tmp_path / "cache"
    # Both processes read the whole dataset (world size 1 each), so all four workers want every shard.
    processes = [_start(server, cache_dir, num_workers=2, epochs=2) for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        results.append([json.loads(line) for line in out.splitlines() if "epoch" in line])
    gets = _shard_gets(server, manifest)
    assert gets == Counter({shard.path: 1 for shard in manifest.shards})
    assert server.bytes_sent - sum(r.bytes_sent for r in server.requests if r.path.endswith("manifest.json")) == (
        manifest.num_bytes
    )
    expected = _expected_label_sum(manifest)
    for epochs in results:
        assert [epoch["label_sum"] for epoch in epochs] == [expected, expected]
        assert epochs[1]["remote_bytes"] == 0
    assert sum(epochs[0]["remote_bytes"] for epochs in results) == manifest.num_bytes
