"""A fault-injecting HTTP reverse proxy, to test clients of a real server (e.g. moto's S3) against network faults.

:func:`fault_proxy` listens on ``127.0.0.1`` (a free port) from a daemon thread and forwards every request, whatever
its method, with its headers (``Host`` included, so signatures that cover it stay valid) and body, to an upstream
base URL, streaming the answer back. Requests fail at random with probability ``failure_rate`` (seeded), or
deterministically with :meth:`FaultInjectingProxy.inject`. Every request is logged, without its query string or
headers, so credentials and signatures never reach the log.

Faults:

- ``"reset"``: close the connection with a TCP reset, without an answer (the request is not forwarded).
- ``"500"``, ``"503"``: answer with that status and an S3-style XML error (``InternalError``, ``SlowDown``), which
  botocore treats as a retryable server error (the request is not forwarded).
- ``"truncate"``: forward, then send the upstream headers with the full ``Content-Length`` but only half of the
  body, and close the connection.
- ``"stall"``: wait ``stall_seconds``, then forward normally (a client with a shorter timeout gives up).

Example:
    >>> import pathlib, tempfile, urllib.request
    >>> from lightning_patterns.testing.http_server import serve_directory
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "a.bin").write_bytes(b"0123456789")
    >>> with serve_directory(root) as upstream, fault_proxy(upstream.url) as proxy:
    ...     proxy.inject("/a.bin", "503")
    ...     try:
    ...         urllib.request.urlopen(proxy.url + "/a.bin")
    ...     except urllib.error.HTTPError as err:
    ...         err.code, err.read()[:36]
    ...     with urllib.request.urlopen(proxy.url + "/a.bin") as response:
    ...         body = response.read()
    (503, b'<?xml version="1.0" encoding="UTF-8"')
    >>> body, proxy.fault_count, proxy.bytes_forwarded
    (b'0123456789', 1, 10)
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import urllib.parse
from collections.abc import Iterator, Sequence

from lightning_patterns.testing._faults import FAULTS, _FaultHandler, _FaultInjectingServer

__all__ = ["FaultInjectingProxy", "PROXY_FAULTS", "ProxyRecord", "fault_proxy"]

# The same faults as the file server's, under the name this module has always exported.
PROXY_FAULTS: tuple[str, ...] = FAULTS
# Connection-level headers (RFC 9110 section 7.6.1) that describe one hop, never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "The fault proxy could not reach its upstream server."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclasses.dataclass(frozen=True)
class ProxyRecord:
    """One request the proxy answered (or refused to answer).

    Args:
        method: The request method, e.g. ``"GET"`` or ``"PUT"``.
        path: The URL path without its query string (which may carry signatures), e.g. ``"/bucket/key"``.
        range: The ``Range`` header as ``(start, end)``, ``end`` exclusive or ``None`` when open-ended, or
            ``None`` without a (single, well-formed) one.
        status: The status sent to the client, or ``0`` when the connection was reset without an answer.
        request_bytes: Body bytes of the request forwarded upstream.
        bytes_forwarded: Body bytes of the answer written to the client.
        fault: The injected fault, or ``None``.
    """

    method: str
    path: str
    range: tuple[int, int | None] | None
    status: int
    request_bytes: int
    bytes_forwarded: int
    fault: str | None = None


class FaultInjectingProxy(_FaultInjectingServer[ProxyRecord]):
    """A threading reverse proxy to ``upstream_url`` that injects faults and logs every request.

    Prefer :func:`fault_proxy`, which starts and stops it.

    Args:
        upstream_url: Base URL of the server to forward to, ``http://host:port`` (a path prefix is kept).
        failure_rate: Probability in ``[0, 1]`` that a request meets a random fault from ``faults``.
        faults: The faults to draw from (see the module docstring).
        stall_seconds: How long a ``"stall"`` waits before forwarding.
        seed: Seeds the fault draws: the ``k``-th request meets the same fault in every run with this seed.
        upstream_timeout: Seconds to wait for the upstream server before answering ``502``.
    """

    _thread_prefix = "fault-proxy"
    _noun = "proxy"

    def __init__(
        self,
        upstream_url: str,
        *,
        failure_rate: float = 0.0,
        faults: Sequence[str] = PROXY_FAULTS,
        stall_seconds: float = 0.2,
        seed: int = 0,
        upstream_timeout: float = 30.0,
    ) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                f"FaultInjectingProxy(upstream_url={upstream_url!r}) must be a plain http:// base URL, "
                "e.g. 'http://127.0.0.1:5000'."
            )
        if not upstream_timeout > 0:
            raise ValueError(f"FaultInjectingProxy(upstream_timeout={upstream_timeout!r}) must be > 0 seconds.")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_prefix = parts.path.rstrip("/")
        self.upstream_timeout = upstream_timeout
        super().__init__(
            _ProxyHandler, failure_rate=failure_rate, faults=faults, stall_seconds=stall_seconds, seed=seed
        )

    @property
    def bytes_forwarded(self) -> int:
        """Answer body bytes written to clients over all logged requests."""
        with self._lock:
            return sum(r.bytes_forwarded for r in self._log)


def _parse_range(header: str | None) -> tuple[int, int | None] | None:
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    return int(first), int(last) + 1 if last else None


def _s3_error(status: int, path: str) -> bytes:
    code, message = _S3_ERRORS.get(status, ("InternalError", http.client.responses.get(status, "Error")))
    resource = path.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: str  # forwarded, never logged: presigned URLs carry credentials and signatures there
    range: tuple[int, int | None] | None
    body: bytes
    fault: str | None


class _ProxyHandler(_FaultHandler):
    server: FaultInjectingProxy

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ------------------------------------------------------------------ one request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers: dropped, like the other hop-by-hop fields
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline(65537)

    def _proxy(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        path = split.path or "/"
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        fault = self.server._choose_fault(path)
        request = _Request(self.command, path, split.query, _parse_range(self.headers.get("Range")), body, fault)
        answered = self._act_out_fault(
            fault,
            lambda status: self._log(request, status),
            lambda status: self._send_error_body(status, path, retry_after=status == 503),
        )
        if answered:
            return
        upstream = http.client.HTTPConnection(
            self.server.upstream_host, self.server.upstream_port, timeout=self.server.upstream_timeout
        )
        try:
            self._forward(upstream, request)
        finally:
            upstream.close()

    def _log(self, request: _Request, status: int, forwarded: int = 0) -> tuple[int, ProxyRecord]:
        record = ProxyRecord(
            request.method, request.path, request.range, status, len(request.body), forwarded, request.fault
        )
        return self.server._record(record), record

    def _forward(self, upstream: http.client.HTTPConnection, request: _Request) -> None:
        query = f"?{request.query}" if request.query else ""
        target = self.server.upstream_prefix + request.path + query
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(request.body))))
        try:
            # skip_host: the client's Host header goes upstream unchanged, since an S3 signature covers it.
            upstream.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
            for key, value in headers:
                upstream.putheader(key, value)
            upstream.endheaders(request.body or None)
            response = upstream.getresponse()
        except OSError:
            self._log(request, 502)
            self._send_error_body(502, request.path, retry_after=False)
            return

        declared = response.getheader("Content-Length")
        content: bytes | None = None  # None: stream the body from upstream
        if request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
            length, to_send = int(declared) if declared is not None and declared.isdigit() else 0, 0
        elif declared is None or not declared.isdigit():
            content = response.read()  # chunked or close-delimited upstream: answer with a length instead
            length = to_send = len(content)
        else:
            length = to_send = int(declared)
        if request.fault == "truncate":
            to_send //= 2
            self.close_connection = True
        index, planned = self._log(request, response.status, to_send)
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP | {"content-length", "date", "server"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        # nullcontext: the response belongs to the upstream connection, which _proxy closes.
        body = response if content is None else io.BytesIO(content)
        sent = self._send_body(contextlib.nullcontext(body), to_send)
        if sent != to_send:
            self.server._amend(index, planned, dataclasses.replace(planned, bytes_forwarded=sent))

    def _send_error_body(self, status: int, path: str, *, retry_after: bool) -> None:
        payload = _s3_error(status, path)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            if retry_after:
                self.send_header("Retry-After", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True


@contextlib.contextmanager
def fault_proxy(
    upstream_url: str,
    *,
    failure_rate: float = 0.0,
    faults: Sequence[str] = PROXY_FAULTS,
    stall_seconds: float = 0.2,
    seed: int = 0,
    upstream_timeout: float = 30.0,
) -> Iterator[FaultInjectingProxy]:
    """Run a fault-injecting proxy to ``upstream_url`` on ``127.0.0.1`` for the duration of the ``with`` block.

    Args:
        upstream_url: Base URL of the server to forward to, e.g. a moto server's ``endpoint_url``.
        failure_rate: Probability in ``[0, 1]`` that a request meets a random fault.
        faults: The faults to draw from.
        stall_seconds: How long a ``"stall"`` waits before forwarding.
        seed: Seeds the fault draws.
        upstream_timeout: Seconds to wait for the upstream server before answering ``502``.

    Yields:
        The running proxy; point clients at ``proxy.url`` and read ``proxy.requests`` for the log.
    """
    with FaultInjectingProxy(
        upstream_url,
        failure_rate=failure_rate,
        faults=faults,
        stall_seconds=stall_seconds,
        seed=seed,
        upstream_timeout=upstream_timeout,
    ) as proxy:
        yield proxy
