"""Unit tests of the retry policy and the error classification, refused connections included."""

from __future__ import annotations

import asyncio
import errno
import random
import socket

import aiohttp
import pytest

from lightning_patterns.data.remote import RemoteReader, RetryPolicy, is_transient_error
from lightning_patterns.data.remote.retry import REFUSED_ATTEMPTS, describe_error, redact_url, refused_address
from lightning_patterns.data.shards import load_manifest
from lightning_patterns.exceptions import ChecksumMismatchError, RemoteUnreachableError, ShardNotFoundError

# ---------------------------------------------------------------- RetryPolicy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 0}, r"max_attempts=0\) must be an integer >= 1"),
        ({"max_attempts": 2.5}, r"max_attempts=2.5\)"),
        ({"max_attempts": True}, r"max_attempts=True\)"),
        ({"initial_backoff": -1.0}, r"initial_backoff=-1.0\) must be >= 0"),
        ({"initial_backoff": float("nan")}, r"initial_backoff=nan\)"),
        ({"initial_backoff": 3.0, "max_backoff": 2.0}, r"max_backoff=2.0\) must be >= initial_backoff=3.0"),
        ({"jitter": 1.5}, r"jitter=1.5\) must be in \[0, 1\]"),
        ({"jitter": -0.1}, r"jitter=-0.1\)"),
        ({"timeout": 0.0}, r"timeout=0.0\) must be > 0 seconds, or None"),
    ],
)
def test_retry_policy_rejects_invalid_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_policy_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, jitter=0.5)
    exact = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, jitter=0.0)
    assert [exact.backoff(k) for k in (1, 2, 3, 4, 5, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    rng = random.Random(0)
    for k in range(1, 8):
        base = exact.backoff(k)
        assert base * 0.5 <= policy.backoff(k, rng) <= base


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(), True),
        (ConnectionRefusedError(), True),  # worth asking again, but only REFUSED_ATTEMPTS times
        (TimeoutError(), True),
        (asyncio.TimeoutError(), True),
        (OSError(errno.EIO, "io"), True),
        (EOFError("short body"), True),
        (aiohttp.ClientPayloadError("truncated"), True),
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ClientResponseError(None, (), status=503), True),  # type: ignore[arg-type]
        (aiohttp.ClientResponseError(None, (), status=429), True),  # type: ignore[arg-type]
        (aiohttp.ClientResponseError(None, (), status=403), False),  # type: ignore[arg-type]
        (aiohttp.ClientResponseError(None, (), status=404), False),  # type: ignore[arg-type]
        (FileNotFoundError(), False),
        (ShardNotFoundError(), False),
        (PermissionError(), False),
        (ChecksumMismatchError(), False),
        (ValueError(), False),
    ],
)
def test_is_transient_error(exc: BaseException, transient: bool) -> None:
    assert is_transient_error(exc) is transient


@pytest.mark.parametrize(
    ("exc", "attempts"),
    [
        (ConnectionResetError(), 6),
        (aiohttp.ServerDisconnectedError(), 6),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), REFUSED_ATTEMPTS),
        (OSError(errno.ECONNREFUSED, "refused"), REFUSED_ATTEMPTS),
        (FileNotFoundError(), 1),
        (ValueError(), 1),
    ],
)
def test_a_refused_connection_gets_few_attempts(exc: BaseException, attempts: int) -> None:
    assert REFUSED_ATTEMPTS == 2
    assert RetryPolicy(max_attempts=6).attempts_for(exc) == attempts
    assert RetryPolicy(max_attempts=1).attempts_for(exc) == 1


def test_refused_address_looks_through_the_exception_chain() -> None:
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
        except ConnectionRefusedError as inner:
            raise RuntimeError("the client's own wrapper") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert refused_address(wrapped, "https://data.example.org/ds/manifest.json") == "data.example.org:443"
    assert refused_address(ConnectionRefusedError(), "http://127.0.0.1:8123/x") == "127.0.0.1:8123"
    assert refused_address(ConnectionResetError(), "http://127.0.0.1:8123/x") is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.remote
def test_a_refused_connection_says_the_server_is_not_reachable_at_host_and_port() -> None:
    port = _closed_port()
    policy = RetryPolicy(max_attempts=12, initial_backoff=0.001, max_backoff=0.01)
    with RemoteReader(f"http://127.0.0.1:{port}/data", retry=policy) as reader:
        with pytest.raises(RemoteUnreachableError) as info:
            reader.fetch("manifest.json")
        stats = reader.stats.snapshot()
    message = str(info.value)
    assert message.startswith(f"The server is not reachable at 127.0.0.1:{port}: the connection was refused")
    assert f"http://127.0.0.1:{port}/data/manifest.json" in message
    assert "Check the host and port in the URL" in message
    assert "max_attempts" not in message, "more attempts do not help a refused connection"
    assert isinstance(info.value, ConnectionRefusedError)
    assert (stats.requests, stats.retries) == (REFUSED_ATTEMPTS, REFUSED_ATTEMPTS - 1)


@pytest.mark.remote
def test_loading_a_manifest_from_a_closed_port_says_the_server_is_not_reachable() -> None:
    port = _closed_port()
    with pytest.raises(RemoteUnreachableError, match=rf"^The server is not reachable at 127\.0\.0\.1:{port}: "):
        load_manifest(f"http://127.0.0.1:{port}/dataset")


def test_describe_and_redact_leave_credentials_out() -> None:
    error = aiohttp.ClientResponseError(None, (), status=503, message="Service Unavailable")  # type: ignore[arg-type]
    assert describe_error(error) == "HTTP 503 Service Unavailable"
    assert describe_error(EOFError("short\nbody")) == "EOFError: short"
    assert redact_url("https://user:pw@host/a?X-Amz-Signature=s") == "https://host/a?<redacted>"
    assert redact_url("/local/path") == "/local/path"
