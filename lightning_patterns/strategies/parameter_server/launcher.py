"""Starting and stopping the server processes that a node hosts.

Workers are launched by Lightning's own launchers (or torchrun, SLURM, ...). The servers are extra
processes: server ``s`` is started by the local rank 0 of node ``s % num_nodes`` with the ``spawn``
context, before the workers join the process group, and joins it as global rank ``num_workers + s``.
"""

from __future__ import annotations

import logging
import multiprocessing.process
from collections.abc import Sequence
from dataclasses import replace

import torch.multiprocessing as mp

from lightning_patterns.strategies.parameter_server.server import ServerConfig, run_server

__all__ = ["servers_on_node", "start_servers", "stop_servers"]

log = logging.getLogger(__name__)


def servers_on_node(num_servers: int, num_nodes: int, node_rank: int) -> list[int]:
    """Indices of the servers that node ``node_rank`` hosts (round-robin over nodes)."""
    return [s for s in range(num_servers) if s % num_nodes == node_rank]


def start_servers(config: ServerConfig, indices: Sequence[int]) -> list[multiprocessing.process.BaseProcess]:
    """Spawn one server process per index; ``config.server_index`` is replaced by each index."""
    context = mp.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    for index in indices:
        process = context.Process(
            target=run_server, args=(replace(config, server_index=index),), daemon=True, name=f"ps-server-{index}"
        )
        process.start()
        log.debug("started server %d (pid %s)", index, process.pid)
        processes.append(process)
    return processes


def stop_servers(processes: Sequence[multiprocessing.process.BaseProcess], timeout: float) -> list[int | None]:
    """Wait up to ``timeout`` seconds for the servers to exit, then kill any left; return their exit codes."""
    codes: list[int | None] = []
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            log.warning("server process %s did not exit within %ss; killing it", process.name, timeout)
            process.kill()
            process.join(5.0)
        codes.append(process.exitcode)
    return codes
