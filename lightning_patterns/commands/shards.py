"""``lightning-patterns shards``: write datasets as shards, and inspect how they split over ranks and workers.

``shards write`` takes one of three sources:

- a lightning_patterns dataset URL (a folder with ``manifest.json``): its samples are re-sharded, in order;
- MNIST-style IDX files, ``--idx-images URL --idx-labels URL`` in place of ``SRC`` (raw or ``.gz``, any
  fsspec URL), streamed without a local copy;
- ``synthetic:N`` or ``synthetic:N:SPLIT``: ``N`` Fashion-MNIST-shaped samples (``split`` train, val or test)
  from :mod:`lightning_patterns.data.synthetic`, for demos.

``shards inspect`` prints the per-shard table, the shard-size balance, and the plan of
:func:`~lightning_patterns.data.sharding.assignment.plan_epoch` for a world size and worker count, and can
plot both. ``shards gc`` lists (and with ``--apply`` removes) the shard files of a dataset folder that no
manifest lists: leftovers of a killed writer, and generations an overwrite retired, once past their grace
period (:func:`~lightning_patterns.data.shards.collect_garbage`). ``shards check``
(:mod:`~lightning_patterns.commands.shards_check`) searches ranges of world sizes, workers and batch sizes for a
job under which the dataset is unbalanced. The data layers are imported when a subcommand runs, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_patterns._units import human_bytes, parse_size
from lightning_patterns.commands.base import PROG, Command, CommandParser, echo
from lightning_patterns.commands.errors import report_error
from lightning_patterns.commands.shards_check import check_parser, run_check
from lightning_patterns.exceptions import DestinationNotEmptyError

if TYPE_CHECKING:
    from lightning_patterns.data.sharding.assignment import WorkerPlan
    from lightning_patterns.data.shards.manifest import Manifest
    from lightning_patterns.data.synthetic import FashionLikeSamples

__all__ = ["ShardsCommand", "run_shards_command"]

_PROG = f"{PROG} shards"
_SPLITS = ("train", "val", "test")
_SPANS_SHOWN = 4


class _UsageError(Exception):
    """A bad combination of arguments: reported like argparse's errors, with exit status 2."""


class _SourceError(Exception):
    """The source cannot be read: reported with exit status 1."""


# --- argument types --------------------------------------------------------------------------------


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_arg(minimum: int) -> Any:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return convert


