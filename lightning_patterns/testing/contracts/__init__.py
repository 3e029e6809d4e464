"""Contract test suites: the tests every cache, sharding rule and remote backend must pass.

Each is a pytest base class, as in fsspec's abstract test suite: subclass it in a test module, with a name that
starts with ``Test``, and every implementation in the matching registry runs every test (so registering a new
cache, rule or transport makes it run the whole contract)::

    from lightning_patterns.testing.contracts import EpochCacheContract, RemoteSourceContract, ShardingRuleContract

    class TestEveryCache(EpochCacheContract):
        pass

- :class:`EpochCacheContract` (:mod:`.caches`): every cache of ``CACHES``.
- :class:`ShardingRuleContract` (:mod:`.sharding`): every rule of ``SHARDERS``.
- :class:`RemoteSourceContract` (:mod:`.remote`): local files, ``memory://``, HTTP and S3 (moto), and a check that
  every transport of ``TRANSPORTS`` is served by one of them.

Needs pytest (and, for the S3 site, ``moto[server]`` and ``s3fs``): ``pip install lightning-patterns[test]``.
"""

from __future__ import annotations

from lightning_patterns.testing.contracts.caches import CountingSource, EpochCacheContract, write_small_dataset
from lightning_patterns.testing.contracts.remote import SITES, RemoteSourceContract, Site, SiteKind
from lightning_patterns.testing.contracts.sharding import ShardingRuleContract

__all__ = [
    "CountingSource",
    "EpochCacheContract",
    "RemoteSourceContract",
    "SITES",
    "ShardingRuleContract",
    "Site",
    "SiteKind",
    "write_small_dataset",
]
