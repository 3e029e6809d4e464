"""Memory-scaling benchmark (issue 4 point 2, issue 8 point 3): peak RSS of each streaming option at 1× and 4× data.

Each streaming option reads one full epoch (batch size 256, no shuffle, 0 DataLoader workers) of a dataset of
``--samples`` samples (1×) and of four times as many (4×), every run in a fresh process; the figure is the
median peak RSS (``VmHWM``) over ``--runs`` runs. The goal: RSS at 4× ≤ 1.1× RSS at 1×.

Options measured: lightning_patterns without cache and with the disk cache (both from the S3 server on
127.0.0.1), LitData (from local disk: it cannot reach an ``http://`` endpoint) and MosaicML Streaming (from S3).
The memory cache is left out on purpose: it holds the dataset in memory, so it grows with it by design.

The peers read 5-40 times slower than ours (MosaicML ~5,000 samples/s, LitData ~40,000/s here), so to keep
``make bench`` within 15 minutes they run ``--peer-runs`` times per size (default 1: their peak RSS varied by
under 1 MB over 3 runs, ours by up to 25 MB), and MosaicML's 1× is capped at ``PEER_CAPS`` (12,500 samples:
one run at 800,000 would take ~3 minutes). Every row records its own sizes and runs, and the report
labels them; ``--uncapped`` lifts the cap.

Run ``python benchmarks/memory_scaling.py --help``; ``benchmarks/run_all.sh`` (``make bench``) runs it after the
data benchmark and reuses that benchmark's datasets where the sizes agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_loading import (
    RESULTS,
    Workspace,
    add_common_arguments,
    caching_status,
    child_main,
    finish_defaults,
    machine_info,
    measure,
    workspace,
)

GOAL_RATIO = 1.1
# Largest 1× sample count per peer loader (see the module docstring); ours is never capped.
PEER_CAPS = {"mosaic": 12_500}

OPTIONS: list[dict[str, Any]] = [
    {"name": "lightning_patterns, no cache, S3", "loader": "ours", "source": "s3", "cache": None},
    {"name": "lightning_patterns, disk cache, S3", "loader": "ours", "source": "s3", "cache": "disk"},
    {"name": "LitData 0.2.76, local disk", "loader": "litdata", "source": "local"},
    {"name": "MosaicML Streaming 0.13.0, S3", "loader": "mosaic", "source": "s3"},
]


def option_plan(option: dict[str, Any], args: argparse.Namespace) -> tuple[int, int]:
    """The 1× sample count and the runs per size of ``option``: peers are capped and run ``--peer-runs`` times."""
    loader = option["loader"]
    if loader == "ours":
        return args.samples, args.runs
    cap = None if args.uncapped else PEER_CAPS.get(loader)
    samples = args.samples if cap is None else min(args.samples, cap)
    return samples, args.peer_runs


def run_benchmark(ws: Workspace, args: argparse.Namespace) -> dict[str, Any]:
    """Measure every option at 1× and 4× on ``ws`` and write ``results/memory_scaling.json``."""
    started = time.time()
    caching = caching_status()
    rows = []
    for option in OPTIONS:
        if args.only and not any(word in option["name"] or word == option["loader"] for word in args.only):
            continue
        config = {**option, "workers": 0, "skip": caching if option.get("cache") else None}
        row: dict[str, Any] = {"name": option["name"], "loader": option["loader"], "source": option["source"]}
        row["cache"] = option.get("cache")
        samples, runs = option_plan(option, args)
        sizes = (samples, 4 * samples)
        row.update(samples_1x=sizes[0], samples_4x=sizes[1], runs=runs)
        for label, n in zip(("1x", "4x"), sizes, strict=True):
            t0 = time.perf_counter()
            result = measure(ws, config, n=n, runs=runs, epochs=1)
            if "error" in result:
                row["error"] = result["error"]
                break
            row[f"rss_{label}_mb"] = result["rss_peak_mb"]
            row[f"rss_base_{label}_mb"] = result["rss_base_mb"]
            row[f"sps_{label}"] = result["epoch1_sps"]
            row[f"ok_{label}"] = result["ok"]
            row[f"runs_{label}"] = [r["rss_peak_mb"] for r in result["runs"]]
            print(
                f"[memory] {option['name']} at {label} ({n:,} samples): peak RSS {result['rss_peak_mb']:.0f} MB, "
                f"{result['epoch1_sps']:,.0f} samples/s  [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
        if "error" in row:
            print(f"[memory] {option['name']}: {row['error']}")
        else:
            row["ratio_4x_1x"] = row["rss_4x_mb"] / row["rss_1x_mb"]
            growth_1x = row["rss_1x_mb"] - row["rss_base_1x_mb"]
            growth_4x = row["rss_4x_mb"] - row["rss_base_4x_mb"]
            row["growth_1x_mb"], row["growth_4x_mb"] = growth_1x, growth_4x
            row["goal_met"] = row["ratio_4x_1x"] <= GOAL_RATIO
        rows.append(row)
    doc = {
        "benchmark": "memory_scaling",
        "params": {
            "samples_1x": args.samples,
            "samples_4x": 4 * args.samples,
            "runs": args.runs,
            "peer_runs": args.peer_runs,
            "peer_caps": None if args.uncapped else PEER_CAPS,
            "epochs": 1,
            "workers": 0,
            "batch_size": 256,
            "goal": f"RSS at 4x <= {GOAL_RATIO}x RSS at 1x",
        },
        "caching": caching or "available",
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "rows": rows,
    }
    out = Path(args.memory_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"[memory] wrote {out} in {doc['duration_s']:.0f} s")
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the memory-scaling benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="samples at 1× (default 200,000; 4× is 800,000)")
    parser.add_argument("--only", nargs="+", default=None, help="run only options whose name has one of these words")
    add_peer_arguments(parser)
    parser.add_argument("--memory-out", default=str(RESULTS / "memory_scaling.json"))
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    finish_defaults(args, samples=200_000)
    if args.quick and args.samples == 20_000:
        args.samples = 5_000
    return args


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for the peers' sizes and runs (shared with ``run_all.py``)."""
    parser.add_argument("--peer-runs", type=int, default=1, help="fresh processes per size for the peers")
    parser.add_argument("--uncapped", action="store_true", help=f"lift the peers' 1× caps {PEER_CAPS}")


def main(argv: list[str] | None = None) -> None:
    """Run the memory-scaling benchmark from the command line."""
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    args = parse_args(argv)
    with workspace(args) as ws:
        run_benchmark(ws, args)


if __name__ == "__main__":
    main()
