"""Invariants of the disk cache's eviction policy, on the pure model and on the real cache.

- the cache never holds more than its limit (so never more than the limit plus one shard);
- only the cache's own, unprotected entries are evicted, least recently used first, and no more than needed;
- the most recently used entry survives every eviction that does not need the whole cache;
- nothing is evicted for an entry that is not admitted;
- on the real cache: files that are not its entries are never deleted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_patterns.data.caching.disk import DiskEpochCache
from lightning_patterns.data.caching.layout import store_root
from lightning_patterns.data.caching.lru import CacheEntry, plan_admission
from lightning_patterns.data.shards.manifest import Manifest, ShardInfo, checksum_of
from lightning_patterns.data.shards.schema import FieldSpec, Schema

sizes = st.integers(min_value=1, max_value=100)


@st.composite
def cache_states(draw: st.DrawFn) -> tuple[list[CacheEntry], int, int]:
    count = draw(st.integers(0, 12))
    entries = [
        CacheEntry(f"{i:064x}.lps", draw(sizes), draw(st.integers(0, 1000)), draw(st.booleans())) for i in range(count)
    ]
    limit = draw(st.integers(0, 600))
    incoming = draw(sizes)
    return entries, limit, incoming


@given(cache_states(), st.integers(0, 1000), st.integers(0, 500))
def test_admission_keeps_the_limit_and_evicts_lru_prefix(
    state: tuple[list[CacheEntry], int, int], free: int, min_free: int
) -> None:
    entries, limit, incoming = state
    decision = plan_admission(entries, incoming, cache_limit=limit, free_bytes=free, min_free_bytes=min_free)
    by_name = {entry.name: entry for entry in entries}
    evicted = [by_name[name] for name in decision.evict]
    kept = [entry for entry in entries if entry.name not in decision.evict]
    if not decision.admit:
        assert decision.evict == ()
        return
    # Never over the limit, and enough free space left.
    assert sum(entry.num_bytes for entry in kept) + incoming <= limit
    assert free + sum(entry.num_bytes for entry in evicted) - incoming >= min_free
    # Only unprotected entries, least recently used first, and no more than needed.
    assert all(not entry.protected for entry in evicted)
    unprotected_kept = [entry for entry in kept if not entry.protected]
    for gone in evicted:
        assert all((gone.last_used, gone.name) <= (still.last_used, still.name) for still in unprotected_kept)
    if evicted:
        assert sum(entry.num_bytes for entry in kept) + evicted[-1].num_bytes + incoming > limit
        # The most recently used entry is kept unless every unprotected entry had to go.
        newest = max(entries, key=lambda entry: (entry.last_used, entry.name))
        assert newest in kept or len(evicted) == sum(not entry.protected for entry in entries)


@given(cache_states())
def test_an_entry_is_refused_only_when_it_cannot_fit(state: tuple[list[CacheEntry], int, int]) -> None:
    entries, limit, incoming = state
    decision = plan_admission(entries, incoming, cache_limit=limit)
    protected = sum(entry.num_bytes for entry in entries if entry.protected)
    assert decision.admit == (protected + incoming <= limit)


@given(st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=60), st.integers(0, 400))
def test_a_sequence_of_reads_never_exceeds_the_limit(reads: list[tuple[int, bool]], limit: int) -> None:
    """A model of the cache over many reads: shards of two datasets, each access marks its entry used."""
    shard_sizes = [40, 70, 10, 100, 55, 5, 90, 30]
    cache: dict[int, CacheEntry] = {}
    for clock, (shard, current_dataset) in enumerate(reads):
        if shard in cache:
            cache[shard] = CacheEntry(cache[shard].name, shard_sizes[shard], clock, current_dataset)
            continue
        # Entries of the dataset being read are protected from its own insertions.
        entries = [
            CacheEntry(e.name, e.num_bytes, e.last_used, (k < 4) == (shard < 4)) for k, e in sorted(cache.items())
        ]
        decision = plan_admission(entries, shard_sizes[shard], cache_limit=limit)
        for name in decision.evict:
            del cache[int(name[:2])]
        if decision.admit:
            cache[shard] = CacheEntry(f"{shard:02d}", shard_sizes[shard], clock)
        assert sum(e.num_bytes for e in cache.values()) <= limit


def _manifest(data: list[bytes]) -> Manifest:
    shards = tuple(ShardInfo(f"{i}.lps", 1, len(blob), checksum_of(blob)) for i, blob in enumerate(data))
    return Manifest(Schema({"x": FieldSpec("bytes", None)}), shards, {"rule": "size"})


@settings(max_examples=25)
@given(
    st.lists(st.integers(1, 3000), min_size=1, max_size=8),
    st.lists(st.integers(0, 7), max_size=30),
    st.integers(0, 12000),
)
def test_the_real_disk_cache_respects_the_limit_and_foreign_files(
    shard_sizes: list[int], reads: list[int], limit: int
) -> None:
    data = [bytes([i % 251]) * size for i, size in enumerate(shard_sizes)]
    with tempfile.TemporaryDirectory() as folder:
        root = store_root(folder)
        # Half the shards belong to an "older" dataset read first, so the second one can evict them.
        half = len(data) // 2
        older, newer = _manifest(data[:half] or data[:1]), _manifest(data)
        entries = root / "entries"
        entries.mkdir(parents=True)
        foreign = [entries / "readme.txt", entries / ("a" * 64 + ".lps.orig"), Path(folder) / "other.lps"]
        for path in foreign:
            path.write_text("keep")
        for manifest in (older, newer):
            cache = DiskEpochCache(folder, cache_limit=limit, min_free_bytes=0)
            cache.bind(manifest)
            for read in reads:
                shard = read % len(manifest.shards)
                blob = data[shard]
                assert bytes(cache.get_or_fetch(shard, lambda blob=blob: blob)) == blob
                held = sum(p.stat().st_size for p in entries.iterdir() if p.name.endswith(".lps"))
                assert held <= limit
        assert all(path.read_text() == "keep" for path in foreign)
