"""Every registered sharding rule (size, hash with and without a key, and any a plugin registers) runs the contract."""

from __future__ import annotations

from lightning_patterns.testing.contracts import ShardingRuleContract


class TestEveryShardingRule(ShardingRuleContract):
    """The contract of `lightning_patterns.testing.contracts.sharding`, once per rule of `SHARDERS`."""
