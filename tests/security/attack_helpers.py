"""A hostile HTTP server and malicious datasets for the attack tests of the data path (``tests/security``).

:class:`HostileServer` answers each path as a test tells it to: a body, an endless body, one byte at a time,
or never. Unlike the project's file server it decodes and normalises request paths the naive way, so
``/data/%2e%2e/secret.lps`` reaches ``/secret.lps``, as on servers the issue found. It binds 127.0.0.1, and
every answer stops when the test ends (the fixture sets the stop event and shuts the server down).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import posixpath
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_patterns.data.shards import MANIFEST_NAME, write_dataset

# What an answer does: writes the response through the handler; returns the body bytes it sent.
Answer = Callable[["_Handler", threading.Event], int]
# Upper bounds on any one answer, so that nothing a test starts can outlive it by much.
_MAX_ANSWER_SECONDS = 60.0
_MAX_ANSWER_BYTES = 2**31


@dataclass(frozen=True)
class Request:
    """One request the hostile server received (logged on arrival, before it is answered)."""

    path: str
    range: str | None


def body(data: bytes) -> Answer:
    """Answer 200 with ``data`` (``Range`` is ignored, as a server may)."""

    def answer(handler: _Handler, stop: threading.Event) -> int:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return len(data)

    return answer


def endless(chunk: bytes = b"x" * 65536) -> Answer:
    """Answer 200 with no length and a body that never ends (until the client leaves or the test does)."""

    def answer(handler: _Handler, stop: threading.Event) -> int:
        handler.send_response(200)
        handler.end_headers()
        sent, started = 0, time.monotonic()
        while not stop.is_set() and sent < _MAX_ANSWER_BYTES and time.monotonic() - started < _MAX_ANSWER_SECONDS:
            handler.wfile.write(chunk)
            sent += len(chunk)
        return sent

    return answer


def drip(data: bytes, interval: float) -> Answer:
    """Answer 200 announcing all of ``data``, then send it one byte every ``interval`` seconds."""

    def answer(handler: _Handler, stop: threading.Event) -> int:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        sent = 0
        for i in range(len(data)):
            if stop.wait(interval):
                break
            handler.wfile.write(data[i : i + 1])
            handler.wfile.flush()
            sent += 1
        return sent

    return answer


def stall() -> Answer:
    """Accept the request and never answer (until the test ends)."""

    def answer(handler: _Handler, stop: threading.Event) -> int:
        stop.wait(_MAX_ANSWER_SECONDS)
        return 0

    return answer


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        # The naive way: decode, then normalise, so that `..` in any encoding climbs out of a folder.
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        self.server.hostile.record(Request(path, self.headers.get("Range")))
        answer = self.server.hostile.routes.get(path)
        try:
            if answer is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                answer(self, self.server.hostile.stop)
        except OSError:  # the client went away: what a bounded reader does to an endless answer
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hostile: HostileServer


class HostileServer:
    """Answers each path as the test says; see the module docstring."""

    def __init__(self) -> None:
        self.routes: dict[str, Answer] = {}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hostile = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hostile-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def serve_folder(self, prefix: str, folder: Path, **overrides: Answer) -> str:
        """Serve every file of ``folder`` under ``/prefix/`` (``overrides``: file name to answer); its URL."""
        for path in folder.rglob("*"):
            if path.is_file():
                self.routes[f"/{prefix}/{path.relative_to(folder).as_posix()}"] = body(path.read_bytes())
        for name, answer in overrides.items():
            self.routes[f"/{prefix}/{name}"] = answer
        return f"{self.url}/{prefix}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# ---------------------------------------------------------------------- malicious datasets


def samples(n: int) -> list[dict[str, Any]]:
    """``n`` samples: an ``index`` that tells them apart, a small image, and a ``str``."""
    rng = np.random.default_rng(n)
    return [
        {
            "index": np.int64(i),
            "image": rng.integers(0, 256, size=(4, 4), dtype=np.uint8),
            "text": f"sample {i} é",
        }
        for i in range(n)
    ]


def make_dataset(folder: Path, n: int = 48, shard_bytes: int = 1024) -> dict[str, Any]:
    """Write ``n`` samples to ``folder`` in shards of about ``shard_bytes``; return the manifest's JSON."""
    write_dataset(samples(n), str(folder), shard_bytes=shard_bytes, progress=False)
    manifest = read_manifest_json(folder)
    assert len(manifest["shards"]) >= 3
    return manifest


def read_manifest_json(folder: Path) -> dict[str, Any]:
    """The manifest of the dataset in ``folder``, as JSON."""
    data: dict[str, Any] = json.loads((folder / MANIFEST_NAME).read_text())
    return data


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``edit`` to the manifest's JSON in place."""
    data = read_manifest_json(folder)
    edit(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def replace_shard(folder: Path, index: int, data: bytes) -> None:
    """Replace shard ``index`` with ``data`` and record its size and checksum: corrupt but checksum-matching."""
    manifest = read_manifest_json(folder)
    entry = manifest["shards"][index]
    (folder / entry["path"]).write_bytes(data)
    entry["num_bytes"] = len(data)
    entry["checksum"] = "sha256:" + hashlib.sha256(data).hexdigest()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def shard_bytes(folder: Path, index: int) -> bytes:
    """The bytes of shard ``index``."""
    return (folder / read_manifest_json(folder)["shards"][index]["path"]).read_bytes()


def split_shard(data: bytes) -> tuple[dict[str, Any], int]:
    """A shard's header (as JSON) and the length of its header region."""
    (length,) = struct.unpack_from("<Q", data, 8)
    return json.loads(data[16 : 16 + length]), length


def with_header(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """``data`` with ``edit`` applied to its header, which must still fit the header region."""
    header, length = split_shard(data)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "the edited header no longer fits its region"
    return data[:16] + text.ljust(length, b" ") + data[16 + length :]


def with_raw_header(data: bytes, text: bytes) -> bytes:
    """``data`` with its header region replaced by ``text`` (of any length; the body follows it)."""
    _, length = split_shard(data)
    return data[:8] + struct.pack("<Q", len(text)) + text + data[16 + length :]
