"""The contract every sharding rule keeps, as a pytest base class parametrised over the ``SHARDERS`` registry.

Subclass :class:`ShardingRuleContract` in a test module (the subclass's name must start with ``Test``) and
every rule registered in :data:`~lightning_patterns.data.sharding.SHARDERS` (including other packages' rules,
through the ``lightning_patterns.sharders`` entry-point group) runs every test here, once per way of building
it::

    from lightning_patterns.testing.contracts import ShardingRuleContract

    class TestEveryShardingRule(ShardingRuleContract):
        pass

A rule is built with ``from_arguments``, with each of the writer's argument sets it accepts: none, then
``num_shards=3``, then ``num_shards=3, hash_key="key"`` (so ``"hash"`` runs keyed and by sample index).
Override :meth:`ShardingRuleContract.rule_arguments` for a rule that takes others. Datasets are written to
``memory://``, so the whole contract takes a fraction of a second per rule.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pytest

from lightning_patterns.data.sharding import SHARDERS, Sharder
from lightning_patterns.data.shards import Manifest, read_shard, write_dataset

__all__ = ["ShardingRuleContract"]

_NUM_SAMPLES = 300
_SHARD_BYTES = 2048
# The writer closes a shard when the next sample would not fit; that sample adds its bytes plus at most one
# alignment pad per column (columns start at 64-byte boundaries).
_COLUMN_ALIGNMENT = 64
_CANDIDATE_ARGUMENTS: tuple[dict[str, Any], ...] = ({}, {"num_shards": 3}, {"num_shards": 3, "hash_key": "key"})

RuleCase = tuple[str, dict[str, Any]]
"""A registry name and the writer arguments (``num_shards``, ``hash_key``) it is built with."""


def _samples(first: int, count: int) -> list[dict[str, Any]]:
    """Samples ``first .. first + count - 1``; sample ``i`` is the same whichever call makes it."""
    images = np.random.default_rng(0).integers(0, 256, size=(first + count, 8, 8), dtype=np.uint8)
    return [{"image": images[i], "id": np.int64(i), "key": np.int64(i % 13)} for i in range(first, first + count)]


def _sample_growth(samples: list[dict[str, Any]]) -> int:
    """The most one more sample can add to a shard of these samples (all fixed-size fields)."""
    return sum(np.asarray(value).nbytes + _COLUMN_ALIGNMENT for value in samples[0].values())


def _case_id(case: RuleCase) -> str:
    name, arguments = case
    return "-".join([name, *(f"{key}={value}" for key, value in arguments.items())])


class ShardingRuleContract:
    """Tests every registered :class:`~lightning_patterns.data.sharding.Sharder` must pass (see the module)."""

    def rule_names(self) -> list[str]:
        """The rules to test: every registered one."""
        return SHARDERS.names()

    def rule_arguments(self, name: str) -> list[dict[str, Any]]:
        """The writer arguments rule ``name`` is tested with: each candidate its ``from_arguments`` accepts."""
        cls = SHARDERS.get(name)
        accepted = []
        for arguments in _CANDIDATE_ARGUMENTS:
            try:
                cls.from_arguments(shard_bytes=_SHARD_BYTES, **{"num_shards": None, "hash_key": None, **arguments})
            except ValueError:
                continue
            accepted.append(arguments)
        return accepted

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run each test once per rule and argument set (read when tests are collected)."""
        if "rule_case" in metafunc.fixturenames:
            cases: list[RuleCase] = []
            for name in self.rule_names():
                # A rule no candidate builds still runs, and fails saying what to override.
                cases += [(name, arguments) for arguments in self.rule_arguments(name) or [{"unbuildable": True}]]
            metafunc.parametrize("rule_case", cases, ids=[_case_id(case) for case in cases])

    @pytest.fixture
    def sharder(self, rule_case: RuleCase) -> Sharder:
        """The rule under test, built as the writer builds it."""
        name, arguments = rule_case
        if arguments.get("unbuildable"):
            pytest.fail(
                f"No argument set of {list(_CANDIDATE_ARGUMENTS)} builds the sharding rule {name!r}: override "
                "rule_arguments() in the contract's subclass to give the ones it takes."
            )
        cls = SHARDERS.get(name)
        return cls.from_arguments(shard_bytes=_SHARD_BYTES, **{"num_shards": None, "hash_key": None, **arguments})

    @pytest.fixture
    def url(self) -> Iterator[str]:
        """A fresh ``memory://`` dataset root, removed afterwards."""
        root = f"/sharding-contract-{uuid.uuid4().hex}"
        yield f"memory://{root}"
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def _write(self, rule_case: RuleCase, url: str, samples: list[dict[str, Any]], **kwargs: Any) -> Manifest:
        name, arguments = rule_case
        return write_dataset(
            samples, url, sharding=name, shard_bytes=_SHARD_BYTES, progress=False, **arguments, **kwargs
        )

    def _check_every_sample_once(self, sharder: Sharder, url: str, manifest: Manifest, total: int) -> None:
        ids: list[int] = []
        samples = _samples(0, total)
        for shard in manifest.shards:
            found = read_shard(url, shard, schema=manifest.schema).read_field("id", np.arange(shard.num_samples))
            ids += found.tolist()
            buckets = {sharder.bucket(samples[i], i) for i in found.tolist()}
            if shard.bucket is None:
                assert sharder.num_buckets == 1, f"shard {shard.path} records no bucket, but the rule has several"
                assert buckets == {0}
            else:
                assert buckets == {shard.bucket}, f"shard {shard.path} (bucket {shard.bucket}) holds buckets {buckets}"
        assert sorted(ids) == list(range(total)), "every sample must land in exactly one shard"

    # ------------------------------------------------------------------ the contract

    def test_declares_its_registry_name(self, rule_case: RuleCase, sharder: Sharder) -> None:
        """The registry key is the class's declared ``name``, and the writer builds that class."""
        name, _ = rule_case
        cls = SHARDERS.get(name)
        assert issubclass(cls, Sharder)
        assert cls.name == name
        assert type(sharder) is cls

    def test_json_round_trip(self, rule_case: RuleCase, sharder: Sharder) -> None:
        """The manifest's ``"sharding"`` entry is plain JSON naming the rule, and rebuilds the same rule."""
        recorded = sharder.to_json()
        assert recorded["rule"] == rule_case[0]
        assert json.loads(json.dumps(recorded)) == recorded, "the manifest's entry must be plain JSON"
        again = type(sharder).from_json(recorded)
        assert again.to_json() == recorded
        assert again.num_buckets == sharder.num_buckets
        assert repr(sharder).startswith(f"{type(sharder).__name__}(")

    def test_buckets_are_in_range_and_stable(self, sharder: Sharder) -> None:
        """Buckets are ints in ``range(num_buckets)``, the same on every call, rebuild and pickled copy."""
        copies = [type(sharder).from_json(sharder.to_json()), pickle.loads(pickle.dumps(sharder))]
        for index, sample in enumerate(_samples(0, 100)):
            bucket = sharder.bucket(sample, index)
            assert isinstance(bucket, int)
            assert 0 <= bucket < sharder.num_buckets
            assert sharder.bucket(sample, index) == bucket
            assert [copy.bucket(sample, index) for copy in copies] == [bucket, bucket]

    def test_every_sample_lands_in_exactly_one_shard_of_its_bucket(
        self, rule_case: RuleCase, sharder: Sharder, url: str
    ) -> None:
        """Each sample is written to exactly one shard, whose recorded bucket is the sample's."""
        manifest = self._write(rule_case, url, _samples(0, _NUM_SAMPLES))
        assert manifest.sharding == sharder.to_json()
        assert manifest.num_samples == _NUM_SAMPLES
        self._check_every_sample_once(sharder, url, manifest, _NUM_SAMPLES)

    def test_shards_keep_to_the_target_size(self, rule_case: RuleCase, url: str) -> None:
        """Every shard is within ``shard_bytes``, and all of a bucket's but its last within one sample of it."""
        samples = _samples(0, _NUM_SAMPLES)
        manifest = self._write(rule_case, url, samples)
        assert len(manifest.shards) > 3, "the contract's dataset must make several shards"
        assert all(shard.num_bytes <= _SHARD_BYTES for shard in manifest.shards)
        by_bucket: dict[int | None, list[int]] = {}
        for shard in manifest.shards:
            by_bucket.setdefault(shard.bucket, []).append(shard.num_bytes)
        growth = _sample_growth(samples)
        for bucket, sizes in by_bucket.items():
            assert all(size > _SHARD_BYTES - growth for size in sizes[:-1]), f"bucket {bucket}: {sizes}"

    def test_appending_keeps_the_rule_and_every_sample(self, rule_case: RuleCase, sharder: Sharder, url: str) -> None:
        """An append reuses the recorded rule, keeps the existing shards and places the new samples by it."""
        first = self._write(rule_case, url, _samples(0, 200))
        appended = write_dataset(_samples(200, 100), url, mode="append", progress=False)
        assert appended.sharding == first.sharding == sharder.to_json()
        assert appended.shards[: len(first.shards)] == first.shards, "appending must keep the existing shards"
        self._check_every_sample_once(sharder, url, appended, 300)

    def test_an_invalid_shard_bytes_is_explained(self, rule_case: RuleCase) -> None:
        """A non-positive ``shard_bytes`` is refused with a message naming it."""
        name, arguments = rule_case
        with pytest.raises(ValueError, match=r"shard_bytes=0"):
            SHARDERS.get(name).from_arguments(shard_bytes=0, **{"num_shards": None, "hash_key": None, **arguments})
