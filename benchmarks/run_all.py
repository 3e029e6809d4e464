"""Run every benchmark in one go (what ``make bench`` runs, through ``benchmarks/run_all.sh``).

1. starts one moto S3 server process on 127.0.0.1 and shares it (and the written datasets) between benchmarks;
2. the data benchmark (``data_loading.py``) → ``results/data_loading.json``;
3. the memory-scaling benchmark (``memory_scaling.py``) → ``results/memory_scaling.json``;
4. the other engineers' benchmarks, when present (``caching.py``, ``parameter_server.py``) and when they take
   ``--out PATH``: each writes its own ``results/<name>.json`` (with a ``markdown`` key for the report, if it
   likes); ``--quick`` is passed on when they take it; failures are reported, not fatal;
5. ``report.py`` → ``results/REPORT.md``, PNG plots, and the "Performance" section of ``benchmarks/README.md``.

``--quick`` runs a smoke check (20,000 samples, 1 run each; memory scaling at 5,000 / 20,000).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data_loading  # noqa: E402
import memory_scaling  # noqa: E402
import report  # noqa: E402

OTHER_BENCHMARKS = ("caching.py", "parameter_server.py")
OTHER_TIMEOUT_S = 300


def run_other(script: Path, *, quick: bool) -> None:
    """Run another benchmark script that writes JSON: it must take ``--out PATH`` (and may take ``--quick``).

    A script without ``--out`` is skipped with a message (it would only print), so ``make bench`` stays in budget.
    """
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    if "--out" not in help_text:
        print(f"[run_all] skipping {script.name}: it takes no --out PATH to write its JSON result", flush=True)
        return
    out = data_loading.RESULTS / f"{script.stem}.json"
    cmd = [sys.executable, str(script), "--out", str(out)]
    if quick and "--quick" in help_text:
        cmd.append("--quick")
    started = time.perf_counter()
    print(f"[run_all] {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=OTHER_TIMEOUT_S, cwd=HERE.parent)
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {OTHER_TIMEOUT_S} s"
    print(f"[run_all] {script.name}: {status} [{time.perf_counter() - started:.0f} s]", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run all benchmarks and the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="data benchmark samples (default 200,000)")
    parser.add_argument("--memory-samples", type=int, default=None, help="memory scaling 1× (default 50,000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader workers (e.g. 0 2)")
    parser.add_argument(
        "--mosaic-samples", type=int, default=50_000, help="time MosaicML on the first N samples of each epoch (0: all)"
    )
    parser.add_argument("--skip-others", action="store_true", help="do not run caching.py / parameter_server.py")
    data_loading.add_common_arguments(parser)
    args = parser.parse_args(argv)
    command = "make bench" + (" (--quick)" if args.quick else "")
    if argv is None and len(sys.argv) > 1:
        command = "benchmarks/run_all.sh " + shlex.join(sys.argv[1:])
    data_loading.finish_defaults(args, samples=200_000)
    data_args = argparse.Namespace(**vars(args))
    data_args.mosaic_local, data_args.only = False, None
    data_args.mosaic_samples = args.mosaic_samples
    data_args.out = str(data_loading.RESULTS / "data_loading.json")
    memory_args = argparse.Namespace(**vars(args))
    memory_args.only = None
    memory_args.samples = args.memory_samples or (5_000 if args.quick else 50_000)
    memory_args.memory_out = str(data_loading.RESULTS / "memory_scaling.json")

    started = time.perf_counter()
    with data_loading.workspace(args) as ws:
        print(f"[run_all] S3 endpoint {ws.endpoint}, scratch {ws.root}", flush=True)
        data_loading.run_benchmark(ws, data_args)
        memory_scaling.run_benchmark(ws, memory_args)
    if not args.skip_others:
        for name in OTHER_BENCHMARKS:
            script = HERE / name
            if script.exists():
                run_other(script, quick=args.quick)
    report.main(["--command", command])
    print(f"[run_all] done in {time.perf_counter() - started:.0f} s; see {data_loading.RESULTS / 'REPORT.md'}")


if __name__ == "__main__":
    main()
