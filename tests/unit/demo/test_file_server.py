"""The demo's HTTP file server: in a thread (``FileServer``) and in its own process (``LocalHTTPServer``)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lightning_patterns.demo import LocalHTTPServer
from lightning_patterns.demo.file_server import FileServer

pytestmark = pytest.mark.remote
BODY = bytes(range(256)) * 4


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), b""


def test_file_server_answers_ranges_and_refuses_what_is_not_a_served_file(tmp_path: Path) -> None:
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "a.bin").write_bytes(BODY)
    (tmp_path / "secret.bin").write_bytes(b"secret")
    with FileServer(tmp_path / "served") as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        status, headers, body = _get(server.url_for("a.bin"), Range="bytes=1000-")
        assert (status, body, headers["Content-Range"]) == (206, BODY[1000:], "bytes 1000-1023/1024")
        assert _get(server.url_for("a.bin"))[::2] == (200, BODY)
        request = urllib.request.Request(server.url_for("a.bin"), method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert (response.status, response.headers["Content-Length"], response.read()) == (200, "1024", b"")
        assert _get(server.url_for("missing.bin"))[0] == 404
        assert _get(server.url + "/%2e%2e/secret.bin")[0] == 403
        assert _get(server.url_for("a.bin"), Range="bytes=5000-")[0] == 416
    with pytest.raises(FileNotFoundError, match="it is not a folder"):
        FileServer(tmp_path / "served" / "a.bin")


@pytest.mark.slow
def test_local_http_server_serves_from_its_own_process_and_stops(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(BODY)
    with LocalHTTPServer(tmp_path) as server:
        assert server.running
        assert server.url is not None
        assert _get(f"{server.url}/a.bin")[::2] == (200, BODY)
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server.url}/a.bin", timeout=5)
