"""Server processes and the session that keeps them across the fits of one job.

Workers are launched by Lightning's own launchers (or torchrun, SLURM, ...). The servers are extra processes:
server ``s`` is started by the local rank 0 of node ``s % num_nodes`` as ``python -m ...parameter_server.serve``
(torch only, no Lightning, no training script) and joins the worker-and-server group as global rank
``num_workers + s``.

A :class:`ServerSession` (the servers and this worker's :class:`Link` to them) outlives a fit: a later fit of the
same process with the same workers and number of servers reuses it, so only the first fit pays for starting
servers. Every process of a job runs the same sequence of fits, so all of them reuse or replace the session
alike. A failed fit drops the session (its servers stop the job and exit on their own); the session still open
when the process exits is closed: its servers are told to exit, then waited for.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.link import Link, connect_group, open_link
from lightning_patterns.strategies.parameter_server.messages import Exit
from lightning_patterns.strategies.parameter_server.serve import ServerConfig
from lightning_patterns.strategies.parameter_server.shm import HostCard

__all__ = [
    "PendingSession",
    "ServerSession",
    "ServerStartError",
    "SessionKey",
    "check_started",
    "current_session",
    "drop_session",
    "reuse_session",
    "servers_on_node",
    "start_servers",
    "stop_servers",
]

log = logging.getLogger(__name__)

_ENTRY = "lightning_patterns.strategies.parameter_server.serve"
#: The folder holding the ``lightning_patterns`` package, put on the servers' ``PYTHONPATH``.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])


class ServerStartError(RuntimeError):
    """A server process exited before it joined the job."""


def servers_on_node(num_servers: int, num_nodes: int, node_rank: int) -> list[int]:
    """Indices of the servers that node ``node_rank`` hosts (round-robin over nodes)."""
    return [s for s in range(num_servers) if s % num_nodes == node_rank]


def start_servers(template: ServerConfig, indices: Sequence[int]) -> list[subprocess.Popen[bytes]]:
    """Start one server process per index (``template.server_index`` replaced by each); they share our output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    processes = []
    for index in indices:
        config = replace(template, server_index=index)
        process = subprocess.Popen([sys.executable, "-m", _ENTRY, config.to_json()], env=env)
        log.debug("started server %d (rank %d, pid %d)", index, config.rank, process.pid)
        processes.append(process)
    return processes


def check_started(processes: Sequence[subprocess.Popen[bytes]], ranks: Sequence[int]) -> None:
    """Raise :class:`ServerStartError` if a server process has exited (while the job is starting)."""
    for process, rank in zip(processes, ranks, strict=True):
        code = process.poll()
        if code is not None:
            raise ServerStartError(
                f"Parameter server rank {rank} (pid {process.pid}) exited with code {code} while the job was "
                f"starting, before it joined the workers; its error is in the output above (lines starting with "
                f"`[server rank {rank}]`, or a traceback). Servers run `{sys.executable} -m {_ENTRY}` in this "
                "environment: check that torch and lightning_patterns import there."
            )


def stop_servers(processes: Sequence[subprocess.Popen[bytes]], timeout: float) -> list[int | None]:
    """Wait up to ``timeout`` seconds for the servers to exit, then kill any left; return their exit codes."""
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(timeout))
        except subprocess.TimeoutExpired:
            log.warning("server process %d did not exit within %ss; killing it", process.pid, timeout)
            process.kill()
            codes.append(process.wait(5.0))
    return codes


@dataclass(frozen=True)
class SessionKey:
    """What must match for a fit to reuse the servers of an earlier one (the same on every process)."""

    main_address: str
    main_port: int
    num_workers: int
    num_servers: int
    num_nodes: int


