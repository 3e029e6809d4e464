"""Hypothesis strategies for property tests of sharded datasets and of the jobs that read them.

- **Shard sizes** (lists of samples per shard): :func:`uniform_shard_sizes`, :func:`skewed_shard_sizes`,
  :func:`shard_sizes_with_empties`, :func:`one_giant_shard`, and :func:`shard_sizes`, any of them.
- **Manifests** built from those sizes, optionally with per-shard label histograms: :func:`manifests`,
  :func:`label_histograms`.
- **Jobs**: :func:`topologies` (``world_size``, ``num_nodes``, DataLoader ``num_workers``, ``batch_size``,
  ``drop_last``, ``min_per_class``), and :func:`resume_points` (an epoch stopped part-way and finished on
  another topology).
- **Samples** matching a schema: :func:`samples`, for tests that write real shards.

Every strategy shrinks towards the simple case (one shard, one rank, no workers, batch size 1), so a failing
property reports the smallest job that breaks it. Hypothesis is a dependency of the ``test`` extra only:
``pip install lightning-patterns[test]``.

Example:
    >>> from hypothesis import given, settings
    >>> from lightning_patterns.testing import assert_balanced, strategies as lps
    >>> @settings(max_examples=20)
    ... @given(lps.manifests(), lps.topologies(max_world_size=64))
    ... def test_every_rank_gets_the_same_batches(manifest, topology):
    ...     assert_balanced(manifest, topology)
    >>> test_every_rank_gets_the_same_batches()
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as _err:  # pragma: no cover - exercised in a subprocess without Hypothesis
    raise ImportError(
        "lightning_patterns.testing.strategies needs Hypothesis, which is part of the `test` extra: "
        f"`pip install lightning-patterns[test]` ({_err})."
    ) from _err

import numpy as np

from lightning_patterns.data.shards.manifest import Manifest, ShardInfo
from lightning_patterns.data.shards.schema import FieldSpec, Schema
from lightning_patterns.testing.topology import JobTopology, ResumePoint

__all__ = [
    "LabelLayout",
    "label_histograms",
    "manifests",
    "one_giant_shard",
    "resume_points",
    "samples",
    "shard_sizes",
    "shard_sizes_with_empties",
    "skewed_shard_sizes",
    "topologies",
    "uniform_shard_sizes",
]

T = TypeVar("T")

LabelLayout = Literal["mixed", "sorted", "single_class"]
"""How labels spread over shards: random per shard, the dataset sorted by label, or one class per shard."""

_DEFAULT_SCHEMA = Schema({"image": FieldSpec("uint8", (28, 28)), "label": FieldSpec("int64", ())})


def _check_range(low_name: str, low: int, high_name: str, high: int, least: int) -> None:
    if isinstance(low, bool) or not isinstance(low, int) or low < least:
        raise ValueError(f"Expected {low_name} >= {least}, got {low_name}={low!r}.")
    if isinstance(high, bool) or not isinstance(high, int) or high < low:
        raise ValueError(f"Cannot have {high_name}={high!r} < {low_name}={low!r}.")


def _split(draw: st.DrawFn, total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` non-negative counts at random cut points (shrinks to all in the last)."""
    if parts <= 0:
        return []
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


# --- shard sizes ----------------------------------------------------------------------------------


def _size_bounds(min_shards: int, max_shards: int, min_samples: int, max_samples: int, least_shards: int = 1) -> None:
    _check_range("min_shards", min_shards, "max_shards", max_shards, least_shards)
    _check_range("min_samples", min_samples, "max_samples", max_samples, 0)


