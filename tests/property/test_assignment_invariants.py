"""Property tests of the assignment plan: every guarantee of `lightning_patterns.data.sharding.assignment`.

Each test draws a manifest (shard sizes, with empty shards, one huge shard or a single sample), a
topology (1-64 ranks, 0-8 DataLoader workers, batch size) and any epoch and seed, plans the whole
epoch and checks one guarantee. Manifests that are materialised stay at <= 5,000 samples;
`test_huge_shards_tile_the_stream` checks coverage of manifests up to 10**12 samples with span
arithmetic only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.data.sharding.assignment import (
    PlanConfig,
    WorkerPlan,
    epoch_spans,
    plan,
    plan_epoch,
    samples_per_rank,
)
from lightning_patterns.data.sharding.topology import Topology

MAX_TOTAL = 5_000


@st.composite
def shard_sizes(draw: st.DrawFn, max_total: int = MAX_TOTAL) -> list[int]:
    """Shard-size lists: ordinary and uneven ones, with empty shards, one huge shard or a single sample."""
    kind = draw(st.sampled_from(["uneven", "huge", "single", "empty_heavy"]))
    if kind == "single":
        sizes = [1]
    elif kind == "huge":
        sizes = [draw(st.integers(1, max_total // 2))]
    elif kind == "empty_heavy":
        sizes = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 7]), min_size=0, max_size=30))
    else:
        sizes = draw(st.lists(st.integers(0, 400), min_size=0, max_size=40))
    # Sprinkle empty shards and, sometimes, a huge shard among the others.
    extra_huge = draw(st.integers(0, max_total // 2)) if kind != "single" and draw(st.booleans()) else 0
    if extra_huge:
        sizes.insert(draw(st.integers(0, len(sizes))), extra_huge)
    for _ in range(draw(st.integers(0, 3))):
        sizes.insert(draw(st.integers(0, len(sizes))), 0)
    # Keep the suite fast: cap the total by trimming from the end.
    while sum(sizes) > max_total:
        sizes[-1 - next(i for i, v in enumerate(reversed(sizes)) if v)] //= 2
    return sizes


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """A job: `PlanConfig` fields other than the shard sizes, the world size, DataLoader workers and the epoch."""
    return {
        "world_size": draw(st.integers(1, 64)),
        "num_workers": draw(st.integers(0, 8)),
        "epoch": draw(st.integers(0, 2**32)),
        "seed": draw(st.integers(0, 2**63)),
        "shuffle": draw(st.booleans()),
        "drop_last": draw(st.booleans()),
        "batch_size": draw(st.sampled_from([1, 2, 3, 8, 32])),
        "shuffle_window": draw(st.sampled_from([0, 1, 5, 64, 1024])),
        "span_samples": draw(st.sampled_from([None, None, 1, 7, 100])),
    }


_JOB = ("world_size", "num_workers", "epoch")


def _config(sizes: Sequence[int], cfg: dict[str, Any], **overrides: Any) -> PlanConfig:
    """The `PlanConfig` of a drawn job."""
    fields = {name: value for name, value in cfg.items() if name not in _JOB}
    return PlanConfig(sizes, **{**fields, **overrides})


def _plan_epoch(sizes: Sequence[int], cfg: dict[str, Any]) -> list[list[WorkerPlan]]:
    """Every worker's plan of a drawn job."""
    return plan_epoch(_config(sizes, cfg), cfg["epoch"], world_size=cfg["world_size"], num_workers=cfg["num_workers"])


def _epoch_spans(sizes: Sequence[int], cfg: dict[str, Any]) -> list[tuple[int, int, int]]:
    return epoch_spans(_config(sizes, cfg), cfg["epoch"])


