"""A server process: ``python -m lightning_patterns.strategies.parameter_server.serve CONFIG_JSON``.

Started by :mod:`~lightning_patterns.strategies.parameter_server.launcher`. It imports torch and the protocol
modules of this package only, never Lightning nor the training script (so it starts in about the time torch takes
to import, and a script needs no ``if __name__ == "__main__":`` guard for it). It joins the worker-and-server
group, serves fits until told to exit, and exits non-zero when a fit fails, after telling the workers why.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch

from lightning_patterns.strategies.parameter_server.link import connect_group, open_link
from lightning_patterns.strategies.parameter_server.server import ParameterServer
from lightning_patterns.strategies.parameter_server.shm import HostCard, Region, shared_memory_available

__all__ = ["ServerConfig", "main"]

log = logging.getLogger("lightning_patterns.strategies.parameter_server.server")


@dataclass(frozen=True)
class ServerConfig:
    """What a server process needs to join its job.

    Attributes:
        server_index: index of this server, 0-based; its global rank is ``num_workers + server_index``.
        num_workers: number of workers (global ranks ``0 .. num_workers - 1``).
        num_servers: number of servers.
        main_address: address of the rendezvous store.
        main_port: port of the rendezvous store.
        prefix: store prefix of the job's worker-and-server group.
        join_timeout: seconds joining may take (every process must have started by then).
    """

    server_index: int
    num_workers: int
    num_servers: int
    main_address: str
    main_port: int
    prefix: str
    join_timeout: float

    @property
    def rank(self) -> int:
        """Global rank of this server."""
        return self.num_workers + self.server_index

    def to_json(self) -> str:
        """The command-line form."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        """Parse the command-line form."""
        return cls(**json.loads(text))


def _exit_if_orphaned(parent: int, joined: threading.Event) -> None:
    # Until the group is joined, nothing else notices that the worker that started us is gone (under torchrun the
    # store outlives it); afterwards a lost worker fails a receive at once.
    while not joined.wait(0.5):
        if os.getppid() != parent:
            log.error("the worker process that started this server (pid %d) is gone; exiting", parent)
            os._exit(1)


def _share_cores(card: HostCard, cards: dict[int, HostCard]) -> None:
    """Use this host's cores shared out over its workers and servers (summing and updating are parallel loops)."""
    local = sum(1 for other in cards.values() if other.same_host(card)) or 1
    threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    log.debug("%d processes of the job on this host: %d threads", local, threads)


def main(argv: list[str] | None = None) -> None:
    """Run one server process; exits with ``0`` after ``EXIT`` or the end of the job, ``1`` after a failure."""
    config = ServerConfig.from_json((argv if argv is not None else sys.argv)[1])
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("LP_PS_DEBUG") else logging.INFO,
        format=f"[server rank {config.rank}] %(levelname)s %(message)s",
    )
    torch.set_num_threads(1)
    joined = threading.Event()
    threading.Thread(target=_exit_if_orphaned, args=(os.getppid(), joined), daemon=True).start()
    started = time.monotonic()
    code = 1
    try:
        # Workers of this host try to map this region: where they can, they share memory with this server.
        probe = Region.create(f"probe-r{config.rank}", 1) if shared_memory_available() else None
        card = HostCard.here(probe)
        group, cards = connect_group(
            config.main_address,
            config.main_port,
            config.rank,
            config.num_workers + config.num_servers,
            config.prefix,
            config.join_timeout,
            card,
        )
        joined.set()
        log.debug("joined in %.2fs", time.monotonic() - started)
        _share_cores(card, cards)
        link = open_link(group, config.rank, config.join_timeout, cards, config.num_workers)
        server = ParameterServer(link, config.num_workers, config.num_servers)
        try:
            server.serve()
            code = 0
        except Exception as error:  # any failure stops the job: tell the workers why
            log.error("%s: %s", type(error).__name__, error)
            server.abort(error)
    except Exception as error:
        log.error("could not join the job: %s: %s", type(error).__name__, error)
    if code:
        log.error("exiting with code %d", code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # receiver threads may still block on a peer


if __name__ == "__main__":
    main()