class ServerSession:
    """The servers of a job and this worker's link to them.

    Args:
        key: what the session was opened for.
        link: this worker's end of the worker-and-server group.
        processes: the server processes this worker started (its node's, on local rank 0; else none).
        ranks: their global ranks.
    """

    def __init__(self, key: SessionKey, link: Link, processes: list[subprocess.Popen[bytes]], ranks: list[int]) -> None:
        self.key = key
        self.link = link
        self.processes = processes
        self.ranks = ranks

    def close(self, grace: float) -> list[int | None]:
        """Between fits: tell this worker's servers to exit, wait up to ``grace`` seconds, kill any left."""
        for rank, process in zip(self.ranks, self.processes, strict=True):
            if process.poll() is None:
                try:
                    self.link.send(Exit(), rank, timeout=min(grace, 5.0))
                except PeerLostError:
                    continue
        return stop_servers(self.processes, grace)


_SESSION: ServerSession | None = None
_SESSIONS_OPENED = 0  # sessions this process opened: names each one's group, the same on every process

T = TypeVar("T")


def current_session() -> ServerSession | None:
    """The open session of this process, if any."""
    return _SESSION


def reuse_session(key: SessionKey, timeout: float) -> ServerSession | None:
    """The open session if it was opened for ``key``; else ``None``, after closing the open one (if any)."""
    global _SESSION
    if _SESSION is not None and _SESSION.key == key:
        _SESSION.link.timeout = timeout
        return _SESSION
    if _SESSION is not None:
        _SESSION.close(grace=10.0)
        _SESSION = None
    return None


class PendingSession:
    """A session whose servers are starting: this node's processes, and the group they will join.

    Args:
        key: what the session is for.
        node_rank: this worker's node.
        local_rank: this worker's rank on its node; local rank 0 starts the node's servers.
        join_seconds: bound on joining.
    """

    def __init__(self, key: SessionKey, node_rank: int, local_rank: int, join_seconds: float) -> None:
        global _SESSIONS_OPENED
        self.key = key
        self.join_seconds = join_seconds
        self.prefix = f"lightning_patterns/parameter_server/{_SESSIONS_OPENED}"
        _SESSIONS_OPENED += 1
        indices = servers_on_node(key.num_servers, key.num_nodes, node_rank) if local_rank == 0 else []
        template = ServerConfig(
            0, key.num_workers, key.num_servers, key.main_address, key.main_port, self.prefix, join_seconds
        )
        self.processes = start_servers(template, indices)
        self.ranks = [key.num_workers + index for index in indices]

    def watching(self, work: Callable[[], T]) -> T:
        """Run ``work`` (which waits for other processes) while checking every 0.1 s that this node's servers live.

        A server that exits meanwhile stops the wait at once with :class:`ServerStartError` (and the others are
        stopped); ``work``, blocked in C++, is left to its own timeout in a daemon thread.
        """
        if not self.processes:
            return work()
        result: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                result.append(work())
            except BaseException as error:  # handed to the waiting thread
                failure.append(error)

        thread = threading.Thread(target=run, daemon=True, name="ps-join")
        thread.start()
        try:
            while thread.is_alive():
                check_started(self.processes, self.ranks)
                thread.join(0.1)
        except ServerStartError:
            stop_servers(self.processes, 0.0)
            raise
        if failure:
            stop_servers(self.processes, 0.0)
            raise failure[0]
        return result[0]

    def join(self, rank: int, timeout: float) -> ServerSession:
        """Join the worker-and-server group; the session becomes this process's open one."""
        global _SESSION
        key = self.key
        world_size = key.num_workers + key.num_servers
        group, cards = self.watching(
            lambda: connect_group(
                key.main_address, key.main_port, rank, world_size, self.prefix, self.join_seconds, HostCard.here()
            )
        )
        link = open_link(group, rank, timeout, cards, key.num_workers)
        _SESSION = ServerSession(key, link, self.processes, self.ranks)
        return _SESSION


def drop_session() -> None:
    """After a failed fit: forget the session.

    Its servers stop the job and exit on their own, within the fit's timeout. They are neither waited for nor
    killed: a worker blocked in a collective with this process learns why the job stops only from them, once this
    process has exited.
    """
    global _SESSION
    _SESSION = None


@atexit.register
def _close_at_exit() -> None:
    global _SESSION
    if _SESSION is not None:
        _SESSION.close(grace=10.0)
        _SESSION = None
