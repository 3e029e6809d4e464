"""Property tests of class-balanced batches (`lightning_patterns.data.batching.balanced`).

Invariants, over label sequences that are uniform, exactly balanced and shuffled, skewed, shuffled only
within small windows, or sorted by class (the adversarial case), with 1–12 classes, k = 1–3, batch sizes
from k·C up and look-aheads from 0 to past the end:

1. every sample is used exactly once, and the number and sizes of batches are the ones asked for;
2. the reported tail is exactly the set of batches with fewer than k samples of some class, so every
   other batch holds k of each class;
3. the tail bound of the module documentation (proved there): with ``W_j = min(n, end_j + lookahead)``,
   ``j0`` the first batch whose window reaches the end and ``Q(t)`` the batches from ``t`` on with at
   least k·C samples, a batch of at least k·C samples is never a tail batch when
   - ``j < j0`` and ``count_c[t·batch_size, W_j) >= k·(j - t + 1)`` for every class c and every t <= j, or
   - ``j >= j0`` and ``count_c[t·batch_size, n) >= k·Q(t)`` for every class c and every t <= j0;
   in particular, with a look-ahead that reaches the end, passing ``check_class_counts`` means no tail;
4. under DDP (one sequence split into equal contiguous parts, padded like the sharding assignment),
   every rank gets the same number of batches and 1–3 hold on each rank;
5. locality: batch j uses only positions below ``end_j + lookahead``;
6. the streaming form gives the same batches as the whole-array form, however the labels are chunked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from hypothesis import event, given
from hypothesis import strategies as st

from lightning_patterns.data.batching import BatchPlan, ClassBalancer, check_class_counts
from lightning_patterns.data.sharding.assignment import samples_per_rank

Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Case:
    labels: Labels
    batch_size: int
    min_per_class: int
    num_classes: int
    lookahead: int

    def balancer(self) -> ClassBalancer:
        return ClassBalancer(self.batch_size, self.min_per_class, self.num_classes, lookahead=self.lookahead)


def make_labels(kind: str, n: int, num_classes: int, rng: np.random.Generator) -> Labels:
    if kind == "uniform":
        return rng.integers(0, num_classes, n)
    if kind == "balanced":
        return rng.permutation(np.arange(n) % num_classes)
    if kind == "skewed":  # every class keeps at least a third of its fair share
        weights = 1 / (3 * num_classes) + (2 / 3) * rng.dirichlet(np.ones(num_classes))
        return rng.choice(num_classes, size=n, p=weights / weights.sum())
    ordered = np.sort(rng.integers(0, num_classes, n))
    if kind == "windows":  # class-sorted shards shuffled within windows, like a small shuffle_window
        window = int(rng.integers(1, 200))
        return np.concatenate([rng.permutation(ordered[i : i + window]) for i in range(0, n, window)] or [ordered])
    return ordered  # "sorted"


@st.composite
def cases(draw: st.DrawFn, max_n: int = 5000) -> Case:
    num_classes = draw(st.integers(1, 12))
    k = draw(st.integers(1, 3))
    batch_size = k * num_classes + draw(st.integers(0, 3 * k * num_classes))
    n = draw(st.integers(0, max_n))
    kind = draw(st.sampled_from(["uniform", "balanced", "skewed", "windows", "sorted"]))
    lookahead = draw(st.sampled_from([0, 1, batch_size, 4 * batch_size]) | st.integers(0, max_n + batch_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return Case(make_labels(kind, n, num_classes, rng).astype(np.int64), batch_size, k, num_classes, lookahead)


def prefix_counts(labels: Labels, num_classes: int) -> npt.NDArray[np.int64]:
    """``P[x, c]``: samples of class c at positions below x."""
    counts = np.zeros((labels.size + 1, num_classes), dtype=np.int64)
    counts[1:] = np.cumsum(np.eye(num_classes, dtype=np.int64)[labels], axis=0)
    return counts


def provably_balanced(case: Case, sizes: list[int]) -> npt.NDArray[np.bool_]:
    """The batches that the tail bound (module doc, property 3) proves hold k of every class."""
    labels, b, k = case.labels, case.batch_size, case.min_per_class
    n, num_batches = labels.size, len(sizes)
    if num_batches == 0:
        return np.zeros(0, dtype=bool)
    counts = prefix_counts(labels, case.num_classes)
    ends = np.cumsum(sizes)
    windows = np.minimum(n, ends + case.lookahead)
    quota = np.array(sizes) >= k * case.num_classes
    remaining_quota = np.cumsum(quota[::-1])[::-1]  # Q(t)
    j0 = int(np.argmax(ends + case.lookahead >= n))
    t = np.arange(num_batches)
    starts = counts[t * b]  # P(t·b), shape (batches, classes)
    # Early batches: P(W_j) - k(j+1) >= max_{t<=j} (P(t·b) - k·t) for every class.
    used_at_most = np.maximum.accumulate(starts - k * t[:, None], axis=0)
    early = (counts[windows] - k * (t[:, None] + 1) >= used_at_most).all(axis=1) & (t < j0)
    # End batches: count_c[t·b, n) >= k·Q(t) for every class and every t <= j0.
    end_ok = bool((counts[n] - starts[: j0 + 1] >= k * remaining_quota[: j0 + 1, None]).all())
    proved: npt.NDArray[np.bool_] = quota & (early | ((t >= j0) & end_ok))
    return proved


def expected_sizes(n: int, batch_size: int) -> list[int]:
    """ceil(n / batch_size) batches of batch_size, the last one holding what is left."""
    num_batches = math.ceil(n / batch_size)
    return [batch_size] * (num_batches - 1) + [n - (num_batches - 1) * batch_size] if num_batches else []


def check_plan(case: Case, plan: BatchPlan, sizes: list[int]) -> None:
    labels, n = case.labels, case.labels.size
    # (1) exactly once, sizes as asked, each batch sorted.
    assert [batch.size for batch in plan.batches] == sizes
    assert np.array_equal(np.sort(plan.order()), np.arange(n))
    assert all(np.all(np.diff(batch) > 0) for batch in plan.batches)
    # (2) the tail is exactly the batches short of some class.
    short = [
        j
        for j, batch in enumerate(plan.batches)
        if np.bincount(labels[batch], minlength=case.num_classes).min() < case.min_per_class
    ]
    assert list(plan.tail) == short
    # (3) the proved bound.
    proved = provably_balanced(case, sizes)
    assert not proved[list(plan.tail)].any(), (plan.tail, np.flatnonzero(proved))
    event("tail batches" if plan.tail else "no tail")
    event("every batch proved balanced" if proved.all() else "some batch not covered by the bound")
    # (5) locality.
    ends = np.cumsum(sizes)
    for batch, end in zip(plan.batches, ends, strict=True):
        assert batch.max() < end + case.lookahead


@given(cases())
def test_plan_invariants(case: Case) -> None:
    plan = case.balancer().plan_batches(case.labels)
    check_plan(case, plan, expected_sizes(case.labels.size, case.batch_size))


@given(cases())
def test_look_ahead_to_the_end_leaves_no_tail_when_counts_suffice(case: Case) -> None:
    # With lookahead >= n - batch_size the bound reduces to check_class_counts over the quota batches.
    n = case.labels.size
    case = Case(case.labels, case.batch_size, case.min_per_class, case.num_classes, max(0, n - case.batch_size))
    plan = case.balancer().plan_batches(case.labels)
    quota_batches = sum(batch.size >= case.min_per_class * case.num_classes for batch in plan.batches)
    counts = np.bincount(case.labels, minlength=case.num_classes)
    enough = bool((counts >= case.min_per_class * quota_batches).all())
    event(f"counts suffice: {enough}")
    if enough:
        check_class_counts(counts, num_batches=quota_batches, min_per_class=case.min_per_class)
        assert all(plan.batches[j].size < case.min_per_class * case.num_classes for j in plan.tail)


@given(cases(max_n=4000), st.integers(1, 4), st.booleans())
def test_every_rank_gets_the_same_batches_and_the_invariants(case: Case, world_size: int, drop_last: bool) -> None:
    labels = case.labels
    per_rank = samples_per_rank(labels.size, world_size, drop_last)
    padded = np.resize(labels, per_rank * world_size) if labels.size else labels  # pads by repeating the start
    counts = []
    for rank in range(world_size):
        part = Case(
            padded[rank * per_rank : (rank + 1) * per_rank],
            case.batch_size,
            case.min_per_class,
            case.num_classes,
            case.lookahead,
        )
        plan = part.balancer().plan_batches(part.labels)
        check_plan(part, plan, expected_sizes(per_rank, case.batch_size))
        counts.append(len(plan.batches))
    assert len(set(counts)) == 1


@given(cases(max_n=2000), st.data())
def test_streaming_form_matches_whatever_the_chunks(case: Case, data: st.DataObject) -> None:
    n = case.labels.size
    balancer = case.balancer()
    plan = balancer.plan_batches(case.labels)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=30).map(sorted))
    chunks = np.split(case.labels, cuts)
    last = n - (len(plan.batches) - 1) * case.batch_size if plan.batches else None
    streamed = list(balancer.iter_batches(chunks, num_batches=len(plan.batches), last_batch_size=last))
    assert len(streamed) == len(plan.batches)
    assert all(np.array_equal(a, b) for a, b in zip(plan.batches, streamed, strict=True))
