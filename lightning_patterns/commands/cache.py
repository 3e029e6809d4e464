"""``lightning-patterns cache info|clear``: look at or empty the disk cache.

Register it with ``register_tool("cache", run_cache_command)`` from :mod:`lightning_patterns.cli`.
"""

from __future__ import annotations

import argparse
import sys

from lightning_patterns.data.caching.layout import CACHE_DIR_ENV, cache_info, clear_cache, default_cache_dir
from lightning_patterns.data.caching.locks import CacheLockTimeoutError
from lightning_patterns.data.shards.cli import human_bytes

__all__ = ["run_cache_command"]


def _echo(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-patterns cache", description="Inspect or empty the disk cache.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,clear}")
    for name, help_text in (
        ("info", "show the entries, bytes and datasets in the cache"),
        ("clear", "delete every cache entry (only the cache's own files)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--cache-dir",
            default=None,
            help=f"the folder given as `cache_dir` (default: ${CACHE_DIR_ENV} or ~/.cache/lightning_patterns)",
        )
    return parser


def run_cache_command(argv: list[str]) -> int:
    """Run ``cache info`` or ``cache clear`` with ``argv`` (the arguments after ``cache``); return the exit code.

    Examples:
        >>> import tempfile
        >>> run_cache_command(["info", "--cache-dir", tempfile.mkdtemp()])  # doctest: +ELLIPSIS
        cache: .../lightning_patterns_cache_v1
        entries: 0
        bytes: 0 (0 B)
        datasets: 0
        0
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return int(exit_.code or 0)
    cache_dir = args.cache_dir or default_cache_dir()
    if args.command == "info":
        info = cache_info(cache_dir)
        _echo(f"cache: {info.root}")
        _echo(f"entries: {info.entries}")
        _echo(f"bytes: {info.num_bytes} ({human_bytes(info.num_bytes)})")
        if info.temp_files:
            _echo(f"half-written files: {info.temp_files} (deleted when the cache next adds an entry)")
        _echo(f"datasets: {len(info.datasets)}")
        for dataset in info.datasets:
            _echo(
                f"  {dataset.key[:16]}  {dataset.cached_shards}/{dataset.num_shards} shards cached, "
                f"{human_bytes(dataset.cached_bytes)} of {human_bytes(dataset.num_bytes)}"
            )
        return 0
    try:
        removed = clear_cache(cache_dir)
    except CacheLockTimeoutError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    _echo(f"cache: removed {removed} files from {cache_dir}")
    return 0
