"""Fixtures of the attack tests: a hostile HTTP server on 127.0.0.1, stopped with the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from attack_helpers import HostileServer


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    """A :class:`HostileServer` on 127.0.0.1, stopped (every answer with it) when the test ends."""
    server = HostileServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
