"""Sharding: which shard a sample is written to, and which samples each rank and worker reads.

The read plan (:mod:`.assignment`, :mod:`.topology`): :func:`plan` gives one DataLoader worker's samples from
a :class:`PlanConfig`, a :class:`Topology` and the epoch; :func:`plan_epoch` gives every worker's;
:func:`check_class_coverage` checks up front that a class-balanced plan gives every worker every class
(:mod:`.class_stream`).

Sharding rules, by registry name:

- ``"size"`` (:class:`SizeSharder`): sequential shards of a target byte size.
- ``"hash"`` (:class:`HashSharder`): a stable hash of a key field (or the sample index) picks a bucket.

Third parties register more through the ``lightning_patterns.sharders`` entry-point group, or with
``SHARDERS.register(name, cls)``.
"""

from __future__ import annotations

from lightning_patterns._registry import Registry
from lightning_patterns.data.sharding.assignment import (
    PlanConfig,
    WorkerPlan,
    check_class_coverage,
    plan,
    plan_epoch,
    samples_per_rank,
)
from lightning_patterns.data.sharding.base import DEFAULT_SHARD_BYTES, Sharder
from lightning_patterns.data.sharding.hashed import HashSharder, bucket_of, stable_hash
from lightning_patterns.data.sharding.sized import SizeSharder
from lightning_patterns.data.sharding.topology import Topology

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "HashSharder",
    "PlanConfig",
    "SHARDERS",
    "Sharder",
    "SizeSharder",
    "Topology",
    "WorkerPlan",
    "bucket_of",
    "check_class_coverage",
    "plan",
    "plan_epoch",
    "samples_per_rank",
    "stable_hash",
]

SHARDERS: Registry[type[Sharder]] = Registry("sharder", entry_point_group="lightning_patterns.sharders")
for _cls in (SizeSharder, HashSharder):
    SHARDERS.register(_cls.name, _cls)
del _cls
