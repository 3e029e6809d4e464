"""Reusable test helpers shipped with the package: local servers, contract tests, Hypothesis strategies."""

from __future__ import annotations

from lightning_patterns.testing.s3_server import MotoS3Server, moto_s3_server

__all__ = ["MotoS3Server", "moto_s3_server"]
