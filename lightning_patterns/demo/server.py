"""A static HTTP server for a folder, run in its own process on 127.0.0.1 and always stopped.

A separate process keeps the server off the training process's GIL, as a real remote would be. The child runs
``python -m lightning_patterns.demo ROOT PARENT_PID`` (:func:`main`, serving with
:class:`~lightning_patterns.demo.file_server.FileServer`) and exits by itself when the process that started it
dies (it watches its parent), so even a ``kill -9`` of the trainer leaves no server behind.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LocalHTTPServer", "main"]

log = logging.getLogger(__name__)


class LocalHTTPServer:
    """Serves ``root`` over HTTP on 127.0.0.1 from a child process; use as a context manager.

    Args:
        root: the folder to serve.
        start_timeout: seconds to wait for the server to come up.
        stop_timeout: seconds to wait for it to exit before killing it.
    """

    def __init__(self, root: str | Path, *, start_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        self.root = Path(root)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.url: str | None = None
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> str:
        """Start the server and return its base URL."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"Cannot serve {str(self.root)!r}: it is not a folder.")
        self._process = subprocess.Popen(
            # The package's __main__, never this module: running a module the package imported makes runpy warn.
            [sys.executable, "-m", "lightning_patterns.demo", str(self.root), str(os.getpid())],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self._process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=self.start_timeout):
                self.stop()
                raise TimeoutError(
                    f"The HTTP server for {str(self.root)!r} did not start within {self.start_timeout} s."
                )
        line = self._process.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"The HTTP server for {str(self.root)!r} failed to start (it said {line!r}).")
        self.url = line
        log.info("Serving %s at %s (pid %s)", self.root, line, self._process.pid)
        return line

    def stop(self) -> None:
        """Stop the server, killing it if it does not exit within ``stop_timeout``."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self.stop_timeout)
        if process.stdout is not None:
            process.stdout.close()

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> LocalHTTPServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Child process: serve ``argv[0]`` until terminated or until process ``argv[1]`` is gone."""
    import signal

    from lightning_patterns.demo.file_server import FileServer

    args = sys.argv[1:] if argv is None else argv
    root, parent_pid = args[0], int(args[1])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    with FileServer(root) as server:
        sys.stdout.write(server.url.rstrip("/") + "\n")
        sys.stdout.flush()
        stop.wait()
    return 0
