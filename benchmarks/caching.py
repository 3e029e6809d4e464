"""Epoch caching benchmark: epoch-1 and epoch-2 throughput and remote bytes, no cache vs memory vs disk.

Streams Fashion-MNIST-shaped samples (uint8 28×28 + int64 label) from the local HTTP test server with
``StreamingDataset(url, batch_size=256, cache=...)`` and ``StreamingDataLoader(num_workers=0)``, next to an
in-memory ``TensorDataset`` of the same samples read by ``DataLoader(batch_size=256, num_workers=0)``. Every
batch is touched (its labels are summed and checked). Prints a Markdown table and the epoch-2 ratios to the
TensorDataset (goals: memory ≥ 0.95, disk ≥ 0.9).

Run: ``.venv/bin/python benchmarks/caching.py`` (200,000 samples), or ``--samples 20000`` for a quick look.
A standalone check, not part of ``make bench``: the data benchmark (``data_loading.py``) already measures epoch 2
with the memory and disk caches against the in-memory ``TensorDataset``, from S3 and from local disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns.data.shards import write_dataset
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.synthetic import fashion_like_arrays
from lightning_patterns.testing.http_server import serve_directory


def _echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _epoch(batches: Iterable[Any], expected_sum: int, expected_count: int) -> float:
    started = time.perf_counter()
    total = 0
    count = 0
    for batch in batches:
        labels = batch["label"] if isinstance(batch, dict) else batch[1]
        total += int(labels.sum())
        count += int(labels.shape[0])
    seconds = time.perf_counter() - started
    if (total, count) != (expected_sum, expected_count):
        raise AssertionError(f"read {count} samples with label sum {total}, expected {expected_count}, {expected_sum}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-mib", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader; the table shows medians")
    args = parser.parse_args(argv)

    images, labels = fashion_like_arrays(args.samples)
    expected_sum, n = int(labels.sum()), args.samples
    with tempfile.TemporaryDirectory(prefix="lp-bench-") as folder:
        root = Path(folder)
        started = time.perf_counter()
        manifest = write_dataset(
            ({"image": images[i], "label": int(labels[i])} for i in range(n)),
            str(root / "remote" / "ds"),
            shard_bytes=args.shard_mib * 2**20,
            progress=False,
        )
        _echo(
            f"wrote {n:,} samples, {manifest.num_bytes / 1e6:.0f} MB in {len(manifest.shards)} shards "
            f"in {time.perf_counter() - started:.1f} s; {args.repeats} runs per loader, medians"
        )
        rows: dict[str, list[tuple[float, float, float, float]]] = {}
        tensors = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
        with serve_directory(root / "remote") as server:
            for run in range(args.repeats):
                loader = DataLoader(tensors, batch_size=args.batch_size, num_workers=0)
                first, second = (_epoch(loader, expected_sum, n) for _ in range(2))
                rows.setdefault("in-memory TensorDataset", []).append((first, 0, second, 0))
                for cache in (None, "memory", "disk"):
                    cache_dir = str(root / f"cache-{run}") if cache == "disk" else None
                    dataset = StreamingDataset(
                        server.url + "/ds",
                        batch_size=args.batch_size,
                        cache=cache,
                        cache_dir=cache_dir,
                        storage_options={"skip_instance_cache": True},
                    )
                    stream = StreamingDataLoader(dataset, num_workers=0)
                    server.reset_log()
                    first = _epoch(stream, expected_sum, n)
                    first_bytes = server.bytes_sent
                    server.reset_log()
                    second = _epoch(stream, expected_sum, n)
                    rows.setdefault(f"StreamingDataset, cache={cache!r}", []).append(
                        (first, first_bytes, second, server.bytes_sent)
                    )
                    del stream, dataset

        _echo()
        _echo("| loader | epoch 1 samples/s | epoch 1 remote MB | epoch 2 samples/s | epoch 2 remote MB |")
        _echo("|---|---|---|---|---|")
        medians: dict[str, float] = {}
        for name, runs in rows.items():
            first = statistics.median(r[0] for r in runs)
            second = statistics.median(r[2] for r in runs)
            medians[name] = n / second
            _echo(
                f"| {name} | {n / first:,.0f} | {statistics.median(r[1] for r in runs) / 1e6:.1f} | "
                f"{n / second:,.0f} | {statistics.median(r[3] for r in runs) / 1e6:.1f} |"
            )
        base = medians["in-memory TensorDataset"]
        _echo()
        memory, disk = medians["StreamingDataset, cache='memory'"], medians["StreamingDataset, cache='disk'"]
        _echo(f"epoch 2, memory cache / TensorDataset: {memory / base:.2f} (goal ≥ 0.95)")
        _echo(f"epoch 2, disk cache / TensorDataset: {disk / base:.2f} (goal ≥ 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
