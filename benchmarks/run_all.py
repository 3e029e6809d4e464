"""Run every benchmark in one go (what ``make bench`` runs, through ``benchmarks/run_all.sh``).

1. starts one moto S3 server process on 127.0.0.1 and shares it (and the written datasets) between benchmarks;
2. the data benchmark (``data_loading.py``, 200,000 samples) → ``results/data_loading.json``;
3. the memory-scaling benchmark (``memory_scaling.py``, 1× = the data benchmark's size, 4× = four times it;
   MosaicML Streaming at a capped size) → ``results/memory_scaling.json``;
4. the parameter-server benchmark (``parameter_server.py``, its own processes) → ``results/parameter_server.json``,
   and the sparse-embeddings one (``sparse_embeddings.py``: 1M and 10M rows × 64 beside DDP) →
   ``results/sparse_embeddings.json``; a failure is reported, not fatal;
5. ``report.py`` → ``results/REPORT.md``, PNG plots, and the "Performance" section of ``benchmarks/README.md``.

It prints how long each phase took. ``--quick`` runs a smoke check (20,000 samples, 1 run each; memory scaling
at 5,000 / 20,000; the parameter server on the 1M model only). ``caching.py`` is a standalone check and not run
here: the data benchmark already measures epoch 2 with each cache against the in-memory TensorDataset.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data_loading  # noqa: E402
import memory_scaling  # noqa: E402
import report  # noqa: E402

# Benchmarks that run in their own processes; each takes ``--out PATH`` (JSON with a ``markdown`` key for the
# report) and ``--quick``.
OTHER_BENCHMARKS = ("parameter_server.py", "sparse_embeddings.py", "time_to_accuracy.py")
OTHER_TIMEOUT_S = 300
#: Benchmarks that take longer than ``OTHER_TIMEOUT_S``: sparse_embeddings.py (each configuration 3 times, and DDP's
#: attempt at a 10M-row table, up to 10 minutes on its own) and time_to_accuracy.py (seven trainings to a target
#: accuracy, issue 15).
TIMEOUTS_S = {"sparse_embeddings.py": 1500, "time_to_accuracy.py": 1800}


def run_other(script: Path, *, quick: bool) -> None:
    """Run one of ``OTHER_BENCHMARKS``; it writes ``results/<name>.json``. A failure is printed, not raised."""
    out = data_loading.RESULTS / f"{script.stem}.json"
    out.unlink(missing_ok=True)  # so that a failed run leaves no earlier result for the report to show
    cmd = [sys.executable, str(script), "--out", str(out), *(["--quick"] if quick else [])]
    print(f"[run_all] {shlex.join(cmd)}", flush=True)
    timeout = TIMEOUTS_S.get(script.name, OTHER_TIMEOUT_S)
    try:
        proc = subprocess.run(cmd, timeout=timeout, cwd=HERE.parent)
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout} s"
    print(f"[run_all] {script.name}: {status}", flush=True)


class PhaseTimer:
    """Wall time of each phase, printed as it ends and summed up at the end (to check the 15-minute budget)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.phases.append((name, time.perf_counter() - t0))
        print(f"[run_all] {name} took {self.phases[-1][1]:.0f} s", flush=True)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.phases)
        return f"done in {time.perf_counter() - self.started:.0f} s ({parts})"


def main(argv: list[str] | None = None) -> None:
    """Run all benchmarks and the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="data benchmark samples (default 200,000)")
    parser.add_argument(
        "--memory-samples", type=int, default=None, help="memory scaling 1× (default: --samples; --quick: 5,000)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader workers (e.g. 0 2)")
    parser.add_argument(
        "--mosaic-samples", type=int, default=50_000, help="time MosaicML on the first N samples of each epoch (0: all)"
    )
    parser.add_argument("--skip-others", action="store_true", help="do not run parameter_server.py")
    memory_scaling.add_peer_arguments(parser)
    data_loading.add_common_arguments(parser)
    args = parser.parse_args(argv)
    command = "make bench" + (" (--quick)" if args.quick else "")
    if argv is None and len(sys.argv) > 1:
        command = "benchmarks/run_all.sh " + shlex.join(sys.argv[1:])
    data_loading.finish_defaults(args, samples=200_000)
    data_args = argparse.Namespace(**vars(args))
    data_args.mosaic_local, data_args.only = False, None
    data_args.out = str(data_loading.RESULTS / "data_loading.json")
    memory_args = argparse.Namespace(**vars(args))
    memory_args.only = None
    memory_args.samples = args.memory_samples or (5_000 if args.quick else args.samples)
    memory_args.memory_out = str(data_loading.RESULTS / "memory_scaling.json")

    timer = PhaseTimer()
    with data_loading.workspace(args) as ws:
        print(f"[run_all] S3 endpoint {ws.endpoint}, scratch {ws.root}", flush=True)
        with timer.phase("data"):
            data_loading.run_benchmark(ws, data_args)
        with timer.phase("memory scaling"):
            memory_scaling.run_benchmark(ws, memory_args)
    for name in () if args.skip_others else OTHER_BENCHMARKS:
        with timer.phase(name.removesuffix(".py")):
            run_other(HERE / name, quick=args.quick)
    with timer.phase("report"):
        report.main(["--command", command])
    print(f"[run_all] {timer.summary()}; see {data_loading.RESULTS / 'REPORT.md'}")


if __name__ == "__main__":
    main()
