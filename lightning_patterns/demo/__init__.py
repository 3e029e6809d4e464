"""The embedded default's server: a folder served over HTTP from a process started on 127.0.0.1.

With nothing but the repository, ``make demo`` writes a generated dataset to shards
(:mod:`lightning_patterns.data.embedded`), serves them with :class:`LocalHTTPServer` (so the remote path is
really exercised), streams them into training, and stops the server when ``fit`` ends, fails or is
interrupted.
"""

from __future__ import annotations

from lightning_patterns.demo.server import LocalHTTPServer

__all__ = ["LocalHTTPServer"]
