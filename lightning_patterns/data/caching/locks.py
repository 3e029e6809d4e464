"""Cross-process file locks with a bounded wait.

``fcntl.flock`` locks belong to an open file description and vanish when the process holding them dies
(even by ``kill -9``), so a crashed reader never leaves a lock behind that blocks the next run. Every
acquisition opens the lock file anew, so two threads of one process exclude each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

__all__ = ["CacheLockTimeoutError", "acquire_file_lock", "file_lock"]


class CacheLockTimeoutError(TimeoutError):
    """Waiting for a cache lock took longer than the cache's ``lock_timeout``."""


@contextlib.contextmanager
def file_lock(path: str, *, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: the lock file.
        timeout: seconds to wait for the lock before giving up.
        what: what the lock protects, for the error message (e.g. ``"cache entry 3fa2…"``).

    Raises:
        CacheLockTimeoutError: another process or thread held the lock for longer than ``timeout``.
    """
    fd = acquire_file_lock(path, timeout=timeout, what=what)
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def acquire_file_lock(path: str, *, timeout: float, what: str) -> int:
    """Take the lock of :func:`file_lock` and return its descriptor: ``os.close`` it (from any thread) to release.

    Raises:
        CacheLockTimeoutError: another process or thread held the lock for longer than ``timeout``.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheLockTimeoutError(
                        f"Waited {timeout} s for the lock on {what} ({path}), which another process or thread "
                        "holds while it fetches or writes. If that process is stuck, stop it; otherwise raise "
                        "`lock_timeout` of the disk cache (e.g. `DiskEpochCache(cache_dir, lock_timeout=3600)`)."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
    except BaseException:
        os.close(fd)
        raise
    return fd
