"""What the "size" and "hash" rules do beyond the sharding-rule contract (test_sharding_rule_contract.py): their
parameters, the stable hash, equal keys in one bucket, sequential size shards, and the registry's errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from lightning_patterns.data.sharding import (
    DEFAULT_SHARD_BYTES,
    SHARDERS,
    HashSharder,
    SizeSharder,
    bucket_of,
    stable_hash,
)
from lightning_patterns.data.shards import read_shard, write_dataset

# Computed once; if the canonical encoding or the hash changes, every dataset's buckets move.
STABLE = {
    "user-42": 12029086546990375023,
    b"user-42": 12029086546990375023,
    "": 13020603013274838756,
    0: 8493733112532773764,
    42: 8820412187630416983,
    -7: 1742748123310498148,
    True: 8518482412311870710,
    0.5: 237726477914003235,
}


def test_registry_holds_both_rules_and_lists_names_on_failure() -> None:
    assert SHARDERS.get("size") is SizeSharder
    assert SHARDERS.get("hash") is HashSharder
    assert {"size", "hash"} <= set(SHARDERS.names())
    with pytest.raises(KeyError, match=r"Unknown sharder 'nope'\. Expected one of: .*hash.*size"):
        SHARDERS.get("nope")


@pytest.mark.parametrize(("key", "expected"), list(STABLE.items()))
def test_stable_hash_values_are_fixed(key: Any, expected: int) -> None:
    assert stable_hash(key) == expected


@pytest.mark.slow  # imports torch in a fresh interpreter
def test_stable_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from lightning_patterns.data.sharding import stable_hash; print(stable_hash('user-42'), stable_hash(42))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345"}
    ).stdout.split()
    assert [int(x) for x in out] == [STABLE["user-42"], STABLE[42]]


def test_canonical_encoding_of_equal_keys() -> None:
    assert stable_hash(7) == stable_hash("7") == stable_hash(np.int8(7)) == stable_hash(torch.tensor(7))
    assert stable_hash(np.array(7, dtype=np.uint16)) == stable_hash(7)
    assert stable_hash(True) == stable_hash(1) == stable_hash(np.bool_(True)) == stable_hash(torch.tensor(True))
    assert stable_hash(0.5) == stable_hash(np.float32(0.5)) == stable_hash(torch.tensor(0.5, dtype=torch.float64))
    assert stable_hash(bytearray(b"ab")) == stable_hash(memoryview(b"ab")) == stable_hash("ab")
    assert stable_hash(np.float32(0.1)) == stable_hash(0.10000000149011612)


@pytest.mark.parametrize("key", [None, [1], (1,), torch.zeros(2), np.zeros(2), complex(1, 2), torch.tensor(1j)])
def test_unhashable_keys_are_refused(key: Any) -> None:
    with pytest.raises(TypeError, match="Cannot hash a key of type"):
        stable_hash(key)


@pytest.mark.parametrize("num_shards", [0, -1, 1.5, True, None])
def test_bucket_of_rejects_bad_num_shards(num_shards: Any) -> None:
    with pytest.raises(ValueError, match="`num_shards` must be a positive int"):
        bucket_of("k", num_shards)


def test_bucket_of_is_modulo_of_the_hash() -> None:
    for key in ["a", b"b", 3, 2.5]:
        for s in (1, 2, 7, 1000):
            assert bucket_of(key, s) == stable_hash(key) % s
            assert 0 <= bucket_of(key, s) < s


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: SizeSharder(0), ValueError, r"`shard_bytes` must be a positive int .* shard_bytes=0"),
        (lambda: SizeSharder(-5), ValueError, r"shard_bytes=-5"),
        (lambda: HashSharder(0), ValueError, r"needs `num_shards` >= 1 buckets; got num_shards=0"),
        (lambda: HashSharder(4, key=""), ValueError, r"`hash_key` must be a field name"),
        (
            lambda: HashSharder.from_arguments(shard_bytes=None, num_shards=None, hash_key=None),
            ValueError,
            "needs `num_shards`",
        ),
        (
            lambda: SizeSharder.from_arguments(shard_bytes=None, num_shards=3, hash_key=None),
            ValueError,
            r"`num_shards=3` only applies to sharding='hash'",
        ),
        (
            lambda: SizeSharder.from_arguments(shard_bytes=None, num_shards=None, hash_key="id"),
            ValueError,
            r"`hash_key='id'` only applies",
        ),
    ],
)
def test_invalid_arguments(build: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_to_json_and_back() -> None:
    size = SizeSharder(1000)
    assert size.to_json() == {"rule": "size", "shard_bytes": 1000}
    assert SizeSharder.from_json(size.to_json()).shard_bytes == 1000
    hashed = HashSharder(8, key="id", shard_bytes=500)
    assert hashed.to_json() == {"rule": "hash", "num_shards": 8, "key": "id", "hash": "blake2b-64"}
    again = HashSharder.from_json(hashed.to_json())
    assert (again.num_shards, again.key, again.shard_bytes) == (8, "id", DEFAULT_SHARD_BYTES)
    assert repr(hashed) == "HashSharder(num_shards=8, key='id', hash='blake2b-64')"


def test_size_rule_writes_samples_in_order_into_unbucketed_shards(
    memory_url: str, mnist_like: Callable[..., list[dict[str, Any]]]
) -> None:
    """Shard sizes within the target are the contract's; the order and the manifest entry are this rule's."""
    target = 20_000
    manifest = write_dataset(mnist_like(300), memory_url, shard_bytes=target, progress=False)
    assert len(manifest.shards) > 5
    assert manifest.sharding == {"rule": "size", "shard_bytes": target}
    assert all(s.bucket is None for s in manifest.shards)
    # sequential: the shards hold the samples in order
    first = read_shard(memory_url, manifest.shards[0])
    second = read_shard(memory_url, manifest.shards[1])
    assert int(second.read(0)["label"]) == first.num_samples % 10


def test_hash_rule_puts_equal_keys_in_the_same_bucket(memory_url: str) -> None:
    samples = [{"user": f"u{i % 13}", "x": np.float32(i)} for i in range(200)]
    manifest = write_dataset(samples, memory_url, sharding="hash", num_shards=4, hash_key="user", progress=False)
    assert manifest.sharding == {"rule": "hash", "num_shards": 4, "key": "user", "hash": "blake2b-64"}
    seen = 0
    for shard in manifest.shards:
        assert shard.bucket is not None
        users = read_shard(memory_url, shard).read_range(0, shard.num_samples)["x"]
        for x in users.tolist():
            assert bucket_of(f"u{int(x) % 13}", 4) == shard.bucket
        seen += shard.num_samples
    assert seen == 200


def test_hash_rule_without_key_hashes_the_sample_index_and_splits_big_buckets(memory_url: str) -> None:
    samples = [{"i": np.int64(i)} for i in range(400)]
    manifest = write_dataset(samples, memory_url, sharding="hash", num_shards=3, shard_bytes=1024, progress=False)
    assert manifest.sharding["key"] is None
    buckets = [s.bucket for s in manifest.shards]
    assert set(buckets) == {0, 1, 2}
    assert len(buckets) > 3  # a bucket over shard_bytes spans several files
    for shard in manifest.shards:
        for i in read_shard(memory_url, shard).read_range(0, shard.num_samples)["i"].tolist():
            assert bucket_of(i, 3) == shard.bucket


def test_hash_key_must_be_a_field(memory_url: str) -> None:
    with pytest.raises(ValueError, match=r"hash_key='id' is not a field of the samples \(fields: \['x'\]\)"):
        write_dataset([{"x": 1}], memory_url, sharding="hash", num_shards=2, hash_key="id", progress=False)