def _stream(sizes: Sequence[int], cfg: dict[str, Any]) -> np.ndarray:
    """The epoch stream as global sample indices (independent re-derivation from `epoch_spans`)."""
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1]
    parts = [np.arange(offsets[s] + a, offsets[s] + b, dtype=np.int64) for s, a, b in _epoch_spans(sizes, cfg)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _flat(plans: list[list[WorkerPlan]]) -> list[WorkerPlan]:
    return [worker_plan for rank_plans in plans for worker_plan in rank_plans]


@given(shard_sizes(), configs())
def test_every_sample_once_up_to_padding(sizes: list[int], cfg: dict[str, Any]) -> None:
    """Rank-major, worker-minor concatenation of the read order is exactly the cyclic stream's prefix.

    With N samples and W ranks: drop_last=False yields stream[p mod N] for p < W*ceil(N/W), so every
    sample at least once and W*ceil(N/W) - N <= W - 1 repeats; drop_last=True yields stream[:W*(N//W)],
    so each sample at most once and N mod W <= W - 1 dropped. The yield order is a permutation of it.
    """
    plans = _plan_epoch(sizes, cfg)
    n, w = sum(sizes), cfg["world_size"]
    read = np.concatenate([p.span_indices() for p in _flat(plans)] + [np.zeros(0, np.int64)])
    stream = _stream(sizes, cfg)
    assert np.array_equal(np.sort(stream), np.arange(n))  # the stream itself holds every sample once
    per_rank = samples_per_rank(n, w, cfg["drop_last"])
    expected = stream[np.arange(w * per_rank) % n] if n else stream
    assert np.array_equal(read, expected)
    counts = np.bincount(read, minlength=n) if n else np.zeros(0, np.int64)
    if cfg["drop_last"]:
        assert counts.max(initial=0) <= 1
        assert n - read.size <= w - 1
    else:
        assert counts.min(initial=1) >= 1
        assert read.size - n <= w - 1
    yielded = np.concatenate([p.indices() for p in _flat(plans)] + [np.zeros(0, np.int64)])
    assert np.array_equal(np.sort(yielded), np.sort(read))


@given(shard_sizes(), configs())
def test_every_rank_gets_the_same_samples_and_batches(sizes: list[int], cfg: dict[str, Any]) -> None:
    """Every rank yields samples_per_rank samples and ceil(that / batch_size) DataLoader batches.

    A DataLoader over an IterableDataset batches each worker separately, so a rank's batch count is the
    sum over its workers of ceil(n_w / batch_size); it must equal ceil(P / batch_size) on every rank.
    """
    plans = _plan_epoch(sizes, cfg)
    per_rank = samples_per_rank(sum(sizes), cfg["world_size"], cfg["drop_last"])
    b = cfg["batch_size"]
    assert len(plans) == cfg["world_size"]
    for rank_plans in plans:
        assert len(rank_plans) == max(cfg["num_workers"], 1)
        assert sum(p.num_samples for p in rank_plans) == per_rank
        assert sum(math.ceil(p.num_samples / b) for p in rank_plans) == math.ceil(per_rank / b)


@given(shard_sizes(), configs())
def test_workers_differ_by_at_most_one_batch(sizes: list[int], cfg: dict[str, Any]) -> None:
    """Within a rank, worker batch counts differ by <= 1, and only the last non-empty worker is partial."""
    b = cfg["batch_size"]
    for rank_plans in _plan_epoch(sizes, cfg):
        batches = [math.ceil(p.num_samples / b) for p in rank_plans]
        assert max(batches) - min(batches) <= 1
        non_empty = [i for i, p in enumerate(rank_plans) if p.num_samples]
        for i in non_empty[:-1]:
            assert rank_plans[i].num_samples % b == 0


@given(shard_sizes(), configs())
def test_workers_open_few_shards(sizes: list[int], cfg: dict[str, Any]) -> None:
    """Each worker reads one contiguous segment of the cyclic stream, so opens few shards.

    Precisely: with m the smallest span of the epoch stream (the smallest non-empty shard when
    span_samples is None), a worker yielding n_w samples has shards_opened <= n_w // m + 2, and 0 when
    n_w == 0, because only the first and last of its spans may be partial.
    """
    spans = _epoch_spans(sizes, cfg)
    if not spans:
        return
    smallest = min(b - a for _, a, b in spans)
    position = {(s, a, b): i for i, (s, a, b) in enumerate(spans)}
    for worker_plan in _flat(_plan_epoch(sizes, cfg)):
        if worker_plan.num_samples == 0:
            assert worker_plan.shards_opened == 0
            continue
        assert worker_plan.shards_opened <= worker_plan.num_samples // smallest + 2
        assert len(worker_plan.spans) <= worker_plan.num_samples // smallest + 2
        # Interior spans are whole spans of the stream (the order is checked in the first test).
        for interior in worker_plan.spans[1:-1]:
            assert interior in position


@given(shard_sizes(), configs(), st.integers(0, 63), st.integers(0, 8))
def test_plan_is_pure_and_agrees_everywhere(sizes: list[int], cfg: dict[str, Any], rank: int, worker: int) -> None:
    """plan in one process equals plan_epoch in another, call after call (no hidden state)."""
    rank %= cfg["world_size"]
    worker %= max(cfg["num_workers"], 1)
    topology = Topology(cfg["world_size"], rank, cfg["num_workers"], worker)
    alone = plan(_config(sizes, cfg), topology, cfg["epoch"])
    again = plan(_config(list(sizes), cfg), topology, cfg["epoch"])
    assert alone == again == _plan_epoch(sizes, cfg)[rank][worker]
    assert np.array_equal(alone.indices(), again.indices())


@given(shard_sizes(), configs())
def test_window_shuffle_stays_in_its_window(sizes: list[int], cfg: dict[str, Any]) -> None:
    """The within-worker shuffle permutes only within windows of shuffle_window samples (none if off)."""
    for worker_plan in _flat(_plan_epoch(sizes, cfg)):
        read, yielded = worker_plan.span_indices(), worker_plan.indices()
        window = cfg["shuffle_window"] if cfg["shuffle"] and cfg["shuffle_window"] > 1 else 0
        if not window:
            assert np.array_equal(read, yielded)
            continue
        for lo in range(0, read.size, window):
            assert np.array_equal(np.sort(read[lo : lo + window]), np.sort(yielded[lo : lo + window]))


@given(shard_sizes(), st.integers(0, 2**32), st.integers(0, 2**63))
def test_unshuffled_single_process_reads_in_manifest_order(sizes: list[int], epoch: int, seed: int) -> None:
    """shuffle=False on one rank with the main process only yields 0 .. N-1 in order."""
    alone = plan(PlanConfig(sizes, seed=seed), Topology(), epoch)
    assert np.array_equal(alone.indices(), np.arange(sum(sizes)))


@given(shard_sizes(), configs(), st.integers(1, 16), st.integers(0, 8))
def test_replanning_remaining_spans_keeps_the_guarantees(
    sizes: list[int], cfg: dict[str, Any], new_world: int, new_workers: int
) -> None:
    """plan over a remaining suffix of the stream, on a new topology, covers exactly that suffix."""
    spans = _epoch_spans(sizes, cfg)
    remaining = spans[len(spans) // 2 :]
    if remaining:  # consume part of the first remaining span, too
        s, a, b = remaining[0]
        remaining[0] = (s, a + (b - a) // 3, b)
    config, workers = _config(sizes, cfg), max(new_workers, 1)
    plans = [
        [plan(config, Topology(new_world, r, new_workers, w), cfg["epoch"], remaining) for w in range(workers)]
        for r in range(new_world)
    ]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1]
    parts = [np.arange(offsets[s] + a, offsets[s] + b, dtype=np.int64) for s, a, b in remaining]
    stream = np.concatenate([*parts, np.zeros(0, np.int64)])
    n = stream.size
    per_rank = samples_per_rank(n, new_world, cfg["drop_last"])
    read = np.concatenate([p.span_indices() for p in _flat(plans)] + [np.zeros(0, np.int64)])
    assert np.array_equal(read, stream[np.arange(new_world * per_rank) % n] if n else stream)
    for rank_plans in plans:
        assert sum(p.num_samples for p in rank_plans) == per_rank


@given(
    st.lists(st.integers(0, 10**12), min_size=1, max_size=20),
    st.integers(1, 64),
    st.integers(0, 8),
    st.integers(0, 2**20),
    st.booleans(),
    st.booleans(),
)
def test_huge_shards_tile_the_stream(
    sizes: list[int], world_size: int, num_workers: int, seed: int, shuffle: bool, drop_last: bool
) -> None:
    """Up to 10**12 samples, by span arithmetic: the plans' spans tile the stream's cyclic prefix exactly.

    Concatenating every worker's spans (rank-major) and merging adjacent ones gives the stream's spans
    for positions [0, W*P), wrapping once at N when padding; counts match samples_per_rank.
    """
    config = PlanConfig(sizes, batch_size=32, seed=seed, shuffle=shuffle, drop_last=drop_last)
    plans = plan_epoch(config, 3, world_size=world_size, num_workers=num_workers)
    n = sum(sizes)
    per_rank = samples_per_rank(n, world_size, drop_last)
    got: list[tuple[int, int, int]] = []
    for worker_plan in _flat(plans):
        for s, a, b in worker_plan.spans:
            if got and got[-1][0] == s and got[-1][2] == a:
                got[-1] = (s, got[-1][1], b)
            else:
                got.append((s, a, b))
    stream = epoch_spans(config, 3)
    want: list[tuple[int, int, int]] = []
    need = world_size * per_rank
    while need:
        for s, a, b in stream:
            take = min(b - a, need)
            if want and want[-1][0] == s and want[-1][2] == a:
                want[-1] = (s, want[-1][1], a + take)
            else:
                want.append((s, a, a + take))
            need -= take
            if not need:
                break
    assert got == want
    for rank_plans in plans:
        assert sum(p.num_samples for p in rank_plans) == per_rank


def _global(spans: Sequence[tuple[int, int, int]], sizes: Sequence[int]) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1]
    parts = [np.arange(offsets[s] + a, offsets[s] + b, dtype=np.int64) for s, a, b in spans]
    return np.concatenate([*parts, np.zeros(0, np.int64)])


@given(shard_sizes(), configs(), st.data())
def test_remaining_spans_are_exactly_what_was_not_yielded(
    sizes: list[int], cfg: dict[str, Any], data: st.DataObject
) -> None:
    """After `consumed` yielded samples, remaining_spans holds exactly the others, in <= window + spans runs."""
    for worker_plan in _flat(_plan_epoch(sizes, cfg))[:16]:
        consumed = data.draw(st.integers(0, worker_plan.num_samples))
        remaining = worker_plan.remaining_spans(consumed)
        together = np.concatenate([worker_plan.indices()[:consumed], _global(remaining, sizes)])
        assert np.array_equal(np.sort(together), np.sort(worker_plan.span_indices()))
        assert len(remaining) <= max(worker_plan.shuffle_window, 1) + len(worker_plan.spans)
        assert all(a < b for _, a, b in remaining)


@given(shard_sizes(), configs(), st.integers(1, 16), st.integers(0, 8), st.data())
def test_elastic_resume_yields_every_sample(
    sizes: list[int], cfg: dict[str, Any], new_world: int, new_workers: int, data: st.DataObject
) -> None:
    """Stop mid-epoch, gather every worker's remaining spans, finish on a new topology: nothing is lost.

    Every sample is yielded at least once before or after the change, and nothing outside the original
    epoch's samples appears; with drop_last=False the finished epoch has every sample.
    """
    cfg = {**cfg, "world_size": min(cfg["world_size"], 16)}
    plans = _flat(_plan_epoch(sizes, cfg))
    consumed = [data.draw(st.integers(0, p.num_samples)) for p in plans]
    before = np.concatenate([p.indices()[:c] for p, c in zip(plans, consumed, strict=True)] + [np.zeros(0, np.int64)])
    remaining = [span for p, c in zip(plans, consumed, strict=True) for span in p.remaining_spans(c)]
    after = _flat(
        plan_epoch(
            _config(sizes, cfg, drop_last=False),
            cfg["epoch"],
            world_size=new_world,
            num_workers=new_workers,
            resume=remaining,
        )
    )
    yielded = np.concatenate([before, *(p.indices() for p in after)])
    original = np.concatenate([p.span_indices() for p in plans] + [np.zeros(0, np.int64)])
    assert set(yielded.tolist()) == set(original.tolist())
    if not cfg["drop_last"]:
        assert set(yielded.tolist()) == set(range(sum(sizes)))