@st.composite
def _uniform(draw: st.DrawFn, shards: st.SearchStrategy[int], totals: st.SearchStrategy[int]) -> list[int]:
    count, total = draw(shards), draw(totals)
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def uniform_shard_sizes(
    *, min_shards: int = 1, max_shards: int = 32, min_samples: int = 1, max_samples: int = 2_000
) -> st.SearchStrategy[list[int]]:
    """Shards of equal size but the remainder: sizes differ by at most one, as a ``"size"`` writer makes them.

    Args:
        min_shards: Fewest shards.
        max_shards: Most shards.
        min_samples: Fewest samples in all; shards may be empty only when there are more shards than samples.
        max_samples: Most samples in all.

    Raises:
        ValueError: A bound is out of range; the message names it.

    Example:
        >>> from hypothesis import find
        >>> find(uniform_shard_sizes(min_shards=3), lambda sizes: sum(sizes) >= 10)
        [4, 3, 3]
    """
    _size_bounds(min_shards, max_shards, min_samples, max_samples)
    return _uniform(st.integers(min_shards, max_shards), st.integers(min_samples, max_samples))


@st.composite
def _skewed(draw: st.DrawFn, shards: st.SearchStrategy[int], totals: st.SearchStrategy[int]) -> list[int]:
    count, total = draw(shards), draw(totals)
    weights = [2 ** draw(st.integers(0, 12)) for _ in range(count)]
    sizes = [total * w // sum(weights) for w in weights]
    sizes[max(range(count), key=lambda i: weights[i])] += total - sum(sizes)
    return sizes


def skewed_shard_sizes(
    *, min_shards: int = 1, max_shards: int = 32, min_samples: int = 1, max_samples: int = 2_000
) -> st.SearchStrategy[list[int]]:
    """Shards whose sizes span orders of magnitude (weights ``2**e``, ``e`` in 0..12), as hand-made splits do.

    Args:
        min_shards: Fewest shards.
        max_shards: Most shards.
        min_samples: Fewest samples in all.
        max_samples: Most samples in all.

    Raises:
        ValueError: A bound is out of range; the message names it.
    """
    _size_bounds(min_shards, max_shards, min_samples, max_samples)
    return _skewed(st.integers(min_shards, max_shards), st.integers(min_samples, max_samples))


@st.composite
def _with_empties(draw: st.DrawFn, shards: st.SearchStrategy[int], totals: st.SearchStrategy[int]) -> list[int]:
    count, total = draw(shards), draw(totals)
    empty = set(draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=count - 1, unique=True)))
    filled = [i for i in range(count) if i not in empty]
    sizes = [0] * count
    for i, size in zip(filled, _split(draw, total, len(filled)), strict=True):
        sizes[i] = size
    return sizes


def shard_sizes_with_empties(
    *, min_shards: int = 2, max_shards: int = 32, min_samples: int = 1, max_samples: int = 2_000
) -> st.SearchStrategy[list[int]]:
    """Ordinary shards with empty ones among them (at least one empty shard, and at least one that is not).

    Args:
        min_shards: Fewest shards, ``>= 2``.
        max_shards: Most shards.
        min_samples: Fewest samples in all.
        max_samples: Most samples in all.

    Raises:
        ValueError: A bound is out of range; the message names it.
    """
    _size_bounds(min_shards, max_shards, min_samples, max_samples, least_shards=2)
    return _with_empties(st.integers(min_shards, max_shards), st.integers(min_samples, max_samples))