def _option_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, got {text!r}; for example --storage-option anon=true or "
            f"--storage-option client_kwargs.endpoint_url=http://127.0.0.1:9000"
        )
    try:  # numbers, true/false/null and JSON objects keep their type; anything else stays a string
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _storage_options(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    """Build fsspec's ``storage_options``; a dotted key (``client_kwargs.endpoint_url``) makes nested dicts."""
    options: dict[str, Any] = {}
    for key, value in pairs or ():
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _UsageError(f"--storage-option {key}=...: {part!r} was already set to {child!r}, not a mapping")
            node = child
        node[leaf] = value
    return options


# --- parsers ---------------------------------------------------------------------------------------


def _write_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=f"{_PROG} write",
        description="Write samples as shards plus a manifest at DEST (any writable fsspec URL or local path).",
        usage=(
            f"{_PROG} write [-h] (SRC | --idx-images URL --idx-labels URL) DEST\n"
            "           [--shard-bytes B | --num-shards S [--hash-key FIELD]] [--mode {create,append,overwrite}]\n"
            "           [--label-field FIELD ...] [--force] [--storage-option KEY=VALUE ...]\n"
            "           [--src-storage-option KEY=VALUE ...] [--no-progress]"
        ),
        epilog=(
            "SRC is one of:\n"
            "  URL                  a lightning_patterns dataset (a folder with manifest.json), re-sharded in order\n"
            "  synthetic:N[:SPLIT]  N Fashion-MNIST-shaped demo samples; SPLIT is train (default), val or test\n"
            "For MNIST-style IDX files (raw or .gz, any fsspec URL such as https://), omit SRC and pass\n"
            "--idx-images URL --idx-labels URL.\n\n"
            "examples:\n"
            f"  {_PROG} write synthetic:10000 /tmp/fashion --shard-bytes 1MiB\n"
            f"  {_PROG} write /tmp/fashion /tmp/fashion-hashed --num-shards 16 --hash-key label\n"
            f"  {_PROG} write --idx-images https://host/train-images-idx3-ubyte.gz \\\n"
            "      --idx-labels https://host/train-labels-idx1-ubyte.gz s3://bucket/fashion --shard-bytes 32MiB"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", nargs="?", metavar="SRC", help="dataset URL or synthetic:N[:SPLIT]; omit with --idx-*")
    parser.add_argument("dest", metavar="DEST", help="where to write the dataset")
    parser.add_argument("--idx-images", metavar="URL", help="IDX images file (magic 0x00000803), raw or .gz")
    parser.add_argument("--idx-labels", metavar="URL", help="IDX labels file (magic 0x00000801), raw or .gz")
    parser.add_argument(
        "--shard-bytes",
        type=_size_arg,
        metavar="B",
        help="target bytes per shard (size sharding, the default): 1048576, 64MB, 32MiB; default 32MiB",
    )
    parser.add_argument(
        "--num-shards", type=_int_arg(1), metavar="S", help="hash-shard into S shards (by --hash-key or sample index)"
    )
    parser.add_argument("--hash-key", metavar="FIELD", help="field whose value is hashed (with --num-shards)")
    parser.add_argument(
        "--mode",
        choices=("create", "append", "overwrite"),
        default="create",
        help="create (fail if DEST exists; default), append to DEST, or overwrite DEST",
    )
    parser.add_argument(
        "--label-field",
        action="append",
        metavar="FIELD",
        help="integer class-label field whose per-shard class counts the manifest records (repeatable; default: "
        "'label' if the samples have an integer field of that name), so readers check class balance per rank",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a folder that holds other files but no manifest (refused otherwise)",
    )
    parser.add_argument(
        "--storage-option",
        type=_option_arg,
        action="append",
        metavar="KEY=VALUE",
        help="fsspec storage option for DEST, and for the source unless --src-storage-option is given; "
        "VALUE is parsed as JSON when it can be (true, 3), a dotted KEY nests (client_kwargs.endpoint_url=...)",
    )
    parser.add_argument(
        "--src-storage-option",
        type=_option_arg,
        action="append",
        metavar="KEY=VALUE",
        help="fsspec storage option for the source only (replaces --storage-option there)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=f"{_PROG} inspect",
        description=(
            "Print a dataset's shards (samples and bytes), their balance, and which samples every rank and "
            "DataLoader worker reads in an epoch."
        ),
    )
    parser.add_argument("url", metavar="URL", help="the dataset root (any fsspec URL or local path)")
    parser.add_argument("--world-size", type=_int_arg(1), default=1, metavar="N", help="number of ranks (default 1)")
    parser.add_argument(
        "--num-workers", type=_int_arg(0), default=0, metavar="K", help="DataLoader workers per rank (default 0)"
    )
    parser.add_argument("--batch-size", type=_int_arg(1), default=1, metavar="B", help="samples per batch (default 1)")
    parser.add_argument("--epoch", type=_int_arg(0), default=0, metavar="E", help="epoch to plan (default 0)")
    parser.add_argument("--seed", type=_int_arg(0), default=0, metavar="S", help="shuffle seed (default 0)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle as StreamingDataset(shuffle=True) does")
    parser.add_argument("--drop-last", action="store_true", help="drop up to N-1 samples instead of padding")
    parser.add_argument(
        "--storage-option", type=_option_arg, action="append", metavar="KEY=VALUE", help="fsspec storage option"
    )
    parser.add_argument("--plot", metavar="PNG", help="write a PNG of shard sizes and per-rank load (needs matplotlib)")
    return parser


def _main_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=_PROG, description="Write, inspect, check and garbage-collect sharded datasets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{write,inspect,check,gc}")
    commands.add_parser("write", help="write samples (a dataset, IDX files, synthetic:N) as shards")
    commands.add_parser("inspect", help="print shard sizes and the per-rank, per-worker plan")
    commands.add_parser("check", help="search world sizes, workers and batch sizes for a job that unbalances URL")
    commands.add_parser("gc", help="list (or with --apply remove) shard files no manifest lists")
    return parser


# --- write -----------------------------------------------------------------------------------------


class _DatasetSamples:
    """The samples of an existing dataset in manifest order, one shard in memory at a time."""

    def __init__(self, url: str, manifest: Manifest, storage_options: Mapping[str, Any]) -> None:
        self.url = url
        self.manifest = manifest
        self.storage_options = storage_options

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from lightning_patterns.data.shards.manifest import read_shard

        for shard in self.manifest.shards:
            reader = read_shard(self.url, shard, storage_options=self.storage_options, schema=self.manifest.schema)
            yield from reader


class _IDXSamples:
    """The samples of an IDX images + labels pair, streamed.

    A plain iterable with ``__len__``: ``IDXDataset`` inherits ``Dataset.__getitem__`` (which raises), so
    handing it over directly would make it look like a map-style dataset.
    """

    def __init__(self, images_url: str, labels_url: str, storage_options: Mapping[str, Any]) -> None:
        from lightning_patterns.data.streaming.idx import IDXDataset

        # The whole pair, in file order, even when started under torchrun (RANK / WORLD_SIZE set).
        self.dataset = IDXDataset(images_url, labels_url, storage_options, rank=0, world_size=1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self.dataset:
            yield from self.dataset


def _synthetic(spec: str) -> FashionLikeSamples:
    from lightning_patterns.data.synthetic import FashionLikeSamples

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise _UsageError(f"SRC {spec!r}: expected synthetic:N or synthetic:N:SPLIT with N >= 1, e.g. synthetic:1000")
    split = parts[2] if len(parts) == 3 else "train"
    if split not in _SPLITS:
        raise _UsageError(f"SRC {spec!r}: unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    return FashionLikeSamples(int(parts[1]), split=split)


def _source(args: argparse.Namespace, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """The samples to write and a short description of them."""
    idx = (args.idx_images, args.idx_labels)
    if any(idx):
        if not all(idx):
            missing = "--idx-labels" if args.idx_images else "--idx-images"
            raise _UsageError(f"IDX input needs both --idx-images and --idx-labels; {missing} is missing")
        if args.src is not None:
            raise _UsageError(
                f"got both SRC {args.src!r} and --idx-images/--idx-labels; pass only DEST with the --idx-* options"
            )
        return _IDXSamples(args.idx_images, args.idx_labels, storage_options), f"IDX {args.idx_images}"
    if args.src is None:
        raise _UsageError(
            "the following arguments are required: SRC (a dataset URL or synthetic:N), "
            "or --idx-images URL --idx-labels URL"
        )
    if args.src.startswith("synthetic:"):
        return _synthetic(args.src), args.src
    from lightning_patterns.data.shards.manifest import load_manifest
    from lightning_patterns.exceptions import ManifestError

    try:
        manifest = load_manifest(args.src, storage_options)
    except ManifestError as err:
        raise _SourceError(
            f"SRC {args.src!r} is not a lightning_patterns dataset: {err} For IDX files pass --idx-images and "
            f"--idx-labels instead of SRC; for demo data pass synthetic:N."
        ) from None
    return _DatasetSamples(args.src, manifest, storage_options), args.src


def _describe_sharding(sharding: Mapping[str, Any]) -> str:
    rest = ", ".join(f"{key}={value!r}" for key, value in sharding.items() if key != "rule")
    return f"{sharding.get('rule')} ({rest})" if rest else str(sharding.get("rule"))


def _write(args: argparse.Namespace) -> int:
    if args.shard_bytes is not None and args.num_shards is not None:
        raise _UsageError(
            f"--shard-bytes and --num-shards are alternatives: --shard-bytes {args.shard_bytes} writes size-targeted "
            f"shards, --num-shards {args.num_shards} hash-shards; pass one of them"
        )
    if args.hash_key is not None and args.num_shards is None:
        raise _UsageError(
            f"--hash-key {args.hash_key} applies to hash sharding only; add --num-shards S "
            f"(e.g. --num-shards 16 --hash-key {args.hash_key}) or drop --hash-key"
        )
    from lightning_patterns.data.shards.writer import write_dataset

    dest_options = _storage_options(args.storage_option)
    src_options = dest_options if args.src_storage_option is None else _storage_options(args.src_storage_option)
    samples, described = _source(args, src_options)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = write_dataset(
            samples,
            args.dest,
            sharding="hash" if args.num_shards is not None else None,
            shard_bytes=args.shard_bytes,
            num_shards=args.num_shards,
            hash_key=args.hash_key,
            mode=args.mode,
            storage_options=dest_options,
            progress=not args.no_progress,
            force=args.force,
            label_fields=args.label_field,
        )
    seconds = time.perf_counter() - start
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            sys.stderr.write(f"{_PROG} write: warning: {warning.message}\n")
    echo(f"wrote {described} to {args.dest}")
    echo(f"shards:   {len(manifest.shards)}")
    echo(f"samples:  {manifest.num_samples}")
    echo(f"bytes:    {manifest.num_bytes} ({human_bytes(manifest.num_bytes)})")
    echo(f"seconds:  {seconds:.2f}")
    echo(f"sharding: {_describe_sharding(manifest.sharding)}")
    labelled = sorted({name for shard in manifest.shards for name in shard.label_counts})
    if labelled:
        echo(f"label counts: recorded for {', '.join(labelled)}")
    return 0


# --- inspect ---------------------------------------------------------------------------------------


def _spans_summary(plan: WorkerPlan) -> str:
    shown = " ".join(f"s{shard}[{start}:{stop}]" for shard, start, stop in plan.spans[:_SPANS_SHOWN])
    more = f" … (+{len(plan.spans) - _SPANS_SHOWN} more)" if len(plan.spans) > _SPANS_SHOWN else ""
    return f"{len(plan.spans)} spans{': ' + shown if shown else ''}{more}"


def _print_shards(manifest: Manifest) -> None:
    shards = manifest.shards
    buckets = any(shard.bucket is not None for shard in shards)
    width = max(5, len(str(len(shards) - 1)))
    header = f"{'shard':>{width}} {'samples':>9} {'bytes':>12}" + (f" {'bucket':>6}" if buckets else "") + "  path"
    echo(header)
    for i, shard in enumerate(shards):
        bucket = f" {'-' if shard.bucket is None else shard.bucket:>6}" if buckets else ""
        echo(f"{i:>{width}} {shard.num_samples:>9} {shard.num_bytes:>12}{bucket}  {shard.path}")
    if not shards:
        echo("(no shards)")
        return
    sizes = [shard.num_samples for shard in shards]
    nbytes = [shard.num_bytes for shard in shards]
    mean = sum(sizes) / len(sizes)
    ratio = f"{max(sizes) / mean:.3f}" if mean else "n/a"
    echo(f"shard samples: min {min(sizes)}, max {max(sizes)}, mean {mean:.1f}, imbalance ratio (max/mean) {ratio}")
    echo(
        f"shard bytes:   min {min(nbytes)}, max {max(nbytes)}, mean {sum(nbytes) / len(nbytes):.0f}, "
        f"imbalance ratio (max/mean) {max(nbytes) / (sum(nbytes) / len(nbytes)):.3f}"
    )


def _print_plan(args: argparse.Namespace, manifest: Manifest, plans: list[list[WorkerPlan]]) -> bool:
    batch = args.batch_size
    echo(
        f"plan: epoch {args.epoch}, seed {args.seed}, shuffle {'on' if args.shuffle else 'off'}, "
        f"drop_last {'on' if args.drop_last else 'off'}, world_size {args.world_size}, "
        f"num_workers {args.num_workers}, batch_size {batch}"
    )
    rank_samples: list[int] = []
    rank_batches: list[int] = []
    for rank, workers in enumerate(plans):
        samples = sum(plan.num_samples for plan in workers)
        batches = sum(math.ceil(plan.num_samples / batch) for plan in workers)
        rank_samples.append(samples)
        rank_batches.append(batches)
        echo(f"rank {rank}: {samples} samples, {batches} batches")
        for plan in workers:
            echo(
                f"  worker {plan.worker_id}: {plan.num_samples} samples, "
                f"{math.ceil(plan.num_samples / batch)} batches, {plan.shards_opened} shards opened, "
                f"{_spans_summary(plan)}"
            )
    from lightning_patterns.data.sharding.assignment import samples_per_rank

    total = manifest.num_samples
    expected = samples_per_rank(total, args.world_size, args.drop_last)
    equal = len(set(rank_samples)) == 1 and len(set(rank_batches)) == 1 and rank_samples[0] == expected
    extra = expected * args.world_size - total
    adjust = f"{-extra} samples dropped" if extra < 0 else f"{extra} padding repeats"
    if equal:
        echo(
            f"check: every rank gets the same number of samples: OK "
            f"({expected} samples, {rank_batches[0]} batches per rank; {adjust})"
        )
    else:
        echo(f"check: every rank gets the same number of samples: FAILED (samples per rank {rank_samples})")
    return equal


def _plot(path: str, manifest: Manifest, plans: list[list[WorkerPlan]], storage_options: Mapping[str, Any]) -> None:
    import fsspec

    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise _SourceError(
            "--plot needs matplotlib; install it with `pip install 'lightning-patterns[plot]'`"
        ) from None
    sizes = [shard.num_samples for shard in manifest.shards]
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    shards_ax, ranks_ax = figure.subplots(1, 2)
    shards_ax.bar(range(len(sizes)), sizes, width=1.0 if len(sizes) > 64 else 0.8, color="tab:blue")
    if sizes:
        shards_ax.axhline(sum(sizes) / len(sizes), color="tab:red", linestyle="--", label="mean")
        shards_ax.legend(loc="upper right")
    shards_ax.set(title="Shard sizes", xlabel="shard", ylabel="samples")
    ranks = list(range(len(plans)))
    bottom = [0] * len(plans)
    num_workers = len(plans[0]) if plans else 0
    for worker in range(num_workers):
        load = [plans[rank][worker].num_samples for rank in ranks]
        ranks_ax.bar(ranks, load, bottom=bottom, label=f"worker {worker}")
        bottom = [b + n for b, n in zip(bottom, load, strict=True)]
    if 1 < num_workers <= 16:
        ranks_ax.legend(loc="lower right", fontsize="small")
    ranks_ax.set(title="Per-rank load (stacked by worker)", xlabel="rank", ylabel="samples")
    ranks_ax.set_xticks(ranks if len(ranks) <= 32 else ranks[:: max(1, len(ranks) // 16)])
    with fsspec.open(path, "wb", **dict(storage_options)) as out:
        figure.savefig(out, format="png", dpi=100)


def _inspect(args: argparse.Namespace) -> int:
    from lightning_patterns.data.sharding.assignment import PlanConfig, plan_epoch
    from lightning_patterns.data.shards.manifest import load_manifest

    storage_options = _storage_options(args.storage_option)
    manifest = load_manifest(args.url, storage_options)
    echo(f"dataset: {args.url}")
    echo(f"sharding: {_describe_sharding(manifest.sharding)}")
    echo("schema: " + ", ".join(f"{name} {spec.describe()}" for name, spec in manifest.schema.items()))
    echo(
        f"total: {len(manifest.shards)} shards, {manifest.num_samples} samples, {manifest.num_bytes} bytes "
        f"({human_bytes(manifest.num_bytes)})"
    )
    echo()
    _print_shards(manifest)
    echo()
    config = PlanConfig(
        [shard.num_samples for shard in manifest.shards],
        batch_size=args.batch_size,
        seed=args.seed,
        shuffle=args.shuffle,
        drop_last=args.drop_last,
    )
    plans = plan_epoch(config, args.epoch, world_size=args.world_size, num_workers=args.num_workers)
    ok = _print_plan(args, manifest, plans)
    if args.plot:
        _plot(args.plot, manifest, plans, storage_options)
        echo(f"plot: {args.plot}")
    return 0 if ok else 1


# --- gc ----------------------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_arg(text: str) -> float:
    """Seconds, given as a number with an optional unit: ``0``, ``90``, ``30m``, ``24h``, ``7d``."""
    raw = text.strip().lower()
    scale = _DURATION_UNITS.get(raw[-1:], 0)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a duration >= 0 in seconds, or with a unit s, m, h or d (e.g. 0, 3600, 30m, 24h, 7d); "
            f"got {text!r}"
        )
    return value


def _gc_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=f"{_PROG} gc",
        description=(
            "List the garbage of a dataset folder: shard files no manifest lists (left by a writer that was\n"
            "killed), and the shards of generations an overwrite retired, once older than the grace period.\n"
            "Nothing is removed unless --apply is given; files not named like the writer's shards are never touched."
        ),
        epilog=(
            "examples:\n"
            f"  {_PROG} gc /data/fashion                       # dry run: what would be removed\n"
            f"  {_PROG} gc /data/fashion --apply\n"
            f"  {_PROG} gc s3://bucket/fashion --grace-period 1h --apply"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL", help="the dataset root (any fsspec URL or local path)")
    parser.add_argument("--apply", action="store_true", help="remove the garbage (default: only list it)")
    parser.add_argument(
        "--grace-period",
        type=_duration_arg,
        default=None,
        metavar="T",
        help="keep garbage younger than T (seconds, or 30m, 24h, 7d; default 24h): an unlisted file that young "
        "may belong to a writer still running, and a reader may still use a retired generation",
    )
    parser.add_argument(
        "--storage-option", type=_option_arg, action="append", metavar="KEY=VALUE", help="fsspec storage option"
    )
    return parser


def _print_paths(title: str, paths: Sequence[str]) -> None:
    echo(f"{title}: {len(paths)} files")
    for path in paths:
        echo(f"  {path}")


def _gc(args: argparse.Namespace) -> int:
    from lightning_patterns.data.shards import DEFAULT_GRACE_PERIOD, collect_garbage

    grace_period = DEFAULT_GRACE_PERIOD if args.grace_period is None else args.grace_period
    report = collect_garbage(
        args.url,
        dry_run=not args.apply,
        grace_period=grace_period,
        storage_options=_storage_options(args.storage_option),
    )
    echo(f"dataset: {report.url}")
    echo(f"grace period: {grace_period:g} s")
    _print_paths("orphans (no manifest lists them)", report.orphans)
    _print_paths("expired (retired generations past the grace period)", report.expired)
    _print_paths("kept (inside the grace period)", report.kept)
    echo(f"bytes: {report.num_bytes} ({human_bytes(report.num_bytes)})")
    if report.removed:
        echo(f"removed: {len(report.paths)} files")
    elif report.paths:
        echo(f"dry run: nothing removed; run again with --apply to remove these {len(report.paths)} files")
    else:
        echo("dry run: nothing to remove")
    return 0


# --- entry point -----------------------------------------------------------------------------------


def run_shards_command(argv: Sequence[str]) -> int:
    """Run ``lightning-patterns shards write|inspect|check|gc ...`` and return the exit status.

    ``0`` on success, ``2`` for a usage error (argparse's message, or a bad combination of options, on
    stderr), ``1`` when the work itself fails (missing source or dataset, schema mismatch, an existing
    DEST with ``--mode create``...), with the error on stderr.

    Args:
        argv: the arguments after ``shards``, e.g. ``["inspect", "s3://bucket/ds", "--world-size", "8"]``.

    Returns:
        The exit status.
    """
    argv = list(argv)
    commands = {
        "write": (_write_parser, _write),
        "inspect": (_inspect_parser, _inspect),
        "check": (
            lambda: check_parser(_option_arg),
            lambda args: run_check(args, _storage_options(args.storage_option)),
        ),
        "gc": (_gc_parser, _gc),
    }
    try:
        if not argv or argv[0] not in commands:
            _main_parser().parse_args(argv)  # prints help or argparse's error and exits
            return 2
        make_parser, command = commands[argv[0]]
        parser = make_parser()
        # Intermixed parsing lets options sit between SRC and DEST.
        args = parser.parse_intermixed_args(argv[1:])
        try:
            return command(args)
        except _UsageError as err:
            parser.error(str(err))  # exits with status 2
        except DestinationNotEmptyError as err:
            # Before FileExistsError (its base), whose hint (--mode) would not help here.
            report_error(parser.prog, f"{err} On the command line: pass --force to write there anyway.")
            return 1
        except FileExistsError as err:
            report_error(parser.prog, f"{err} On the command line: --mode append or --mode overwrite.")
            return 1
        except (_SourceError, ValueError, OSError) as err:
            report_error(parser.prog, str(err))
            return 1
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    raise AssertionError("unreachable")  # parser.error never returns


class ShardsCommand(Command):
    """``lightning-patterns shards write|inspect|check|gc``."""

    name = "shards"
    help = "write datasets as shards (from a dataset, IDX files or synthetic:N), inspect and check their plan, gc"

    def run(self, argv: list[str]) -> int:
        """Run :func:`run_shards_command`."""
        return run_shards_command(argv)
