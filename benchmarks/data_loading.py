"""Side-by-side data-loading benchmark (issue 8): lightning_patterns against the limits and the peer libraries.

Measures, on the same Fashion-MNIST-shaped samples (uint8 28×28 + int64 label), batch size 256, no shuffle:

- lightning_patterns ``StreamingDataset`` + ``StreamingDataLoader``: no cache, memory cache, disk cache; from an
  S3-compatible server (moto's server mode, a separate process on 127.0.0.1) and from local disk;
- the practical limit: an in-memory ``TensorDataset`` + ``DataLoader(batch_size=256)``;
- the batched-read limit: ``np.memmap`` of one local file holding the same records, read a whole batch per
  ``__getitem__`` (a ``BatchSampler`` hands it the batch's indices; one fancy-index copy per field);
- the I/O limit: a plain sequential read of the same shard files from the same endpoint (s3fs ``cat_file`` of
  each shard, or ``open().read()`` locally), converted to samples/s;
- with ``--remote-mbps N`` (``make bench``: 100), the same S3 server behind an emulated link of N MB/s (a
  throttling proxy, ``link.py``): lightning_patterns with each cache, and the sequential read (the link limit);
- the peers: LitData's and MosaicML Streaming's ``StreamingDataset``, each reading the samples its own writer
  wrote (timed), through a plain ``torch.utils.data.DataLoader`` with the same batch size and workers.

Every reader runs two epochs in a fresh subprocess (so peak RSS is per configuration), and every figure is the
median over ``--runs`` such subprocesses. Every batch is touched (its last pixel read, its labels summed) and the
epoch checked against the expected sample count and label sum. Time to first batch is measured the same way for
every loader: from asking the DataLoader for an iterator to holding the first batch.

Run ``python benchmarks/data_loading.py --help``; ``benchmarks/run_all.sh`` (``make bench``) runs it in the
benchmark virtualenv together with the memory-scaling benchmark and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules, also when imported from elsewhere
from link import stop_process  # noqa: E402

RESULTS = HERE / "results"
BATCH_SIZE = 256
SHARD_BYTES = 32 * 2**20
BUCKET = "bench"
CHILD_TIMEOUT_S = 900
_RESULT_TAG = "BENCH-RESULT "


# ---------------------------------------------------------------------------------------------- S3 server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto's S3 server in its own process on 127.0.0.1 (so it never shares a GIL with what is measured).

    Use as a context manager; ``endpoint`` is its URL. The bucket ``bench`` is created on start.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> MotoServer:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2):
                    break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)
                    raise RuntimeError(f"moto server did not start: {self._log.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        self._log.close()


def s3_options(endpoint: str) -> dict[str, Any]:
    """fsspec ``storage_options`` for the moto server at ``endpoint``."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def s3_filesystem(endpoint: str) -> Any:
    """A fresh (uncached) s3fs filesystem talking to ``endpoint``."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for boto3-based readers (MosaicML Streaming) talking to ``endpoint``."""
    return {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


# ---------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """nproc, memory, CPU model, OS, Python and library versions of this machine."""
    from importlib import metadata

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    versions = {}
    for dist in ("torch", "numpy", "lightning-patterns", "litdata", "mosaicml-streaming", "s3fs", "moto", "fsspec"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "nproc": os.cpu_count(),
        "memory_gib": mem_gib,
        "cpu": cpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        # Other work on the machine (tests, other benchmarks) slows every figure; the report shows this.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------- child processes


def run_child(spec: dict[str, Any], *, env: dict[str, str] | None = None, timeout: float = CHILD_TIMEOUT_S) -> dict:
    """Run one task (a write or a read) in a fresh interpreter and return its result dict.

    A failure returns ``{"error": "<last lines of stderr>"}`` instead of raising, so one broken
    configuration never stops the benchmark.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    interesting = [line for line in tail if "Error" in line or "error" in line] or tail
    return {"error": (interesting[-1] if interesting else f"exit code {proc.returncode}")[:400]}


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM``, which, unlike ``ru_maxrss``, starts afresh at ``exec``.

    (Linux carries ``ru_maxrss`` across ``exec``, so a child would inherit its parent's peak.)
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _TreeRssSampler:
    """Samples the summed RSS of this process and its DataLoader workers every 20 ms (for ``workers > 0``).

    Shared pages (a memory cache, torch's libraries) count once per process, so the sum overstates memory.
    """

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak_mb = 0.0
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.02):
            total = 0
            for proc in [self._me, *self._me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _load_arrays(prefix: str) -> tuple[Any, Any]:
    import numpy as np

    return np.load(prefix + "-images.npy"), np.load(prefix + "-labels.npy")


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


class _ArraySamples:
    """Map-style view of the arrays, in the sample format our writer takes."""

    def __init__(self, images: Any, labels: Any) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i]}


def _mosaic_stand_ins() -> None:
    """Let ``import streaming`` succeed without torchvision (its PyPI wheels are CUDA-linked and fail to load)."""
    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))


def child_write(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the arrays at ``spec["arrays"]`` with one library's own writer; returns seconds and bytes."""
    images, labels = _load_arrays(spec["arrays"])
    fmt, dest = spec["format"], spec["dest"]
    # Imports are done before the clock starts: only the writing is timed.
    if fmt == "ours":
        from lightning_patterns.data.shards import write_dataset

        started = time.perf_counter()
        options = spec.get("storage_options")
        write_dataset(
            _ArraySamples(images, labels), dest, shard_bytes=SHARD_BYTES, storage_options=options, progress=False
        )
    elif fmt == "litdata":
        # BinaryWriter: LitData's single-process writer (``optimize`` with one worker process took ~40 s for
        # 200,000 samples here, mostly its own overhead, against ~9 s for this).
        from litdata.streaming.writer import BinaryWriter

        started = time.perf_counter()
        writer = BinaryWriter(dest, chunk_bytes=SHARD_BYTES)
        for i in range(len(labels)):
            writer.add_item(i, {"image": images[i], "label": int(labels[i])})
        writer.done()
        writer.merge(1)
    elif fmt == "mosaic":
        _mosaic_stand_ins()
        from streaming import MDSWriter

        started = time.perf_counter()
        out = (spec["local"], dest) if spec.get("local") else dest
        columns = {"image": "ndarray:uint8:28,28", "label": "int64"}
        with MDSWriter(out=out, columns=columns, size_limit=SHARD_BYTES, progress_bar=False) as writer:
            for i in range(len(labels)):
                writer.write({"image": images[i], "label": labels[i]})
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return {"seconds": time.perf_counter() - started, "rss_peak_mb": _peak_rss_mb()}


def _consume(
    batches: Callable[[], Iterable[Any]], unpack: Callable[[Any], tuple[Any, Any]], limit: int | None = None
) -> tuple[int, int, int, float | None]:
    """Iterate ``batches()`` and touch every batch (last pixel, label sum), stopping after ``limit`` samples.

    Returns:
        (samples, label sum, pixel sum, seconds from asking for the iterator to holding the first batch).
    """
    started = time.perf_counter()
    first: float | None = None
    samples = label_sum = pixel_sum = 0
    for batch in batches():
        if first is None:
            first = time.perf_counter() - started
        images, labels = unpack(batch)
        samples += len(labels)
        label_sum += int(labels.sum())
        pixel_sum += int(images[-1, -1, -1])
        if limit is not None and samples >= limit:
            break
    return samples, label_sum, pixel_sum, first


def _unpack_dict(batch: dict[str, Any]) -> tuple[Any, Any]:
    return batch["image"], batch["label"]


def _unpack_tuple(batch: tuple[Any, Any]) -> tuple[Any, Any]:
    return batch[0], batch[1]


class _MemmapBatches:
    """The batched-read limit: records of one local file through ``np.memmap``, a whole batch per ``__getitem__``."""

    def __init__(self, path: str, n: int) -> None:
        import numpy as np

        self.images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 28, 28))
        self.labels = np.memmap(path, dtype="<i8", mode="r", offset=_memmap_labels_offset(n), shape=(n,))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[Any, Any]:
        import numpy as np
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.images[idx]), torch.from_numpy(self.labels[idx])


