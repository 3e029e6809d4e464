"""Reusable test helpers shipped with the package: balance checks, Hypothesis strategies, contract suites, servers.

- :func:`check_balance` / :func:`assert_balanced` (:mod:`.balance`): does a dataset give every rank of a
  :class:`JobTopology` the same batches, every sample once, every class? From the manifest alone.
- :mod:`.strategies`: Hypothesis strategies of shard sizes, manifests, topologies, resume points and samples
  (needs the ``test`` extra).
- :mod:`.contracts`: the test suites every cache, sharding rule and remote backend passes (needs pytest).
- :mod:`.pytest_plugin`: the ``lp_balance`` marker and the ``lp_dataset`` / ``lp_topologies`` fixtures.
- :func:`moto_s3_server`, :mod:`.http_server`: real servers on 127.0.0.1 for tests.

Names are imported when first used, so importing this package loads neither torch nor Hypothesis.

Example:
    >>> from hypothesis import given
    >>> from lightning_patterns.testing import assert_balanced, strategies as lps
"""

from __future__ import annotations

from lightning_patterns._lazy import lazy_exports

__all__ = [
    "BalanceReport",
    "JobTopology",
    "MotoS3Server",
    "ResumePoint",
    "assert_balanced",
    "check_balance",
    "moto_s3_server",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "BalanceReport": "lightning_patterns.testing.balance_report:BalanceReport",
        "JobTopology": "lightning_patterns.testing.topology:JobTopology",
        "MotoS3Server": "lightning_patterns.testing.s3_server:MotoS3Server",
        "ResumePoint": "lightning_patterns.testing.topology:ResumePoint",
        "assert_balanced": "lightning_patterns.testing.balance:assert_balanced",
        "check_balance": "lightning_patterns.testing.balance:check_balance",
        "moto_s3_server": "lightning_patterns.testing.s3_server:moto_s3_server",
    },
)
