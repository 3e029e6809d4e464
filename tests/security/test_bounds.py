"""Issue 16, item 2: every read is bounded in bytes and in time, and a timeout lets the process exit.

A hostile server streams endless manifests and shard bodies, sends a manifest one byte at a time, or never
answers; each case asserts the exact error, that it comes in bounded time, and (in one child process, to
measure its peak RSS) that nothing allocates past a bound.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attack_helpers import HostileServer, body, drip, edit_manifest, endless, make_dataset, read_manifest_json, stall

from lightning_patterns.data.caching import MemoryEpochCache
from lightning_patterns.data.remote import RemoteReader
from lightning_patterns.data.shards import MANIFEST_NAME, Manifest, Schema, ShardInfo, load_manifest
from lightning_patterns.data.shards.limits import MAX_MANIFEST_BYTES
from lightning_patterns.data.shards.manifest import fetch_shard, read_manifest
from lightning_patterns.data.streaming import ReadAhead, StreamingDataset
from lightning_patterns.exceptions import ChecksumMismatchError, DeadlineExceededError, ManifestError

pytestmark = pytest.mark.remote

DEEP = b"[" * 200_000 + b"]" * 200_000


def test_an_endless_manifest_is_cut_at_the_byte_cap(hostile: HostileServer) -> None:
    hostile.routes[f"/endless/{MANIFEST_NAME}"] = endless()
    reader = RemoteReader(f"{hostile.url}/endless")
    started = time.monotonic()
    with pytest.raises(ManifestError) as info:
        read_manifest(reader, max_bytes=2**20)
    assert time.monotonic() - started < 10
    assert f"Manifest '{hostile.url}/endless/{MANIFEST_NAME}' is larger than max_bytes=1048576" in str(info.value)
    assert "nothing more was read" in str(info.value)
    assert reader.stats.bytes_read == 2**20 + 1  # one byte past the cap tells, and no more is accepted


def test_the_default_cap_is_256_mib_and_configurable(hostile: HostileServer, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    url = hostile.serve_folder("data", folder)
    size = len((folder / MANIFEST_NAME).read_bytes())
    assert inspect.signature(load_manifest).parameters["max_bytes"].default == MAX_MANIFEST_BYTES == 256 * 2**20
    assert load_manifest(url).num_samples == 48
    with pytest.raises(ManifestError, match=f"larger than max_bytes={size - 1}"):
        load_manifest(url, max_bytes=size - 1)


def test_a_manifest_sent_one_byte_at_a_time_meets_its_deadline(hostile: HostileServer, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    url = hostile.serve_folder("data", folder, **{MANIFEST_NAME: drip((folder / MANIFEST_NAME).read_bytes(), 0.2)})
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match=rf"Reading {url}/manifest.json did not finish within its deadline"):
        load_manifest(url, timeout=1.0)
    assert time.monotonic() - started < 3.0
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match=r"did not finish within its deadline of 1\.0 s"):
        StreamingDataset(url, read_ahead=ReadAhead(timeout=1.0))
    assert time.monotonic() - started < 3.0


def test_a_shard_read_never_accepts_more_than_the_manifest_declares(hostile: HostileServer, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    manifest = make_dataset(folder)
    first = manifest["shards"][0]
    url = hostile.serve_folder("data", folder, **{first["path"]: endless()})
    reader = RemoteReader(url)
    info = load_manifest(url).shards[0]
    with pytest.raises(ChecksumMismatchError, match=r"on 2 fetches in a row"):
        fetch_shard(reader, info)
    assert reader.stats.bytes_read == 2 * first["num_bytes"]  # fetched twice, each time exactly what is declared


def test_a_local_shard_longer_than_declared_is_read_as_declared(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    manifest = make_dataset(folder)
    with (folder / manifest["shards"][0]["path"]).open("ab") as f:
        f.write(b"\0" * 2**20)  # trailing bytes the manifest does not declare are never read
    dataset = StreamingDataset(str(folder), batch_size=48)
    assert sorted(next(iter(dataset))["index"].tolist()) == list(range(48))
    assert dataset.metrics()["remote_bytes"] == sum(s["num_bytes"] for s in manifest["shards"])


@pytest.mark.parametrize("where", ["local", "http"])
def test_a_manifest_nested_200000_deep_is_a_manifest_error(hostile: HostileServer, tmp_path: Path, where: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_bytes(DEEP)
    url = str(folder) if where == "local" else hostile.serve_folder("data", folder)
    with pytest.raises(ManifestError, match=r"is not valid JSON \(it nests 200000 levels deep, more than the 64"):
        load_manifest(url)


def test_the_memory_cache_refuses_a_shard_larger_than_its_limit() -> None:
    # A manifest built in memory: loading one from text would refuse such sizes already (see the limits).
    schema = Schema.infer({"x": 1})
    huge = Manifest(schema, (ShardInfo("a.lps", 1, 2**62, "sha256:" + "0" * 64),), {"rule": "size"})
    with pytest.raises(ValueError, match=r"cannot hold shard 'a.lps': its manifest entry declares 4611686018427387904"):
        MemoryEpochCache().bind(huge)
    limited = MemoryEpochCache(cache_limit=2**20)
    limited.bind(huge)  # with an explicit limit the shard is simply not cached: no region is reserved
    assert limited.capacity == 0
    assert limited.cached_shards() == []


def test_a_manifest_declaring_a_1e12_byte_shard_never_reaches_the_memory_cache(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    make_dataset(folder)
    edit_manifest(folder, lambda m: m["shards"][0].update(num_bytes=10**12))
    with pytest.raises(ManifestError, match=r"records num_bytes=1000000000000 for shard"):
        StreamingDataset(str(folder), cache="memory")


_EXIT_CHILD = """
import json, sys, threading, time
from lightning_patterns.data.streaming import ReadAhead, StreamingDataset

