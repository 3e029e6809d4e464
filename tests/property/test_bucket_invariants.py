"""Invariants of the bucket plan over random models, server counts and bucket sizes (Hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lightning_patterns.strategies.parameter_server.buckets import plan_buckets
from lightning_patterns.strategies.parameter_server.partition import partition_parameters

models = st.lists(st.integers(1, 5000), min_size=1, max_size=12)
itemsize = st.sampled_from([2, 4, 8])


@given(
    models,
    itemsize,
    st.integers(1, 5),
    st.integers(1, 40_000),
    st.integers(1, 40_000),
    st.none() | st.integers(8, 9000),
)
def test_buckets_cover_each_server_once_in_order_and_respect_their_size(
    numels: list[int], size: int, servers: int, bucket_bytes: int, first_bytes: int, chunk_bytes: int | None
) -> None:
    itemsizes = [size] * len(numels)
    chunks = partition_parameters(numels, itemsizes, servers, chunk_bytes)
    by_server = [[c for c in chunks if c.server == s] for s in range(servers)]
    plan = plan_buckets(by_server, itemsizes, bucket_bytes, first_bytes)
    assert len(plan) == servers
    for server, (buckets, mine) in enumerate(zip(plan, by_server, strict=True)):
        # Every chunk in exactly one bucket, the buckets in offset order, contiguous, covering the server's buffer.
        assert [p for b in buckets for p in b.chunks] == list(range(len(mine)))
        offset = 0
        for index, bucket in enumerate(buckets):
            assert (bucket.server, bucket.index, bucket.offset) == (server, index, offset)
            assert bucket.numel == sum(mine[p].numel for p in bucket.chunks)
            assert list(bucket.tensors) == list(dict.fromkeys(mine[p].tensor for p in bucket.chunks))
            offset += bucket.numel
            # A bucket of several chunks holds at most its cap; backward fills the last bucket first.
            cap = first_bytes if index == len(buckets) - 1 else bucket_bytes
            if len(bucket.chunks) > 1:
                assert bucket.numel * size <= cap
        assert offset == sum(c.numel for c in mine)


@given(models, st.integers(1, 4), st.integers(1, 10_000))
def test_the_plan_depends_on_its_arguments_only(numels: list[int], servers: int, bucket_bytes: int) -> None:
    """Every worker and server computes the same plan without talking."""
    itemsizes = [4] * len(numels)
    chunks = partition_parameters(numels, itemsizes, servers)
    by_server = [[c for c in chunks if c.server == s] for s in range(servers)]
    assert plan_buckets(by_server, itemsizes, bucket_bytes, bucket_bytes) == plan_buckets(
        [list(c) for c in by_server], list(itemsizes), bucket_bytes, bucket_bytes
    )
