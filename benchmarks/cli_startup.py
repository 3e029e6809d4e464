"""CLI start-up benchmark: wall time of ``lightning-patterns`` commands, each in fresh processes (hyperfine-style).

Every command runs once to warm the file cache, then ``--runs`` times in a new process each; the table shows the
minimum, median and maximum wall time. The light commands (``--help``, ``recipes``, ``cache info``, ``shards
inspect``) should stay under 1 s from a warm install: they import neither torch nor Lightning. ``fit --help``
(which builds the LightningCLI parser, so imports Lightning) and a bare interpreter are shown for scale.

Run: ``.venv/bin/python benchmarks/cli_startup.py [--runs 10] [--json results/cli_startup.json]``. A standalone
check, not part of ``make bench``. It imports nothing of the project itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 1.0


def _echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m lightning_patterns``."""
    script = Path(sys.executable).parent / "lightning-patterns"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_patterns"]


def _time(argv: list[str], runs: int, env: dict[str, str], cwd: Path) -> list[float]:
    def once() -> float:
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=300)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr[-2000:]}")
        return seconds

    once()  # warm-up: file cache, bytecode
    return [once() for _ in range(runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per command (default 10)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    cli = _command()
    work = Path(tempfile.mkdtemp(prefix="cli-startup-"))
    env = {**os.environ, "LIGHTNING_PATTERNS_CACHE": str(work / "cache")}
    try:
        dataset = work / "dataset"
        subprocess.run(
            [*cli, "shards", "write", "synthetic:2000", str(dataset), "--shard-bytes", "256KiB", "--no-progress"],
            capture_output=True,
            check=True,
            env=env,
            cwd=work,
        )
        cases = {
            "python -c pass": ([sys.executable, "-c", "pass"], False),
            "--help": ([*cli, "--help"], True),
            "recipes": ([*cli, "recipes"], True),
            "cache info": ([*cli, "cache", "info"], True),
            "shards inspect": (
                [*cli, "shards", "inspect", str(dataset), "--world-size", "4", "--num-workers", "2"],
                True,
            ),
            "fit --help": ([*cli, "fit", "--help"], False),
        }
        _echo(f"{'command':<16} {'min s':>7} {'median s':>9} {'max s':>7}  goal < {GOAL_SECONDS:.0f} s")
        results = {}
        for name, (command, light) in cases.items():
            seconds = _time(command, args.runs, env, work)
            median = statistics.median(seconds)
            results[name] = {"runs": seconds, "min": min(seconds), "median": median, "max": max(seconds)}
            goal = ("held" if median < GOAL_SECONDS else "MISSED") if light else ""
            _echo(f"{name:<16} {min(seconds):>7.3f} {median:>9.3f} {max(seconds):>7.3f}  {goal}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs_per_command": args.runs, "commands": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