def fetching_threads(within):
    # The read-ahead threads still alive after `within` seconds (they end once their fetch does).
    until = time.monotonic() + within
    while True:
        alive = [t for t in threading.enumerate() if t.name.startswith("lightning-patterns-read")]
        if not alive or time.monotonic() >= until:
            return len(alive)
        time.sleep(0.02)

url, timeout, step = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
dataset = StreamingDataset(url, batch_size=1, read_ahead=ReadAhead(shards=2, threads=4, timeout=timeout))
print("iterating", flush=True)
started, yielded = time.monotonic(), 0
try:
    for sample in dataset:
        yielded += 1
        time.sleep(step)  # a training step: later read-ahead fetches start while it runs
except TimeoutError as err:  # DeadlineExceededError is one
    report = {"error": type(err).__name__, "message": str(err), "yielded": yielded}
    report["after"] = time.monotonic() - started
    report["fetching_after_error"] = fetching_threads(0.5)
    print(json.dumps(report), flush=True)
"""


@pytest.mark.slow
def test_after_fetch_timeout_the_process_exits_within_twice_the_timeout(hostile: HostileServer, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    shards = make_dataset(folder, n=128, shard_bytes=2048)["shards"]
    assert len(shards) >= 4
    # Shard 0 is served; every other shard request is accepted and never answered. Reading shard 0 takes
    # 2.4 s of training steps, so the fetch of shard 3 (read ahead once shard 0 is done) starts 2.4 s after
    # that of shard 1, whose timeout ends the epoch: only cancelling it lets the process exit at once.
    url = hostile.serve_folder("data", folder, **{shard["path"]: stall() for shard in shards[1:]})
    timeout, step = 3.0, 2.4 / shards[0]["num_samples"]
    child = subprocess.Popen(
        [sys.executable, "-c", _EXIT_CHILD, url, str(timeout), str(step)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "iterating", child.stderr  # imports and the manifest: not timed
        started = time.monotonic()
        line = child.stdout.readline()
        child.wait(timeout=60)
        exited_after = time.monotonic() - started
        _, err = child.communicate()
    finally:
        child.kill()
    report = json.loads(line)
    assert report["error"] in ("TimeoutError", "DeadlineExceededError"), err
    assert f"{url}/{shards[1]['path']}" in report["message"]
    assert report["yielded"] == shards[0]["num_samples"]
    assert timeout * 0.9 <= report["after"] < timeout * 1.5
    assert exited_after < 2 * timeout, f"the process took {exited_after:.2f} s to exit after a {timeout} s timeout"
    assert report["fetching_after_error"] == 0, "read-ahead downloads outlived the timeout"
    assert child.returncode == 0, err
    assert 3 <= len([r for r in hostile.requests if r.path.endswith(".lps")]) <= 4  # in use, and 2 ahead


_RSS_CHILD = """
import json, resource, sys
from lightning_patterns.data.shards import load_manifest
from lightning_patterns.data.streaming import StreamingDataset

urls = json.loads(sys.argv[1])

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# Warm up every code path on a good dataset first, so the baseline holds the code, not the attack.
good = StreamingDataset(urls["good"], batch_size=8)
assert sum(len(batch["index"]) for batch in good) == 48
baseline = peak_mib()
cases = {
    "endless_manifest": lambda: load_manifest(urls["endless"], max_bytes=8 * 2**20),
    "endless_shard": lambda: list(StreamingDataset(urls["endless_shard"], batch_size=8)),
    "deep_manifest": lambda: load_manifest(urls["deep"]),
    "terabyte_shard_memory_cache": lambda: StreamingDataset(urls["terabyte"], cache="memory"),
}
results = {}
for name, case in cases.items():
    try:
        case()
        results[name] = "no error"
    except Exception as err:
        results[name] = type(err).__name__
    results[name + "_peak_growth_mib"] = peak_mib() - baseline
print(json.dumps(results))
"""


@pytest.mark.slow
def test_hostile_input_never_allocates_past_a_bound(hostile: HostileServer, tmp_path: Path) -> None:
    good = tmp_path / "good"
    make_dataset(good)
    # A shard that declares 8 MiB and is served as an endless body.
    big = tmp_path / "big"
    first = make_dataset(big)["shards"][0]
    edit_manifest(big, lambda m: m["shards"][0].update(num_bytes=8 * 2**20))
    terabyte = tmp_path / "terabyte"
    make_dataset(terabyte)
    edit_manifest(terabyte, lambda m: m["shards"][0].update(num_bytes=10**12))
    hostile.routes["/deep/manifest.json"] = body(DEEP)
    hostile.routes["/endless/manifest.json"] = endless()
    urls = {
        "good": hostile.serve_folder("good", good),
        "endless": f"{hostile.url}/endless",
        "endless_shard": hostile.serve_folder("big", big, **{first["path"]: endless()}),
        "deep": f"{hostile.url}/deep",
        "terabyte": hostile.serve_folder("terabyte", terabyte),
    }
    assert read_manifest_json(big)["shards"][0]["num_bytes"] == 8 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, json.dumps(urls)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["endless_manifest"] == "ManifestError"
    assert report["endless_shard"] == "ChecksumMismatchError"
    assert report["deep_manifest"] == "ManifestError"
    assert report["terabyte_shard_memory_cache"] == "ManifestError"
    # Peak RSS is a high-water mark: the growth after the last case bounds every case. The endless manifest is
    # cut at 8 MiB and the endless shard at its declared 8 MiB; nothing else should allocate much.
    growth = {name: value for name, value in report.items() if name.endswith("_mib")}
    assert max(growth.values()) < 64, growth
