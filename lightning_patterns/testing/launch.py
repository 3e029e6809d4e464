"""Starting distributed jobs on 127.0.0.1 from tests and checks: a free port, a clean environment, torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["free_port", "launch_env", "run_nodes", "torchrun_command"]

# Set by a launcher for the process it starts: inherited by a new job, they would make it join the old one.
_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "PL_GLOBAL_SEED")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(port: int) -> dict[str, str]:
    """This process's environment for a new job whose rendezvous is ``127.0.0.1:port``, without rank variables."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    for key in _RANK_VARIABLES:
        env.pop(key, None)
    return env


def torchrun_command(port: int, nproc: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) for node ``node_rank`` of a job on 127.0.0.1."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    return [*run, f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]


def run_nodes(
    script_and_args: Sequence[str],
    nnodes: int,
    timeout: float,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> list[tuple[int, str]]:
    """Run a job as ``nnodes`` torchrun agents (one worker each) on 127.0.0.1, as if on as many machines.

    ``env`` adds to the job's environment. Returns each node's exit code and combined output; the agents are
    killed if they outlast ``timeout`` seconds.
    """
    port = free_port()
    agents = [
        subprocess.Popen(
            [*torchrun_command(port, nproc=1, nnodes=nnodes, node_rank=node), *script_and_args],
            env={**launch_env(port), **(env or {})},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(nnodes)
    ]
    logs: list[str] = []
    try:
        logs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    return [(agent.returncode, log) for agent, log in zip(agents, logs, strict=True)]