@st.composite
def _giant(draw: st.DrawFn, shards: st.SearchStrategy[int], totals: st.SearchStrategy[int]) -> list[int]:
    count, total = draw(shards), draw(totals)
    giant = draw(st.integers(-(-total // 2), total))
    sizes = _split(draw, total - giant, count - 1)
    sizes.insert(draw(st.integers(0, count - 1)), giant)
    return sizes


def one_giant_shard(
    *, min_shards: int = 1, max_shards: int = 32, min_samples: int = 1, max_samples: int = 2_000
) -> st.SearchStrategy[list[int]]:
    """One shard holding at least half of the samples (anywhere in the list), the rest split among the others.

    Args:
        min_shards: Fewest shards.
        max_shards: Most shards.
        min_samples: Fewest samples in all.
        max_samples: Most samples in all.

    Raises:
        ValueError: A bound is out of range; the message names it.
    """
    _size_bounds(min_shards, max_shards, min_samples, max_samples)
    return _giant(st.integers(min_shards, max_shards), st.integers(min_samples, max_samples))


def shard_sizes(
    *, min_shards: int = 1, max_shards: int = 32, min_samples: int = 1, max_samples: int = 2_000
) -> st.SearchStrategy[list[int]]:
    """Any of the shard-size distributions above: uniform, skewed, with empty shards, or with one giant shard.

    Args:
        min_shards: Fewest shards.
        max_shards: Most shards.
        min_samples: Fewest samples in all.
        max_samples: Most samples in all.

    Example:
        >>> from hypothesis import find
        >>> find(shard_sizes(), lambda sizes: 0 in sizes)
        [1, 0]
    """
    bounds = {"max_shards": max_shards, "min_samples": min_samples, "max_samples": max_samples}
    options = [
        uniform_shard_sizes(min_shards=min_shards, **bounds),
        skewed_shard_sizes(min_shards=min_shards, **bounds),
        one_giant_shard(min_shards=min_shards, **bounds),
    ]
    if max_shards >= 2:
        options.append(shard_sizes_with_empties(min_shards=max(2, min_shards), **bounds))
    return st.one_of(options)


# --- manifests ------------------------------------------------------------------------------------


@st.composite
def _histograms(draw: st.DrawFn, sizes: Sequence[int], num_classes: int, layout: LabelLayout) -> list[tuple[int, ...]]:
    if layout == "mixed":
        return [tuple(_split(draw, size, num_classes)) for size in sizes]
    if layout == "single_class":
        labels = [draw(st.integers(0, num_classes - 1)) for _ in sizes]
        return [
            tuple(size if k == label else 0 for k in range(num_classes))
            for size, label in zip(sizes, labels, strict=True)
        ]
    # "sorted": the dataset sorted by label, cut into the shards in order.
    per_class = _split(draw, sum(sizes), num_classes)
    ends = np.cumsum(per_class)
    starts = ends - np.asarray(per_class)
    out, first = [], 0
    for size in sizes:
        last = first + size
        out.append(tuple(int(max(0, min(last, e) - max(first, s))) for s, e in zip(starts, ends, strict=True)))
        first = last
    return out


def label_histograms(
    sizes: Sequence[int], num_classes: int, layout: LabelLayout = "mixed"
) -> st.SearchStrategy[list[tuple[int, ...]]]:
    """Per shard, how many of its samples belong to each class (each histogram sums to the shard's size).

    Args:
        sizes: Samples per shard.
        num_classes: Number of classes, ``>= 1``.
        layout: ``"mixed"``: each shard a random mix; ``"sorted"``: the dataset sorted by label, then cut into
            the shards (most shards hold one or two classes, as ``--hash-key label`` gives); ``"single_class"``:
            each shard holds one class, drawn per shard.

    Raises:
        ValueError: ``num_classes < 1`` or an unknown ``layout``.

    Example:
        >>> from hypothesis import find
        >>> find(label_histograms([4, 4], 2, "sorted"), lambda h: h[0][0] == 3)
        [(3, 1), (0, 4)]
    """
    _check_range("num_classes", num_classes, "num_classes", num_classes, 1)
    if layout not in ("mixed", "sorted", "single_class"):
        raise ValueError(f"Unknown label layout {layout!r}; expected 'mixed', 'sorted' or 'single_class'.")
    return _histograms(list(sizes), num_classes, layout)


def _sample_bytes(schema: Schema) -> int:
    """Bytes a sample takes in a shard, at least (variable-length fields count their 8-byte offset)."""
    return sum(8 if spec.variable_length else spec.sample_nbytes for spec in schema.values())


@st.composite
def _manifests(
    draw: st.DrawFn,
    sizes: st.SearchStrategy[list[int]],
    num_classes: st.SearchStrategy[int] | None,
    label_layout: st.SearchStrategy[LabelLayout],
    label_field: str,
    schema: Schema,
) -> Manifest:
    chosen = draw(sizes)
    histograms = None
    if num_classes is not None:
        histograms = draw(label_histograms(chosen, draw(num_classes), draw(label_layout)))
    per_sample = _sample_bytes(schema)
    shards = []
    for i, size in enumerate(chosen):
        path = f"shard-{i:05d}.lps"
        digest = hashlib.sha256(f"{path}:{size}".encode()).hexdigest()
        labels = {} if histograms is None else {label_field: histograms[i]}
        shards.append(ShardInfo(path, size, 4096 + size * per_sample, f"sha256:{digest}", None, labels))
    return Manifest(schema, tuple(shards), {"rule": "size", "shard_bytes": 32 * 2**20})


def manifests(
    sizes: st.SearchStrategy[list[int]] | None = None,
    *,
    num_classes: int | st.SearchStrategy[int] | None = None,
    label_layout: LabelLayout | st.SearchStrategy[LabelLayout] | None = None,
    label_field: str = "label",
    schema: Schema | None = None,
) -> st.SearchStrategy[Manifest]:
    """A :class:`~lightning_patterns.data.shards.Manifest` with shards of the drawn sizes, and no shard files.

    Enough for everything that works from the manifest alone (:func:`~lightning_patterns.testing.check_balance`,
    the read plan); publish one with :func:`~lightning_patterns.data.shards.publish_manifest` to check a URL the
    same way. Shard byte sizes and checksums are placeholders that :meth:`Manifest.from_json` accepts.

    Args:
        sizes: The shard sizes; :func:`shard_sizes` by default.
        num_classes: With a value (or a strategy of one), each shard records a label histogram for
            ``label_field`` over that many classes; ``None`` records none.
        label_layout: How labels spread over shards (see :func:`label_histograms`); any of them when ``None``.
        label_field: The field the histograms are for; must be in ``schema``.
        schema: The dataset's schema; a 28×28 ``uint8`` image and an ``int64`` ``label`` by default.

    Raises:
        ValueError: ``label_field`` is not a field of ``schema``.

    Example:
        >>> from hypothesis import find
        >>> manifest = find(manifests(num_classes=3, label_layout="sorted"), lambda m: len(m.shards) > 1)
        >>> [shard.label_counts["label"] for shard in manifest.shards]
        [(0, 0, 1), (0, 0, 0)]
    """
    schema = schema if schema is not None else _DEFAULT_SCHEMA
    if num_classes is not None and label_field not in schema:
        raise ValueError(
            f"manifests(label_field={label_field!r}) names no field of the schema {sorted(schema)}; pass a schema "
            "with that field, or name one of its fields."
        )
    layouts: st.SearchStrategy[LabelLayout] = st.sampled_from(["mixed", "sorted", "single_class"])
    if label_layout is not None:
        layouts = label_layout if isinstance(label_layout, st.SearchStrategy) else st.just(label_layout)
    classes = st.just(num_classes) if isinstance(num_classes, int) else num_classes
    return _manifests(sizes if sizes is not None else shard_sizes(), classes, layouts, label_field, schema)


# --- jobs -----------------------------------------------------------------------------------------


@st.composite
def _topologies(
    draw: st.DrawFn,
    world_sizes: st.SearchStrategy[int],
    max_num_nodes: int,
    workers: st.SearchStrategy[int],
    batch_sizes: st.SearchStrategy[int],
    drop_last: st.SearchStrategy[bool],
    min_per_class: st.SearchStrategy[int | None],
    shuffle: st.SearchStrategy[bool],
    seed: st.SearchStrategy[int],
) -> JobTopology:
    world_size = draw(world_sizes)
    nodes = [n for n in range(1, min(world_size, max_num_nodes) + 1) if world_size % n == 0]
    return JobTopology(
        world_size=world_size,
        num_nodes=draw(st.sampled_from(nodes)),
        num_workers=draw(workers),
        batch_size=draw(batch_sizes),
        drop_last=draw(drop_last),
        min_per_class=draw(min_per_class),
        shuffle=draw(shuffle),
        seed=draw(seed),
    )


def _fixed_or_drawn(value: T | None, drawn: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return drawn if value is None else st.just(value)


def topologies(
    *,
    min_world_size: int = 1,
    max_world_size: int = 8,
    max_num_nodes: int | None = None,
    min_workers: int = 0,
    max_workers: int = 4,
    min_batch_size: int = 1,
    max_batch_size: int = 64,
    drop_last: bool | None = None,
    min_per_class: int | st.SearchStrategy[int | None] | None = None,
    shuffle: bool | None = False,
    seed: int | None = 0,
) -> st.SearchStrategy[JobTopology]:
    """Training jobs: a world size (a multiple of the node count), DataLoader workers, and loader settings.

    Args:
        min_world_size: Fewest ranks.
        max_world_size: Most ranks.
        max_num_nodes: Most nodes (``world_size`` is always a multiple of ``num_nodes``); ``max_world_size``
            when ``None``.
        min_workers: Fewest DataLoader workers per rank.
        max_workers: Most DataLoader workers per rank.
        min_batch_size: Smallest batch size.
        max_batch_size: Largest batch size.
        drop_last: Fixed, or drawn when ``None``.
        min_per_class: Fixed (``None``: no class check), or a strategy of values.
        shuffle: Fixed, or drawn when ``None``.
        seed: The shuffle seed, or drawn when ``None``.

    Raises:
        ValueError: A bound is out of range; the message names it.

    Example:
        >>> from hypothesis import find
        >>> find(topologies(max_world_size=64), lambda t: t.num_nodes > 1 and t.num_workers > 0)
        JobTopology(world_size=2, num_nodes=2, num_workers=1, batch_size=1, drop_last=False, min_per_class=None, \
shuffle=False, seed=0, span_samples=None)
    """
    _check_range("min_world_size", min_world_size, "max_world_size", max_world_size, 1)
    _check_range("min_workers", min_workers, "max_workers", max_workers, 0)
    _check_range("min_batch_size", min_batch_size, "max_batch_size", max_batch_size, 1)
    nodes_cap = max_world_size if max_num_nodes is None else max_num_nodes
    if isinstance(nodes_cap, bool) or not isinstance(nodes_cap, int) or nodes_cap < 1:
        raise ValueError(f"Expected max_num_nodes >= 1 or None, got max_num_nodes={max_num_nodes!r}.")
    classes = min_per_class if isinstance(min_per_class, st.SearchStrategy) else st.just(min_per_class)
    return _topologies(
        st.integers(min_world_size, max_world_size),
        nodes_cap,
        st.integers(min_workers, max_workers),
        st.integers(min_batch_size, max_batch_size),
        _fixed_or_drawn(drop_last, st.booleans()),
        classes,
        _fixed_or_drawn(shuffle, st.booleans()),
        _fixed_or_drawn(seed, st.integers(0, 2**32 - 1)),
    )


@st.composite
def _resume_points(draw: st.DrawFn, workers: int, finishing: st.SearchStrategy[JobTopology]) -> ResumePoint:
    fraction = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
    progress = draw(st.lists(fraction, min_size=workers, max_size=workers))
    return ResumePoint(tuple(progress), draw(finishing))


def resume_points(
    topology: JobTopology,
    *,
    min_world_size: int = 1,
    max_world_size: int = 8,
    max_num_nodes: int | None = None,
    min_workers: int = 0,
    max_workers: int = 4,
) -> st.SearchStrategy[ResumePoint]:
    """Points at which ``topology``'s epoch stops, each with another job (same loader settings) finishing it.

    Each worker of ``topology`` has yielded nothing, everything, or any fraction of its samples; the finishing
    job draws a new world size, node count and worker count, and keeps the batch size, ``drop_last``,
    ``min_per_class`` and shuffle settings (a checkpoint resumed on another cluster).

    Args:
        topology: The job that stops.
        min_world_size: Fewest ranks of the finishing job.
        max_world_size: Most ranks of the finishing job.
        max_num_nodes: Most nodes of the finishing job.
        min_workers: Fewest DataLoader workers per rank of the finishing job.
        max_workers: Most DataLoader workers per rank of the finishing job.

    Raises:
        ValueError: A bound is out of range; the message names it.

    Example:
        >>> from hypothesis import given, settings
        >>> from lightning_patterns.testing import assert_balanced, strategies as lps
        >>> jobs = lps.topologies().flatmap(lambda t: lps.resume_points(t).map(lambda r: (t, r)))
        >>> @settings(max_examples=10)
        ... @given(lps.manifests(), jobs)
        ... def test_resume_on_another_cluster_is_exact(manifest, job):
        ...     topology, resume = job
        ...     assert_balanced(manifest, topology, resume=resume)
        >>> test_resume_on_another_cluster_is_exact()
    """
    finishing = topologies(
        min_world_size=min_world_size,
        max_world_size=max_world_size,
        max_num_nodes=max_num_nodes,
        min_workers=min_workers,
        max_workers=max_workers,
        min_batch_size=topology.batch_size,
        max_batch_size=topology.batch_size,
        drop_last=topology.drop_last,
        min_per_class=topology.min_per_class,
        shuffle=topology.shuffle,
        seed=topology.seed,
    )
    return _resume_points(topology.world_size * topology.workers_per_rank, finishing)


# --- samples --------------------------------------------------------------------------------------


def _field_values(spec: FieldSpec, classes: int | None, max_length: int) -> st.SearchStrategy[Any]:
    if spec.dtype == "str":
        return st.text(max_size=max_length)
    if spec.dtype == "bytes":
        return st.binary(max_size=max_length)
    dtype = np.dtype(spec.dtype)
    shape = spec.shape if spec.shape is not None else ()
    if classes is not None:
        if dtype.kind not in "iu":
            raise ValueError(
                f"samples(num_classes=...) names a field of dtype {spec.dtype!r}; class labels need an integer dtype."
            )
        elements: st.SearchStrategy[Any] = st.integers(0, classes - 1)
    else:
        # Finite values only: a NaN never equals itself, so a test comparing what it wrote would fail on it.
        elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    return hnp.arrays(dtype, shape, elements=elements)


def samples(
    schema: Schema | Mapping[str, FieldSpec],
    *,
    num_classes: Mapping[str, int] | None = None,
    max_length: int = 64,
) -> st.SearchStrategy[dict[str, Any]]:
    """Sample records matching ``schema``: numpy arrays of each field's dtype and shape, ``str`` or ``bytes``.

    Values are finite (no NaN or infinity), so a test can compare what it wrote with what it reads.

    Args:
        schema: Field name to :class:`~lightning_patterns.data.shards.FieldSpec`.
        num_classes: For label fields, the number of classes: their values are drawn from ``0 .. C-1``.
        max_length: The longest ``str`` or ``bytes`` value.

    Raises:
        ValueError: ``num_classes`` names a field the schema lacks, or a field of a non-integer dtype.

    Example:
        >>> from hypothesis import find
        >>> schema = Schema(
        ...     {"image": FieldSpec("uint8", (2, 2)), "label": FieldSpec("int64", ()), "id": FieldSpec("str", None)}
        ... )
        >>> sample = find(samples(schema, num_classes={"label": 10}), lambda s: s["label"] > 3)
        >>> sample["image"].shape, int(sample["label"]), sample["id"]
        ((2, 2), 4, '')
    """
    fields = Schema(dict(schema)) if not isinstance(schema, Schema) else schema
    classes = dict(num_classes or {})
    unknown = sorted(set(classes) - set(fields))
    if unknown:
        raise ValueError(f"samples(num_classes=...) names fields {unknown} that the schema {sorted(fields)} lacks.")
    return st.fixed_dictionaries(
        {name: _field_values(spec, classes.get(name), max_length) for name, spec in fields.items()}
    )