def _memmap_labels_offset(n: int) -> int:
    return -(-n * 28 * 28 // 64) * 64


def write_memmap_file(prefix: str, n: int) -> str:
    """The arrays at ``prefix`` as one local file (images, then labels 64-byte aligned); returns its path."""
    import numpy as np

    images, labels = _load_arrays(prefix)
    path = prefix + "-records.bin"
    with open(path, "wb") as fh:
        fh.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        fh.write(bytes(_memmap_labels_offset(n) - n * 28 * 28))
        fh.write(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return path


def child_read(spec: dict[str, Any]) -> dict[str, Any]:
    """Open one loader as ``spec`` says, read ``spec["epochs"]`` epochs, and return timings, bytes and RSS."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    kind, workers, epochs = spec["loader"], spec.get("workers", 0), spec.get("epochs", 2)
    scratch = tempfile.mkdtemp(prefix="bench-", dir=spec.get("scratch"))
    remote_bytes: Callable[[], int | None] = lambda: None  # noqa: E731
    unpack: Callable[[Any], tuple[Any, Any]] = _unpack_dict
    epoch_fn: Callable[[], Iterator[Any]] | None = None
    rss_base = _peak_rss_mb()
    setup_started = time.perf_counter()
    import_s = 0.0
    if kind == "ours":
        from lightning_patterns.data.streaming.dataset import StreamingDataset
        from lightning_patterns.data.streaming.loader import StreamingDataLoader

        import_s = time.perf_counter() - setup_started

        cache = spec.get("cache")
        extra: dict[str, Any] = {}
        if cache == "disk":
            extra = {"cache": "disk", "cache_dir": os.path.join(scratch, "cache")}
        elif cache == "memory":
            extra = {"cache": "memory"}
        rss_base = _peak_rss_mb()
        dataset = StreamingDataset(
            spec["url"], batch_size=BATCH_SIZE, shuffle=False, storage_options=spec.get("storage_options"), **extra
        )
        loader = StreamingDataLoader(dataset, num_workers=workers)
        remote_bytes = lambda: int(loader.metrics()["remote_bytes"])  # noqa: E731
        epoch_fn = loader.__iter__
    elif kind == "tensor":
        images, labels = _load_arrays(spec["arrays"])
        tensors = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
        loader = DataLoader(tensors, batch_size=BATCH_SIZE, num_workers=workers)
        unpack, epoch_fn = _unpack_tuple, loader.__iter__
    elif kind == "memmap":
        from torch.utils.data import BatchSampler, SequentialSampler

        records = _MemmapBatches(spec["memmap"], spec["expect_samples"])
        sampler = BatchSampler(SequentialSampler(range(len(records))), BATCH_SIZE, drop_last=False)
        loader = DataLoader(records, sampler=sampler, batch_size=None, num_workers=workers)
        unpack, epoch_fn = _unpack_tuple, loader.__iter__
    elif kind == "io":
        return _child_io(spec, epochs)
    elif kind == "litdata":
        from litdata import StreamingDataset as LitStreamingDataset

        cache_dir = os.path.join(scratch, "litdata-cache")
        # A local-path "remote" ("local:" prefix): LitData copies each chunk into its cache, as it would download it.
        source = ("local:" + spec["url"]) if spec.get("copy") else spec["url"]
        rss_base = _peak_rss_mb()
        dataset = LitStreamingDataset(source, cache_dir=cache_dir if spec.get("copy") else None, shuffle=False)
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers)
        if spec.get("copy"):
            remote_bytes = lambda: _dir_bytes(cache_dir)  # noqa: E731
        epoch_fn = loader.__iter__
    elif kind == "mosaic":
        _mosaic_stand_ins()
        from streaming import StreamingDataset as MosaicStreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        rss_base = _peak_rss_mb()
        if spec.get("remote"):
            local = os.path.join(scratch, "mosaic-cache")
            dataset = MosaicStreamingDataset(remote=spec["remote"], local=local, batch_size=BATCH_SIZE, shuffle=False)
            remote_bytes = lambda: _dir_bytes(local)  # noqa: E731
        else:
            dataset = MosaicStreamingDataset(local=spec["url"], batch_size=BATCH_SIZE, shuffle=False)
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers)
        epoch_fn = loader.__iter__
    else:
        raise ValueError(f"unknown loader {kind!r}")
    setup_s = time.perf_counter() - setup_started
    sampler = _TreeRssSampler() if workers else None

    results = []
    for _ in range(epochs):
        before = remote_bytes()
        started = time.perf_counter()
        samples, label_sum, pixel_sum, first_batch_s = _consume(epoch_fn, unpack, spec.get("limit"))
        seconds = time.perf_counter() - started
        after = remote_bytes()
        results.append(
            {
                "seconds": seconds,
                "first_batch_s": first_batch_s,
                "samples": samples,
                "samples_per_s": samples / seconds if seconds > 0 else None,
                "remote_bytes": None if after is None else after - (before or 0),
                "ok": samples == spec["expect_samples"] and label_sum == spec["expect_label_sum"],
                "label_sum": label_sum,
                "pixel_sum": pixel_sum,
            }
        )
    del np
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "epochs": results,
        "setup_s": setup_s,
        "import_s": import_s,
        "rss_base_mb": rss_base,
        "rss_peak_mb": _peak_rss_mb(),
        "tree_rss_peak_mb": sampler.stop() if sampler else None,
        "load_average": os.getloadavg()[0],
    }


def _child_io(spec: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The I/O limit: read every shard file of our dataset, one after another, as plain bytes."""
    rss_base = _peak_rss_mb()
    if spec.get("endpoint"):
        fs = s3_filesystem(spec["endpoint"])
        root = spec["url"].removeprefix("s3://")
        paths = sorted(p for p in fs.find(root) if not p.endswith(".json"))

        def read(path: str) -> int:
            return len(fs.cat_file(path))
    else:
        paths = sorted(str(p) for p in Path(spec["url"]).rglob("*") if p.is_file() and p.suffix != ".json")

        def read(path: str) -> int:
            with open(path, "rb") as fh:
                return len(fh.read())

    results = []
    for _ in range(epochs):
        started = time.perf_counter()
        nbytes = read(paths[0])
        first_batch_s = time.perf_counter() - started  # the first shard in hand
        nbytes += sum(read(path) for path in paths[1:])
        seconds = time.perf_counter() - started
        results.append(
            {
                "seconds": seconds,
                "first_batch_s": first_batch_s,
                "first_shard_bytes": os.path.getsize(paths[0]) if not spec.get("endpoint") else None,
                "samples": spec["expect_samples"],
                "samples_per_s": spec["expect_samples"] / seconds,
                "remote_bytes": nbytes,
                "mb_per_s": nbytes / seconds / 1e6,
                "ok": True,
            }
        )
    return {
        "epochs": results,
        "setup_s": 0.0,
        "rss_base_mb": rss_base,
        "rss_peak_mb": _peak_rss_mb(),
        "load_average": os.getloadavg()[0],
    }


def child_main(spec_json: str) -> None:
    """Entry point of a child process: run the task and print its result on a tagged line."""
    spec = json.loads(spec_json)
    result = child_write(spec) if spec["task"] == "write" else child_read(spec)
    sys.stdout.flush()
    print(_RESULT_TAG + json.dumps(result), flush=True)
    # Peers leave non-daemon threads and shared memory behind; do not wait for them to wind down.
    os._exit(0)


# ---------------------------------------------------------------------------------------------- workspace


class Workspace:
    """Owns the moto endpoint, a scratch folder, the generated arrays and the datasets written so far.

    Datasets are written once per (format, size) and reused by every benchmark run in this process, so
    the memory-scaling benchmark can reuse the data benchmark's datasets.
    """

    def __init__(self, endpoint: str, root: str, *, write_runs: int = 1, link: Any = None) -> None:
        self.endpoint = endpoint
        # The emulated link (link.LinkProxy) in front of the same server, when --remote-mbps is given.
        self.link = link
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_runs = write_runs
        # Only the data benchmark's size reports write times; other sizes are written once.
        self.timed_samples: int | None = None
        self._arrays: dict[int, tuple[str, int]] = {}
        self._datasets: dict[tuple[str, int], dict[str, Any]] = {}

    def arrays(self, n: int) -> tuple[str, int]:
        """Prefix of ``n`` samples saved as .npy files, and their label sum."""
        if n not in self._arrays:
            import numpy as np

            from lightning_patterns.data.synthetic import fashion_like_arrays

            images, labels = fashion_like_arrays(n, split="train", seed=0)
            prefix = str(self.root / f"arrays-{n}")
            np.save(prefix + "-images.npy", images)
            np.save(prefix + "-labels.npy", labels)
            self._arrays[n] = (prefix, int(labels.sum()))
        return self._arrays[n]

    def memmap_file(self, n: int) -> str:
        """The ``n`` samples as one local file of records, for the batched-read limit."""
        prefix, _ = self.arrays(n)
        path = prefix + "-records.bin"
        return path if os.path.exists(path) else write_memmap_file(prefix, n)

    def dataset(self, fmt: str, n: int, runs: int | None = None) -> dict[str, Any]:
        """Write ``n`` samples with the writer ``fmt`` (``runs`` timed times, in fresh processes) once, and reuse it.

        ``fmt`` is one of ``ours-s3``, ``ours-local``, ``litdata-local``, ``mosaic-s3`` (the MDS writer also
        keeps a local copy, which the ``mosaic`` local reader uses). Returns where it lies, the write times and
        its size; ``{"error": ...}`` when the writer failed.
        """
        key = (fmt, n)
        if key in self._datasets:
            return self._datasets[key]
        prefix, _ = self.arrays(n)
        runs = runs or (self.write_runs if self.timed_samples in (None, n) else 1)
        seconds: list[float] = []
        info: dict[str, Any] = {}
        for run in range(runs):
            name = f"{fmt}-{n}-w{run}"
            spec: dict[str, Any] = {"task": "write", "arrays": prefix}
            env = None
            if fmt == "ours-s3":
                url = f"s3://{BUCKET}/{name}"
                spec.update(format="ours", dest=url, storage_options=s3_options(self.endpoint))
                info = {"url": url, "storage_options": s3_options(self.endpoint)}
            elif fmt == "ours-local":
                url = str(self.root / name)
                spec.update(format="ours", dest=url)
                info = {"url": url}
            elif fmt == "litdata-local":
                url = str(self.root / name)
                spec.update(format="litdata", dest=url)
                info = {"url": url}
            elif fmt == "mosaic-s3":
                url, local = f"s3://{BUCKET}/{name}", str(self.root / name)
                spec.update(format="mosaic", dest=url, local=local)
                env = s3_env(self.endpoint)
                info = {"remote": url, "url": local}
            else:
                raise ValueError(f"unknown dataset format {fmt!r}")
            result = run_child(spec, env=env)
            if "error" in result:
                self._datasets[key] = {"error": result["error"]}
                return self._datasets[key]
            seconds.append(result["seconds"])
            if run < runs - 1:
                self._remove(info)
        info["write_seconds"] = seconds
        info["write_seconds_median"] = statistics.median(seconds)
        info["bytes"] = self._size(info)
        if fmt.startswith("ours"):
            from lightning_patterns.data.shards import load_manifest

            manifest = load_manifest(info["url"], info.get("storage_options"))
            info["shards_bytes"] = manifest.num_bytes
            info["first_shard_bytes"] = manifest.shards[0].num_bytes
        self._datasets[key] = info
        return info

    def _remove(self, info: dict[str, Any]) -> None:
        for key in ("url", "remote"):
            where = info.get(key)
            if where is None:
                continue
            if where.startswith("s3://"):
                with contextlib.suppress(FileNotFoundError):
                    s3_filesystem(self.endpoint).rm(where, recursive=True)
            else:
                shutil.rmtree(where, ignore_errors=True)

    def _size(self, info: dict[str, Any]) -> int:
        where = info.get("remote") or info["url"]
        if where.startswith("s3://"):
            fs = s3_filesystem(self.endpoint)
            return int(sum(fs.du(where.removeprefix("s3://"), total=False).values()))
        return _dir_bytes(where)


# ---------------------------------------------------------------------------------------------- configurations


def read_spec(ws: Workspace, config: dict[str, Any], n: int, epochs: int) -> tuple[dict[str, Any] | None, str | None]:
    """The child spec of one configuration, or ``(None, reason)`` when its dataset could not be written."""
    prefix, label_sum = ws.arrays(n)
    spec: dict[str, Any] = {
        "task": "read",
        "loader": config["loader"],
        "workers": config.get("workers", 0),
        "epochs": epochs,
        "expect_samples": n,
        "expect_label_sum": label_sum,
        "scratch": str(ws.root),
    }
    limit = config.get("limit")
    if limit and limit < n:
        import numpy as np

        limit = min(n, -(-limit // BATCH_SIZE) * BATCH_SIZE)
        spec.update(limit=limit, expect_samples=limit)
        spec["expect_label_sum"] = int(np.load(prefix + "-labels.npy", mmap_mode="r")[:limit].sum())
    loader, source = config["loader"], config["source"]
    if loader == "tensor":
        spec["arrays"] = prefix
        return spec, None
    if loader == "memmap":
        spec["memmap"] = ws.memmap_file(n)
        return spec, None
    fmt = {
        ("ours", "s3"): "ours-s3",
        ("ours", "local"): "ours-local",
        ("io", "s3"): "ours-s3",
        ("io", "local"): "ours-local",
        ("litdata", "local"): "litdata-local",
        ("litdata", "local-copy"): "litdata-local",
        ("mosaic", "s3"): "mosaic-s3",
        ("mosaic", "local"): "mosaic-s3",
    }[(loader, source)]
    info = ws.dataset(fmt, n)
    if "error" in info:
        return None, f"writer failed: {info['error']}"
    spec["url"] = info["url"]
    endpoint = ws.endpoint
    if config.get("link"):
        if ws.link is None:
            return None, "no emulated link (pass --remote-mbps)"
        endpoint = ws.link.endpoint
    if loader == "ours":
        spec["cache"] = config.get("cache")
        spec["storage_options"] = s3_options(endpoint) if source == "s3" else None
    elif loader == "io" and source == "s3":
        spec["endpoint"] = endpoint
    elif loader == "litdata":
        spec["copy"] = source == "local-copy"
    elif loader == "mosaic" and source == "s3":
        spec["remote"] = info["remote"]
    return spec, None


def measure(ws: Workspace, config: dict[str, Any], *, n: int, runs: int, epochs: int = 2) -> dict[str, Any]:
    """Run one configuration ``runs`` times in fresh processes; return medians and every run's figures."""
    row: dict[str, Any] = {k: v for k, v in config.items() if k != "skip"}
    row["samples"] = n
    if config.get("skip"):
        row["error"] = config["skip"]
        return row
    spec, reason = read_spec(ws, config, n, epochs)
    if spec is None:
        row["error"] = reason
        return row
    env = s3_env(ws.endpoint) if config["loader"] == "mosaic" else None
    results = []
    for _ in range(runs):
        result = run_child(spec, env=env)
        if "error" in result:
            row["error"] = result["error"]
            return row
        results.append(result)
    row["runs"] = results
    row["ok"] = all(e["ok"] for r in results for e in r["epochs"])

    def med(values: list[Any]) -> Any:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    for e in range(epochs):
        row[f"epoch{e + 1}_sps"] = med([r["epochs"][e]["samples_per_s"] for r in results])
        row[f"epoch{e + 1}_remote_bytes"] = med([r["epochs"][e].get("remote_bytes") for r in results])
    row["rss_peak_mb"] = med([r["rss_peak_mb"] for r in results])
    row["rss_base_mb"] = med([r["rss_base_mb"] for r in results])
    row["tree_rss_peak_mb"] = med([r.get("tree_rss_peak_mb") for r in results])
    row["setup_s"] = med([r["setup_s"] for r in results])
    row["import_s"] = med([r.get("import_s") for r in results])
    for e in range(epochs):
        row[f"epoch{e + 1}_first_batch_s"] = med([r["epochs"][e].get("first_batch_s") for r in results])
    row["load_average"] = med([r.get("load_average") for r in results])
    if config.get("link") and ws.link is not None:
        row["link_mbps"] = ws.link.mbps
    if config["loader"] in ("ours", "io") and config["source"] in ("s3", "local"):
        fmt = "ours-s3" if config["source"] == "s3" else "ours-local"
        info = ws._datasets.get((fmt, n), {})
        row["dataset_bytes"] = info.get("shards_bytes")
        row["first_shard_bytes"] = info.get("first_shard_bytes")
    return row


def data_configs(
    workers: Iterable[int],
    *,
    mosaic_local: bool,
    mosaic_limit: int | None,
    caching_available: str | None,
    remote_mbps: float | None = None,
) -> list[dict]:
    """Every configuration of the data benchmark, in table order."""
    configs: list[dict[str, Any]] = []
    workers = list(workers)
    for w in workers:
        group: list[dict[str, Any]] = [
            {"name": "in-memory TensorDataset (practical limit)", "loader": "tensor", "source": "memory"},
            {
                "name": "np.memmap + BatchSampler, local file (batched-read limit)",
                "loader": "memmap",
                "source": "local",
            },
        ]
        for source in ("s3", "local"):
            where = "S3 (moto, 127.0.0.1)" if source == "s3" else "local disk"
            for cache in (None, "memory", "disk"):
                group.append(
                    {
                        "name": f"lightning_patterns, {cache or 'no'} cache, {where}",
                        "loader": "ours",
                        "source": source,
                        "cache": cache,
                        "skip": caching_available if cache else None,
                    }
                )
        group.append({"name": "LitData 0.2.76, local disk", "loader": "litdata", "source": "local"})
        group.append(
            {
                "name": "LitData 0.2.76, local-path remote (copied to its cache)",
                "loader": "litdata",
                "source": "local-copy",
            }
        )
        group.append({"name": "MosaicML Streaming 0.13.0, S3 (moto, 127.0.0.1)", "loader": "mosaic", "source": "s3"})
        if mosaic_local:
            group.append({"name": "MosaicML Streaming 0.13.0, local disk", "loader": "mosaic", "source": "local"})
        for config in group:
            config["workers"] = w
            if config["loader"] == "mosaic" and mosaic_limit:
                config["limit"] = mosaic_limit
                config["note"] = f"first {mosaic_limit:,} samples of each epoch (its per-sample cost bounds it)"
        configs.extend(group)
    if 2 not in workers:
        # The remote bytes of two workers that share a shard (each reads only its own rows of it).
        configs.append(
            {
                "name": "lightning_patterns, no cache, S3 (moto, 127.0.0.1)",
                "loader": "ours",
                "source": "s3",
                "cache": None,
                "workers": 2,
            }
        )
    configs.append({"name": "sequential shard read, S3 (I/O limit)", "loader": "io", "source": "s3", "workers": 0})
    configs.append(
        {"name": "sequential shard read, local disk (I/O limit)", "loader": "io", "source": "local", "workers": 0}
    )
    if remote_mbps:
        link = f"S3 behind a {remote_mbps:g} MB/s link"
        for cache in (None, "memory", "disk"):
            configs.append(
                {
                    "name": f"lightning_patterns, {cache or 'no'} cache, {link}",
                    "loader": "ours",
                    "source": "s3",
                    "cache": cache,
                    "link": True,
                    "workers": 0,
                    "skip": caching_available if cache else None,
                }
            )
        configs.append(
            {"name": f"sequential shard read, {link} (link limit)", "loader": "io", "source": "s3", "link": True}
        )
        for config in configs[-4:]:
            config["workers"] = 0
    return configs


def caching_status() -> str | None:
    """``None`` when lightning_patterns' caches can be built, else the reason they cannot."""
    try:
        from lightning_patterns.data.caching import make_cache

        make_cache("memory", cache_dir=None, cache_limit=None)
        with tempfile.TemporaryDirectory() as folder:
            make_cache("disk", cache_dir=folder, cache_limit=None)
    except Exception as exc:
        return f"n/a (caching not available: {type(exc).__name__}: {exc})"
    return None


def run_benchmark(ws: Workspace, args: argparse.Namespace) -> dict[str, Any]:
    """Run the data benchmark on ``ws`` and write ``results/data_loading.json``; return the document."""
    started = time.time()
    n = args.samples
    ws.timed_samples = n
    caching = caching_status()
    limit = args.mosaic_samples if args.mosaic_samples and args.mosaic_samples < n else None
    configs = data_configs(
        args.workers,
        mosaic_local=args.mosaic_local,
        mosaic_limit=limit,
        caching_available=caching,
        remote_mbps=args.remote_mbps,
    )
    if args.only:
        configs = [c for c in configs if any(word in c["name"] or word == c["loader"] for word in args.only)]
    rows = []
    for config in configs:
        t0 = time.perf_counter()
        row = measure(ws, config, n=n, runs=args.runs)
        rows.append(row)
        e1, e2 = row.get("epoch1_sps"), row.get("epoch2_sps")
        status = row.get("error") or (
            f"epoch1 {e1:,.0f}/s  epoch2 {e2:,.0f}/s  first batch {row.get('epoch1_first_batch_s') or 0:.3f} s  "
            f"remote {(row.get('epoch1_remote_bytes') or 0) / 1e6:,.1f} MB  RSS {row['rss_peak_mb']:.0f} MB  "
            f"load {row.get('load_average') or 0:.1f}  ok={row['ok']}"
        )
        took = time.perf_counter() - t0
        print(f"[data] {config['name']} (workers={config.get('workers', 0)}): {status}  [{took:.0f} s]", flush=True)
    writes = []
    for fmt, label in (
        ("ours-s3", "lightning_patterns write_dataset → S3"),
        ("ours-local", "lightning_patterns write_dataset → local disk"),
        ("litdata-local", "LitData BinaryWriter → local disk"),
        ("mosaic-s3", "MosaicML MDSWriter → local + S3 upload"),
    ):
        info = ws._datasets.get((fmt, n))
        if info is not None:
            writes.append(
                {
                    "name": label,
                    "format": fmt,
                    "seconds_median": info.get("write_seconds_median"),
                    "seconds_runs": info.get("write_seconds"),
                    "bytes": info.get("bytes"),
                    "error": info.get("error"),
                }
            )
    doc = {
        "benchmark": "data_loading",
        "params": {
            "samples": n,
            "runs": args.runs,
            "write_runs": ws.write_runs,
            "batch_size": BATCH_SIZE,
            "shard_bytes": SHARD_BYTES,
            "workers": list(args.workers),
            "epochs": 2,
            "shuffle": False,
            "remote_mbps": args.remote_mbps or None,
        },
        "caching": caching or "available",
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "writes": writes,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"[data] wrote {out} in {doc['duration_s']:.0f} s")
    return doc


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the benchmark scripts and the runner."""
    parser.add_argument("--quick", action="store_true", help="smoke check: 20,000 samples, 1 run each")
    parser.add_argument("--runs", type=int, default=None, help="fresh processes per configuration (default 3)")
    parser.add_argument("--write-runs", type=int, default=None, help="timed writes per dataset (default 3)")
    parser.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting moto")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument(
        "--remote-mbps",
        type=float,
        default=100.0,
        help="also read S3 through an emulated link of this many MB/s (default 100; 0: not)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the data benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=None, help="samples in the dataset (default 200,000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader workers to measure")
    parser.add_argument("--mosaic-local", action="store_true", help="also read MosaicML Streaming from local disk")
    parser.add_argument(
        "--mosaic-samples",
        type=int,
        default=50_000,
        help="time MosaicML Streaming on the first N samples of each epoch (0: whole epochs; ~6k samples/s)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only configurations whose name has a word")
    parser.add_argument("--out", default=str(RESULTS / "data_loading.json"))
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    finish_defaults(args, samples=200_000)
    return args


def finish_defaults(args: argparse.Namespace, *, samples: int) -> None:
    """Fill in what ``--quick`` changes."""
    if args.samples is None:
        args.samples = 20_000 if args.quick else samples
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.write_runs is None:
        args.write_runs = 1 if args.quick else 3


@contextlib.contextmanager
def workspace(args: argparse.Namespace) -> Iterator[Workspace]:
    """A Workspace with a moto server (unless ``--endpoint``) and a scratch folder, both cleaned up after."""
    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint
        if endpoint is None:
            endpoint = stack.enter_context(MotoServer()).endpoint
        root = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="lp-bench-"))
        link = None
        if getattr(args, "remote_mbps", None):
            from link import LinkProxy

            link = stack.enter_context(LinkProxy(endpoint, args.remote_mbps))
        yield Workspace(endpoint, root, write_runs=args.write_runs, link=link)


def main(argv: list[str] | None = None) -> None:
    """Run the data benchmark from the command line."""
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    args = parse_args(argv)
    with workspace(args) as ws:
        run_benchmark(ws, args)


if __name__ == "__main__":
    main()
