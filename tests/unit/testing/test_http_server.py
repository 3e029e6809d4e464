from __future__ import annotations

import http.client
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, RequestRecord, serve_directory

pytestmark = pytest.mark.remote
BODY = bytes(range(256)) * 4  # 1024 bytes


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultInjectingHTTPServer]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(BODY)
    (tmp_path / "secret.bin").write_bytes(b"secret")
    with serve_directory(tmp_path / "sub") as srv:
        yield srv


def request(
    server: FaultInjectingHTTPServer, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("header", "status", "body", "content_range"),
    [
        (None, 200, BODY, None),
        ("bytes=0-9", 206, BODY[:10], "bytes 0-9/1024"),
        ("bytes=1000-", 206, BODY[1000:], "bytes 1000-1023/1024"),
        ("bytes=-24", 206, BODY[-24:], "bytes 1000-1023/1024"),
        ("bytes=1000-5000", 206, BODY[1000:], "bytes 1000-1023/1024"),
        ("bytes=2000-", 416, b"", "bytes */1024"),
        ("bytes=0-1,5-6", 200, BODY, None),
    ],
)
def test_get_with_range(
    server: FaultInjectingHTTPServer, header: str | None, status: int, body: bytes, content_range: str | None
) -> None:
    headers = {} if header is None else {"Range": header}
    got_status, got_headers, got_body = request(server, "/a.bin", **headers)
    assert (got_status, got_body) == (status, body)
    assert got_headers.get("Content-Range") == content_range
    assert int(got_headers["Content-Length"]) == len(body)
    assert server.bytes_sent == len(body)


def test_head_404_and_escaping_paths(server: FaultInjectingHTTPServer) -> None:
    status, headers, body = request(server, "/a.bin", "HEAD")
    assert (status, headers["Content-Length"], headers["Accept-Ranges"], body) == (200, "1024", "bytes", b"")
    assert request(server, "/missing.bin")[0] == 404
    assert request(server, "/../secret.bin")[0] == 403
    assert request(server, "/%2e%2e/secret.bin")[0] == 403
    assert [r.status for r in server.requests] == [200, 404, 403, 403]
    assert server.requests[0] == RequestRecord("HEAD", "/a.bin", None, 200, 0, None)


def test_injected_faults_happen_in_order_then_stop(server: FaultInjectingHTTPServer) -> None:
    server.inject("a.bin", "500", "503", "truncate")
    assert request(server, "/a.bin")[0] == 500
    assert request(server, "/a.bin")[0] == 503
    with pytest.raises(http.client.IncompleteRead):
        request(server, "/a.bin")
    assert request(server, "/a.bin")[2] == BODY
    assert [r.fault for r in server.requests] == ["500", "503", "truncate", None]
    assert server.fault_count == 3
    server.reset_log()
    assert server.request_count == 0


def test_reset_closes_without_a_response(server: FaultInjectingHTTPServer) -> None:
    server.inject("/a.bin", "reset")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        request(server, "/a.bin")
    assert server.requests_for("a.bin")[0].status == 0


def test_stall_delays_the_answer(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(BODY)
    with serve_directory(tmp_path, stall_seconds=0.3) as server:
        server.inject("a.bin", "stall")
        with pytest.raises(TimeoutError):
            urllib.request.urlopen(server.url_for("a.bin"), timeout=0.05)
        with urllib.request.urlopen(server.url_for("a.bin"), timeout=5) as response:
            assert response.read() == BODY


def test_random_faults_are_deterministic_by_seed(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(BODY)

    def fault_sequence(seed: int) -> list[str | None]:
        with serve_directory(tmp_path, failure_rate=0.5, faults=("500", "503"), seed=seed) as server:
            for _ in range(20):
                request(server, "/a.bin")
            return [r.fault for r in server.requests]

    first = fault_sequence(3)
    assert first == fault_sequence(3)
    assert 0 < sum(f is not None for f in first) < 20
    assert first != fault_sequence(4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_rate": 1.5}, "failure_rate=1.5"),
        ({"faults": ("explode",)}, "unknown entries"),
        ({"faults": "500"}, "faults='500'"),
        ({"failure_rate": 0.1, "faults": ()}, "needs at least one fault"),
        ({"stall_seconds": -1}, "stall_seconds=-1"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FaultInjectingHTTPServer(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be an existing directory"):
        FaultInjectingHTTPServer(tmp_path / "nope")
