"""``lightning-patterns cache info|clear``: every cache the project creates, with its path and size.

- the disk cache: ``$LIGHTNING_PATTERNS_CACHE`` or ``~/.cache/lightning_patterns`` (``cache="disk"`` without a
  ``cache_dir``);
- the recipes' disk caches: ``lightning_logs/<recipe>/cache`` (a recipe's ``cache_dir``);
- the demo shards: the embedded default dataset, written under ``<user cache>/demo`` and reused by later runs.

``--disk``, ``--recipes`` and ``--demo`` pick some of them (default: all); ``--cache-dir DIR`` looks at one disk
cache folder only. Only the files each cache names as its own are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_patterns._units import human_bytes
from lightning_patterns.commands.base import PROG, Command, CommandParser, echo
from lightning_patterns.recipes import LOGS_DIR

__all__ = ["CacheCommand", "run_cache_command"]

_KINDS = ("disk", "recipes", "demo")


def _parser() -> CommandParser:
    parser = CommandParser(
        prog=f"{PROG} cache",
        description="Show or empty the caches lightning_patterns creates: the disk cache, the recipes' disk caches "
        "(lightning_logs/<recipe>/cache) and the demo shards.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,clear}")
    for name, help_text in (
        ("info", "show each cache's path, entries and bytes"),
        ("clear", "delete the caches' files (only their own files)"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        command.add_argument(
            "--cache-dir",
            default=None,
            help="only the disk cache given this `cache_dir` (default: every cache below)",
        )
        for kind, what in (
            ("disk", "the disk cache in $LIGHTNING_PATTERNS_CACHE or ~/.cache/lightning_patterns"),
            ("recipes", "the recipes' disk caches, LOGS_DIR/<recipe>/cache"),
            ("demo", "the demo shards (the embedded default dataset) in <user cache>/demo"),
        ):
            command.add_argument(f"--{kind}", action="store_true", help=f"{what} (default: all three)")
        command.add_argument(
            "--logs-dir", default=LOGS_DIR, help=f"where the recipes keep their runs (default: {LOGS_DIR})"
        )
    return parser


class _Cache(ABC):
    """One cache folder: what it holds, and how to empty it."""

    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        self.path = path

    @abstractmethod
    def info(self) -> tuple[int, list[str]]:
        """Bytes held, and the lines describing them."""

    @abstractmethod
    def clear(self) -> str:
        """Delete the cache's own files; say what was removed."""


class _DiskCache(_Cache):
    def info(self) -> tuple[int, list[str]]:
        from lightning_patterns.data.caching.layout import cache_info

        info = cache_info(self.path)
        lines = [
            f"cache: {info.root}",
            f"entries: {info.entries}",
            f"bytes: {info.num_bytes} ({human_bytes(info.num_bytes)})",
        ]
        if info.temp_files:
            lines.append(f"half-written files: {info.temp_files} (deleted when the cache next adds an entry)")
        lines.append(f"datasets: {len(info.datasets)}")
        lines += [
            f"  {dataset.key[:16]}  {dataset.cached_shards}/{dataset.num_shards} shards cached, "
            f"{human_bytes(dataset.cached_bytes)} of {human_bytes(dataset.num_bytes)}"
            for dataset in info.datasets
        ]
        return info.num_bytes, lines

    def clear(self) -> str:
        from lightning_patterns.data.caching.layout import clear_cache

        return f"removed {clear_cache(self.path)} files from {self.path}"


@dataclass(frozen=True)
class _DemoDataset:
    path: Path
    num_bytes: int


class _DemoShards(_Cache):
    """The embedded dataset's folders: each holds ``train/`` and ``val/`` datasets, written by ``make demo``."""

    def _datasets(self) -> list[_DemoDataset]:
        if not self.path.is_dir():
            return []
        found = []
        for folder in sorted(self.path.iterdir()):
            if folder.is_dir() and any((folder / split / "manifest.json").is_file() for split in ("train", "val")):
                found.append(_DemoDataset(folder, _folder_bytes(folder)))
        return found

    def info(self) -> tuple[int, list[str]]:
        datasets = self._datasets()
        total = sum(dataset.num_bytes for dataset in datasets)
        lines = [f"folder: {self.path}", f"bytes: {total} ({human_bytes(total)})", f"datasets: {len(datasets)}"]
        lines += [f"  {dataset.path.name}  {human_bytes(dataset.num_bytes)}" for dataset in datasets]
        return total, lines

    def clear(self) -> str:
        datasets = self._datasets()
        for dataset in datasets:
            shutil.rmtree(dataset.path)
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only if nothing else is there
        total = human_bytes(sum(dataset.num_bytes for dataset in datasets))
        return f"removed {len(datasets)} datasets ({total}) from {self.path}"


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _selected(args: argparse.Namespace) -> list[_Cache]:
    from lightning_patterns.data.caching.layout import default_cache_dir, store_root
    from lightning_patterns.data.embedded import default_data_root

    if args.cache_dir:
        return [_DiskCache("disk cache", Path(args.cache_dir))]
    kinds = [kind for kind in _KINDS if getattr(args, kind)] or list(_KINDS)
    caches: list[_Cache] = []
    if "disk" in kinds:
        caches.append(_DiskCache("disk cache", Path(default_cache_dir())))
    if "recipes" in kinds:
        logs = Path(args.logs_dir)
        recipe_caches = sorted(logs.glob("*/cache")) if logs.is_dir() else []
        caches += [
            _DiskCache(f"recipe cache ({folder.parent.name})", folder)
            for folder in recipe_caches
            if store_root(folder).is_dir()
        ]
    if "demo" in kinds:
        caches.append(_DemoShards("demo shards", default_data_root()))
    return caches


def run_cache_command(argv: Sequence[str]) -> int:
    """Run ``cache info`` or ``cache clear`` with ``argv`` (the arguments after ``cache``); return the exit code.

    Examples:
        >>> import tempfile
        >>> run_cache_command(["info", "--cache-dir", tempfile.mkdtemp()])  # doctest: +ELLIPSIS
        disk cache
          cache: .../lightning_patterns_cache_v1
          entries: 0
          bytes: 0 (0 B)
          datasets: 0
        0
    """
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exit_:  # --help, or a usage error already printed
        return int(exit_.code or 0)
    caches = _selected(args)
    if args.command == "clear":
        for cache in caches:
            echo(f"{cache.label}: {cache.clear()}")
        return 0
    total = 0
    for cache in caches:
        num_bytes, lines = cache.info()
        total += num_bytes
        echo(cache.label)
        for line in lines:
            echo(f"  {line}")
    if len(caches) > 1:
        echo(f"total: {total} bytes ({human_bytes(total)}) in {len(caches)} caches")
    return 0


class CacheCommand(Command):
    """``lightning-patterns cache info|clear``."""

    name = "cache"
    help = "show or clear every cache the project creates (disk cache, recipe caches, demo shards)"

    def run(self, argv: list[str]) -> int:
        """Run :func:`run_cache_command`."""
        return run_cache_command(argv)
