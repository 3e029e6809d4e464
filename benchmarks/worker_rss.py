"""Memory of a streaming DataLoader worker, with and without Lightning imported in it (issue 17, item 4).

Until issue 17, ``import lightning_patterns.data`` imported the DataModules and so ``pytorch_lightning``: every
DataLoader worker that unpickled a ``StreamingDataset`` imported Lightning too. Now the data path imports neither
Lightning nor anything of it. This measures one worker reading one epoch of a local sharded dataset, in a fresh
process per run, for:

- ``now``: the worker as it is;
- ``before``: the same worker that also imports ``pytorch_lightning`` first (what the old package import did in
  it), through ``worker_init_fn``.

With ``spawn`` (and ``forkserver``, Python 3.14's default) a worker imports everything itself, so the import is
private memory of each worker. With ``fork`` the worker inherits the parent's pages: for ``before`` the parent
imports ``pytorch_lightning`` (as ``import lightning_patterns.data`` did there), and the worker shares those pages
until it writes to them, so its RSS counts them but its USS mostly does not.

For each worker the parent reads ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) and ``/proc/<pid>/smaps_rollup``
(PSS; USS = private clean + private dirty) after the last batch, while the worker is still alive. The worker
reports whether Lightning was imported in it when the epoch began, and how long it took from its start to that
point. Medians over ``--runs`` fresh processes.

Run: ``.venv/bin/python benchmarks/worker_rss.py [--runs 3] [--json results/worker_rss.json]``. Standalone, Linux
only (it reads ``/proc``); not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLES = 20_000
START_METHODS = ("spawn", "fork")
VARIANTS = ("before", "now")
HEAVY = ("lightning", "pytorch_lightning")


def _echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _proc_kib(pid: int, name: str, fields: tuple[str, ...]) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0])
    return values


def _worker_memory(pid: int) -> dict[str, float]:
    status = _proc_kib(pid, "status", ("VmRSS", "VmHWM"))
    rollup = _proc_kib(pid, "smaps_rollup", ("Pss", "Private_Clean", "Private_Dirty"))
    return {
        "rss_mb": status["VmRSS"] / 1024,
        "peak_rss_mb": status["VmHWM"] / 1024,
        "pss_mb": rollup["Pss"] / 1024,
        "uss_mb": (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024,
    }


class _WorkerProbe:
    """``worker_init_fn``: optionally import ``pytorch_lightning`` first, then record what the worker holds."""

    def __init__(self, report_dir: str, import_lightning: bool) -> None:
        self.report_dir = report_dir
        self.import_lightning = import_lightning

    def __call__(self, worker_id: int) -> None:
        if self.import_lightning:
            import pytorch_lightning  # noqa: F401  (the old package import, in the worker)
        heavy = sorted(name for name in HEAVY if name in sys.modules)
        started = _process_start_seconds(os.getpid())
        report = {"worker_id": worker_id, "lightning_imported": heavy, "worker_startup_seconds": started}
        Path(self.report_dir, f"{os.getpid()}.json").write_text(json.dumps(report))


def _process_start_seconds(pid: int) -> float:
    """Seconds since process ``pid`` started (from ``/proc/<pid>/stat`` and the system's uptime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])  # field 22 of stat: starttime, in clock ticks since boot
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _measure_one(dataset_url: str, start_method: str, variant: str) -> dict[str, Any]:
    """In this (fresh) process: one epoch through one worker; the worker's memory after the last batch."""
    if variant == "before" and start_method == "fork":
        import pytorch_lightning  # noqa: F401  (the old `import lightning_patterns.data`, in the parent)
    from lightning_patterns.data import StreamingDataLoader, StreamingDataset

    report_dir = tempfile.mkdtemp(prefix="worker-rss-")
    dataset = StreamingDataset(dataset_url, batch_size=256)
    loader = StreamingDataLoader(
        dataset,
        num_workers=1,
        multiprocessing_context=start_method,
        worker_init_fn=_WorkerProbe(report_dir, import_lightning=variant == "before" and start_method != "fork"),
    )
    started = time.perf_counter()
    samples = 0
    memory: dict[str, float] = {}
    for batch in loader:
        samples += len(batch["label"])
        if samples >= SAMPLES:  # the last batch: measure while the worker is alive
            [worker] = multiprocessing.active_children()
            memory = _worker_memory(worker.pid or 0)
    seconds = time.perf_counter() - started
    [report_file] = list(Path(report_dir).iterdir())
    report = json.loads(report_file.read_text())
    return {**memory, **report, "epoch_seconds": seconds, "samples": samples}


def _run_fresh(dataset_url: str, start_method: str, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", dataset_url, start_method, variant]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def _write_dataset(root: Path) -> str:
    import numpy as np

    from lightning_patterns.data import write_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (SAMPLES, 28, 28), dtype=np.uint8)
    samples = ({"image": images[i], "label": np.int64(i % 10)} for i in range(SAMPLES))
    url = str(root / "dataset")
    write_dataset(samples, url, shard_bytes=2 * 2**20, progress=False)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", nargs=3, metavar=("URL", "START_METHOD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _echo(json.dumps(_measure_one(*args.child)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="worker-rss-data-"))
    url = _write_dataset(work)
    header = f"{'start method':<13} {'variant':<8} {'RSS MB':>7} {'peak MB':>8} {'PSS MB':>7} {'USS MB':>7}"
    _echo(f"{header} {'epoch s':>8}  Lightning in the worker")
    results: dict[str, Any] = {}
    for start_method in START_METHODS:
        for variant in VARIANTS:
            runs = [_run_fresh(url, start_method, variant) for _ in range(args.runs)]

            def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.median(run[key] for run in runs))

            row = {key: median(key) for key in ("rss_mb", "peak_rss_mb", "pss_mb", "uss_mb", "epoch_seconds")}
            lightning = sorted({name for run in runs for name in run["lightning_imported"]})
            results[f"{start_method}/{variant}"] = {**row, "lightning_imported": lightning, "runs": runs}
            _echo(
                f"{start_method:<13} {variant:<8} {row['rss_mb']:>7.0f} {row['peak_rss_mb']:>8.0f} "
                f"{row['pss_mb']:>7.0f} {row['uss_mb']:>7.0f} {row['epoch_seconds']:>8.2f}  "
                f"{', '.join(lightning) or 'no'}"
            )
    if args.json is not None:
        payload = {"samples": SAMPLES, "runs_per_configuration": args.runs, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
