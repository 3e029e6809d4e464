"""``lightning-patterns shards check URL``: search the jobs a dataset may be read by for one that breaks its balance.

Hypothesis draws jobs from the ranges given (world sizes, node counts, DataLoader workers, batch sizes, both
``drop_last`` settings, and with ``--resume`` a stop part-way and a finish on another job), checks each with
:func:`~lightning_patterns.testing.check_balance` from the dataset's manifest alone, and shrinks the first
violation it finds to the smallest job that still breaks it. Exit status 0 when the invariants hold for every
example, 1 with the shrunk worst case on a violation: a data pipeline's CI can run it after each append.

Needs Hypothesis (``pip install lightning-patterns[test]``); imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from lightning_patterns.commands.base import PROG, CommandParser, echo
from lightning_patterns.commands.errors import report_error

if TYPE_CHECKING:
    from lightning_patterns.data.shards.manifest import Manifest
    from lightning_patterns.testing.topology import JobTopology, ResumePoint

__all__ = ["check_parser", "run_check"]

_PROG = f"{PROG} shards check"
# The searched ranges: option, least value, default range, what it is.
_RANGES = (
    ("--world-size", 1, (1, 64), "ranks"),
    ("--num-nodes", 1, (1, 1), "nodes; each world size is a multiple of its node count"),
    ("--workers", 0, (0, 8), "DataLoader workers per rank"),
    ("--batch-size", 1, (1, 512), "samples per batch"),
)


def _range_arg(minimum: int) -> Any:
    """``"1-64"`` → ``(1, 64)``, ``"8"`` → ``(8, 8)``; both ends ``>= minimum``."""

    def convert(text: str) -> tuple[int, int]:
        low, sep, high = text.partition("-")
        try:
            bounds = (int(low), int(high) if sep else int(low))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH (e.g. 1-64), got {text!r}") from None
        if bounds[0] < minimum or bounds[1] < bounds[0]:
            raise argparse.ArgumentTypeError(f"expected {minimum} <= LOW <= HIGH, got {text!r}")
        return bounds

    return convert


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def check_parser(option_arg: Any) -> argparse.ArgumentParser:
    """The parser of ``shards check``; ``option_arg`` converts ``--storage-option KEY=VALUE``."""
    parser = CommandParser(
        prog=_PROG,
        description=(
            "Search world sizes, DataLoader workers and batch sizes for a job under which the dataset at URL is\n"
            "unbalanced (unequal batches per rank, a sample lost or repeated beyond the documented padding,\n"
            "workers more than one batch apart, a rank missing a class), reading only its manifest. Prints the\n"
            'shrunk worst case, or "holds for N examples"; exit status 1 on a violation.'
        ),
        epilog=(
            "examples:\n"
            f"  {_PROG} s3://bucket/train --world-size 1-64 --workers 0-8 --batch-size 1-512\n"
            f"  {_PROG} /data/train --world-size 8 --num-nodes 1-2 --min-per-class 1 --resume"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL", help="the dataset root (any fsspec URL or local path)")
    for flag, least, default, what in _RANGES:
        shown = f"{default[0]}" if default[0] == default[1] else f"{default[0]}-{default[1]}"
        parser.add_argument(
            flag, type=_range_arg(least), default=default, metavar="N|LOW-HIGH", help=f"{what} (default {shown})"
        )
    parser.add_argument(
        "--drop-last", choices=("both", "on", "off"), default="both", help="drop_last settings to try (default both)"
    )
    parser.add_argument(
        "--min-per-class",
        type=_positive,
        metavar="M",
        help="also require M samples of every class per rank (from the manifest's label counts)",
    )
    parser.add_argument("--label-field", metavar="FIELD", help="the label field of --min-per-class (default label)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle as StreamingDataset(shuffle=True) does")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="shuffle seed (default 0)")
    parser.add_argument("--epoch", type=int, default=0, metavar="E", help="epoch to plan (default 0)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="also stop each epoch part-way and finish it on another job drawn from the ranges",
    )
    parser.add_argument(
        "--max-examples",
        type=_positive,
        default=200,
        metavar="N",
        help="jobs to try before declaring the invariants hold (default 200)",
    )
    parser.add_argument(
        "--storage-option", type=option_arg, action="append", metavar="KEY=VALUE", help="fsspec storage option"
    )
    return parser


def _job(args: argparse.Namespace) -> Any:
    """The strategy of what each example checks: a topology, and with ``--resume`` a resume point for it."""
    from hypothesis import strategies as st

    from lightning_patterns.testing import strategies as lps

    def bounds(name: str, value: tuple[int, int]) -> dict[str, int]:
        return {f"min_{name}": value[0], f"max_{name}": value[1]}

    topologies = lps.topologies(
        **bounds("world_size", args.world_size),
        **bounds("workers", args.workers),
        **bounds("batch_size", args.batch_size),
        max_num_nodes=args.num_nodes[1],
        drop_last={"both": None, "on": True, "off": False}[args.drop_last],
        min_per_class=args.min_per_class,
        shuffle=args.shuffle,
        seed=args.seed,
    ).filter(lambda topology: topology.num_nodes >= args.num_nodes[0])
    if not args.resume:
        return topologies.map(lambda topology: (topology, None))
    return topologies.flatmap(
        lambda topology: st.tuples(
            st.just(topology),
            lps.resume_points(
                topology,
                **bounds("world_size", args.world_size),
                **bounds("workers", args.workers),
                max_num_nodes=args.num_nodes[1],
            ),
        )
    )


def _reproduce(url: str, topology: JobTopology, args: argparse.Namespace) -> str:
    """The ``shards inspect`` command line that prints the plan of the worst case."""
    flags = [
        f"--world-size {topology.world_size}",
        f"--num-workers {topology.num_workers}",
        f"--batch-size {topology.batch_size}",
    ]
    if topology.drop_last:
        flags.append("--drop-last")
    if topology.shuffle:
        flags += ["--shuffle", f"--seed {topology.seed}"]
    if args.epoch:
        flags.append(f"--epoch {args.epoch}")
    return f"{PROG} shards inspect {url} " + " ".join(flags)


def run_check(args: argparse.Namespace, storage_options: dict[str, Any]) -> int:
    """Run ``shards check`` with parsed ``args``; return the exit status (0 holds, 1 violated).

    Without Hypothesis it reports which extra to install (exit status 1); ranges that allow no job (no world size
    a multiple of a node count) are a usage error (exit status 2).

    Raises:
        ManifestError: The dataset's manifest is missing or invalid.
        ValueError: ``--min-per-class`` without label counts in the manifest.
    """
    try:
        from hypothesis import HealthCheck, find, settings
        from hypothesis.errors import NoSuchExample
    except ImportError as err:
        report_error(
            _PROG,
            f"it searches with Hypothesis, which is not installed ({err}); it is part of the `test` extra: "
            "`pip install lightning-patterns[test]`.",
        )
        return 1
    if not any(
        w % n == 0
        for w in range(args.world_size[0], args.world_size[1] + 1)
        for n in range(args.num_nodes[0], args.num_nodes[1] + 1)
    ):
        report_error(
            _PROG,
            f"no world size in --world-size {_span(args.world_size)} is a multiple of a node count in "
            f"--num-nodes {_span(args.num_nodes)}; every node runs the same number of ranks, so widen one of them",
        )
        return 2
    from lightning_patterns.data.shards.manifest import load_manifest
    from lightning_patterns.testing.balance import check_balance

    manifest: Manifest = load_manifest(args.url, storage_options)
    tried = 0

    def broken(job: tuple[JobTopology, ResumePoint | None]) -> bool:
        nonlocal tried
        tried += 1
        topology, resume = job
        report = check_balance(manifest, topology, epoch=args.epoch, resume=resume, label_field=args.label_field)
        return not report.ok

    options = settings(
        max_examples=args.max_examples,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    echo(
        f"checking {args.url} ({len(manifest.shards)} shards, {manifest.num_samples} samples): world_size "
        f"{_span(args.world_size)}, num_nodes {_span(args.num_nodes)}, workers {_span(args.workers)}, batch_size "
        f"{_span(args.batch_size)}, drop_last {args.drop_last}"
        + (f", min_per_class {args.min_per_class}" if args.min_per_class else "")
        + (", with resume" if args.resume else "")
    )
    try:
        topology, resume = find(_job(args), broken, settings=options)
    except NoSuchExample:
        echo(f"holds for {tried} examples")
        return 0
    report = check_balance(manifest, topology, epoch=args.epoch, resume=resume, label_field=args.label_field)
    report = dataclasses.replace(report, dataset=args.url)
    echo("violated; the shrunk worst case:")
    echo(report.message())
    echo(f"reproduce: {_reproduce(args.url, topology, args)}")
    return 1


def _span(bounds: tuple[int, int]) -> str:
    return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"
