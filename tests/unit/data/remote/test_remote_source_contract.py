"""Every backend we claim (local files, memory://, HTTP, S3 on moto) runs the whole remote-source contract, and every
registered transport must be served by one of them."""

from __future__ import annotations

from lightning_patterns.testing.contracts import RemoteSourceContract


class TestEveryRemoteSource(RemoteSourceContract):
    """The contract of `lightning_patterns.testing.contracts.remote`, once per site."""
