"""An emulated network link: a TCP proxy on 127.0.0.1 that forwards to a server at a capped bandwidth.

``--remote-mbps 100`` of the data benchmark puts one of these between the readers and the S3 server, so that
epoch 1 is bounded by a link of 100 MB/s (10^8 bytes/s) instead of by loopback. All connections share one
token bucket per direction, as they would share a real link: a reader that opens four connections gets no
more than one that opens one. Bytes are released in pieces of at most 64 KiB in the order they were asked
for, so the connections share the link evenly.

Runs in its own process (``python benchmarks/link.py --listen PORT --upstream HOST:PORT --mbps N``), never in
the process being measured; :class:`LinkProxy` starts and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PIECE = 64 * 1024
# Bytes a connection may send at once after a pause: a link with a 10 ms buffer at 100 MB/s. A late wake-up of
# the proxy (a busy machine) is made up from it, so the link's rate holds without a timer per piece.
_BURST = 1024 * 1024


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a helper process started by a benchmark; kill it if it has not exited after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Bucket:
    """``rate`` bytes per second, handed out first come first served; at most :data:`_BURST` at once."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = float(_BURST)
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(float(_BURST), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: _Bucket) -> None:
    try:
        while True:
            data = await reader.read(_PIECE)
            if not data:
                break
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: int, upstream: tuple[str, int], mbps: float) -> None:
    down, up = _Bucket(mbps * 1e6), _Bucket(mbps * 1e6)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, server_writer, up), _pump(server_reader, client_writer, down), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LinkProxy:
    """The proxy process, as a context manager; ``endpoint`` is its URL (``http://127.0.0.1:PORT``).

    Args:
        upstream: the server's URL, ``http://host:port``.
        mbps: the link's bandwidth in MB/s (10^6 bytes per second), each direction.
    """

    def __init__(self, upstream: str, mbps: float) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port))
        self.mbps = mbps
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> LinkProxy:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--listen",
            str(self.port),
            "--upstream",
            f"{self.upstream[0]}:{self.upstream[1]}",
            "--mbps",
            str(self.mbps),
        ]
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)
                    raise RuntimeError(f"link proxy did not start: {self._log.read().decode()[-2000:]}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        self._log.close()


def main() -> None:
    """Run the proxy until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--mbps", type=float, required=True)
    args = parser.parse_args()
    host, _, port = args.upstream.partition(":")
    asyncio.run(_serve(args.listen, (host, int(port)), args.mbps))


if __name__ == "__main__":
    main()
