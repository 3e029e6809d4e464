"""The fault-injecting reverse proxy forwards exactly, fails on demand, and draws its faults deterministically."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_patterns.testing.fault_proxy import PROXY_FAULTS, FaultInjectingProxy, fault_proxy
from lightning_patterns.testing.http_server import FaultInjectingHTTPServer, serve_directory

BODY = os.urandom(300_000)


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers with what it received: method, target, a few headers and the body's digest."""

    protocol_version = "HTTP/1.1"
    calls: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _echo(self) -> None:
        self.server.calls.append(self.command)  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = json.dumps(
            {
                "method": self.command,
                "target": self.path,
                "host": self.headers.get("Host"),
                "custom": self.headers.get("X-Custom"),
                "authorization": self.headers.get("Authorization"),
                "transfer_encoding": self.headers.get("Transfer-Encoding"),
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()
        self.send_response(201 if self.command == "PUT" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", '"echo"')
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _echo


@pytest.fixture
def echo() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    server.calls = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FaultInjectingHTTPServer]:
    (tmp_path / "data.bin").write_bytes(BODY)
    with serve_directory(tmp_path) as server:
        yield server


def _request(
    proxy: FaultInjectingProxy,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(
            method, target, body=iter([body]) if chunked else body, headers=headers or {}, encode_chunked=chunked
        )
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- forwarding


def test_get_range_and_head_are_forwarded_exactly(files: FaultInjectingHTTPServer) -> None:
    with fault_proxy(files.url) as proxy:
        full, body = _request(proxy, "GET", "/data.bin")
        assert (full.status, body) == (200, BODY)
        partial, part = _request(proxy, "GET", "/data.bin", headers={"Range": "bytes=1000-1999"})
        assert partial.status == 206
        assert partial.getheader("Content-Range") == f"bytes 1000-1999/{len(BODY)}"
        assert part == BODY[1000:2000]
        head, nothing = _request(proxy, "HEAD", "/data.bin")
        assert (head.status, nothing, head.getheader("Content-Length")) == (200, b"", str(len(BODY)))
        missing, _ = _request(proxy, "GET", "/nope.bin")
        assert missing.status == 404
        log = proxy.requests
    assert [(r.method, r.path, r.range, r.status, r.fault) for r in log] == [
        ("GET", "/data.bin", None, 200, None),
        ("GET", "/data.bin", (1000, 2000), 206, None),
        ("HEAD", "/data.bin", None, 200, None),
        ("GET", "/nope.bin", None, 404, None),
    ]
    assert proxy.bytes_forwarded == len(BODY) + 1000
    assert proxy.fault_count == 0


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
@pytest.mark.parametrize("chunked", [False, True])
def test_any_method_with_headers_query_and_body_is_forwarded(echo: str, method: str, chunked: bool) -> None:
    with fault_proxy(echo) as proxy:
        headers = {"X-Custom": "kept", "Authorization": "AWS4-HMAC-SHA256 Credential=SECRET/..."}
        response, answer = _request(
            proxy, method, "/bucket/key?partNumber=1&uploadId=u", body=BODY, headers=headers, chunked=chunked
        )
        log = proxy.requests
    echoed = json.loads(answer)
    assert response.status == (201 if method == "PUT" else 200)
    assert response.getheader("ETag") == '"echo"'
    assert echoed["method"] == method
    assert echoed["target"] == "/bucket/key?partNumber=1&uploadId=u"
    # The client's Host reaches upstream unchanged: an S3 signature covers it.
    assert echoed["host"] == f"127.0.0.1:{proxy.port}"
    assert (echoed["custom"], echoed["authorization"]) == ("kept", headers["Authorization"])
    assert echoed["transfer_encoding"] is None  # a chunked body is forwarded with a length
    assert (echoed["length"], echoed["sha256"]) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert [(r.method, r.path, r.request_bytes) for r in log] == [(method, "/bucket/key", len(BODY))]


def test_the_log_never_holds_credentials(echo: str) -> None:
    with fault_proxy(echo) as proxy:
        _request(proxy, "GET", "/b/k?X-Amz-Credential=SECRET&X-Amz-Signature=SIG", headers={"Authorization": "SECRET"})
        text = repr(proxy.requests)
    assert "SECRET" not in text
    assert "SIG" not in text
    assert "/b/k" in text


def test_an_unreachable_upstream_answers_502() -> None:
    with fault_proxy("http://127.0.0.1:9", upstream_timeout=1.0) as proxy:
        response, body = _request(proxy, "GET", "/b/k")
    assert response.status == 502
    assert b"<Code>BadGateway</Code>" in body


# ---------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("fault", "code"), [("500", "InternalError"), ("503", "SlowDown")])
def test_server_errors_answer_s3_xml_without_forwarding(echo: str, fault: str, code: str) -> None:
    with fault_proxy(echo) as proxy:
        proxy.inject("/bucket/key", fault)
        response, body = _request(proxy, "PUT", "/bucket/key", body=b"payload")
        assert response.status == int(fault)
        assert response.getheader("Content-Type") == "application/xml"
        assert f"<Code>{code}</Code>".encode() in body
        assert b"<Resource>/bucket/key</Resource>" in body
        again, _ = _request(proxy, "PUT", "/bucket/key", body=b"payload")  # the injected fault is used up
        assert again.status == 201
        log = proxy.requests
    assert [(r.status, r.fault) for r in log] == [(int(fault), fault), (201, None)]


def test_reset_closes_the_connection_without_an_answer(echo: str) -> None:
    with fault_proxy(echo) as proxy:
        proxy.inject("b/k", "reset")
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            _request(proxy, "GET", "/b/k")
        log = proxy.requests
    assert [(r.status, r.fault) for r in log] == [(0, "reset")]


def test_truncate_sends_the_full_length_but_half_the_body(files: FaultInjectingHTTPServer) -> None:
    with fault_proxy(files.url) as proxy:
        proxy.inject("/data.bin", "truncate")
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request("GET", "/data.bin")
            response = conn.getresponse()
            assert response.getheader("Content-Length") == str(len(BODY))
            with pytest.raises(http.client.IncompleteRead) as info:
                response.read()
        finally:
            conn.close()
        log = proxy.requests
    assert info.value.partial == BODY[: len(BODY) // 2]
    assert [(r.status, r.bytes_forwarded, r.fault) for r in log] == [(200, len(BODY) // 2, "truncate")]


def test_stall_delays_then_answers_normally(files: FaultInjectingHTTPServer) -> None:
    with fault_proxy(files.url, stall_seconds=0.2) as proxy:
        proxy.inject("/data.bin", "stall")
        started = time.monotonic()
        response, body = _request(proxy, "GET", "/data.bin")
        elapsed = time.monotonic() - started
    assert (response.status, body) == (200, BODY)
    assert elapsed >= 0.2


def test_injected_faults_are_used_in_order_per_path(echo: str) -> None:
    with fault_proxy(echo) as proxy:
        proxy.inject("/a", "503", "500")
        statuses = [_request(proxy, "GET", path)[0].status for path in ("/b", "/a", "/b", "/a", "/a")]
    assert statuses == [200, 503, 200, 500, 200]
    assert proxy.fault_count == 2


def _fault_sequence(upstream: str, seed: int, n: int = 150) -> list[str | None]:
    with fault_proxy(upstream, failure_rate=0.3, faults=("500", "503", "stall"), stall_seconds=0.0, seed=seed) as p:
        for _ in range(n):
            _request(p, "GET", "/x")
        return [r.fault for r in p.requests]


def test_faults_are_deterministic_by_seed(echo: str) -> None:
    first, again, other = (_fault_sequence(echo, seed) for seed in (1, 1, 2))
    assert first == again
    assert first != other
    rate = sum(f is not None for f in first) / len(first)
    assert 0.15 < rate < 0.45
    assert {f for f in first if f is not None} == {"500", "503", "stall"}


def test_zero_failure_rate_injects_nothing(echo: str) -> None:
    assert _fault_sequence(echo, seed=0, n=20) != [None] * 20  # control: 0.3 does inject
    with fault_proxy(echo, seed=0) as proxy:
        for _ in range(20):
            _request(proxy, "GET", "/x")
        assert proxy.fault_count == 0
        proxy.reset_log()
        assert proxy.requests == []


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upstream_url": "https://127.0.0.1:1"}, "plain http://"),
        ({"upstream_url": "127.0.0.1:1"}, "plain http://"),
        ({"upstream_url": "http://127.0.0.1:1/?q=1"}, "plain http://"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": -0.1}, "failure_rate"),
        ({"faults": ("reset", "boom")}, "unknown entries"),
        ({"faults": "reset"}, "unknown entries"),
        ({"failure_rate": 0.1, "faults": ()}, "at least one fault"),
        ({"stall_seconds": -1}, "stall_seconds"),
        ({"upstream_timeout": 0}, "upstream_timeout"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"upstream_url": "http://127.0.0.1:1", **kwargs}
    with pytest.raises(ValueError, match=match):
        FaultInjectingProxy(**arguments)  # type: ignore[arg-type]


def test_inject_rejects_unknown_faults(echo: str) -> None:
    with fault_proxy(echo) as proxy, pytest.raises(ValueError, match="choose from"):
        proxy.inject("/a", "explode")
    assert "truncate" in PROXY_FAULTS


def test_start_twice_is_refused(echo: str) -> None:
    with fault_proxy(echo) as proxy, pytest.raises(RuntimeError, match="already"):
        proxy.start()


# ---------------------------------------------------------------------------------------------- real S3 client


@pytest.mark.remote
def test_s3fs_writes_and_reads_through_the_proxy_despite_faults() -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import s3fs

    from lightning_patterns.testing import moto_s3_server

    with moto_s3_server() as s3, fault_proxy(s3.endpoint_url) as proxy:
        bucket = s3.create_bucket("proxied").removeprefix("s3://")
        options = {**s3.storage_options, "client_kwargs": {**s3.storage_options["client_kwargs"]}}
        options["client_kwargs"]["endpoint_url"] = proxy.url
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        key = f"/{bucket}/blob.bin"
        # botocore retries the 5xx answers and the reset itself; the signed PUT reaches moto intact.
        proxy.inject(key, "503", "reset")
        fs.pipe_file(f"{bucket}/blob.bin", BODY)
        proxy.inject(key, "500", "truncate")
        assert fs.cat_file(f"{bucket}/blob.bin") == BODY
        assert fs.cat_file(f"{bucket}/blob.bin", start=10, end=20) == BODY[10:20]
        log = proxy.requests_for(key)
        assert s3.filesystem().cat_file(f"{bucket}/blob.bin") == BODY  # stored upstream, as sent
    assert [r.fault for r in log[:5]] == ["503", "reset", None, "500", "truncate"]
    assert [r.method for r in log[:3]] == ["PUT", "PUT", "PUT"]
    assert log[2].request_bytes == len(BODY)
