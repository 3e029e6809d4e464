"""The worker/server protocol in one process: servers and workers in threads over an in-memory network.

Fast and deterministic checks of what the multi-process tests show end to end: sync averaging, the
stale-synchronous bound, optimizer state moved between server counts, and a lost worker reported by name.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.client import WorkerClient
from lightning_patterns.strategies.parameter_server.server import ServerConfig, _ParameterServer


class _Work:
    def __init__(self, wait: Callable[[float], None]) -> None:
        self._wait = wait

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self._wait(timeout.total_seconds() if timeout is not None else 60.0)
        return True


class _Network:
    """Per (source, destination, tag) FIFO queues, like gloo's pairs; a dead rank fails its peers at once."""

    def __init__(self) -> None:
        self.queues: defaultdict[tuple[int, int, int], queue.Queue[torch.Tensor]] = defaultdict(queue.Queue)
        self.dead: set[int] = set()
        self.lock = threading.Lock()

    def group(self, rank: int) -> _Group:
        return _Group(self, rank)

    def channel(self, src: int, dst: int, tag: int) -> queue.Queue[torch.Tensor]:
        with self.lock:
            return self.queues[(src, dst, tag)]


class _Group:
    def __init__(self, network: _Network, rank: int) -> None:
        self.network = network
        self.rank = rank

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        if dst in self.network.dead:
            raise RuntimeError(f"Connection closed by peer (rank {dst})")
        self.network.channel(self.rank, dst, tag).put(tensors[0].clone())
        return _Work(lambda timeout: None)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work:
        channel = self.network.channel(src, self.rank, tag)

        def wait(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while True:
                if src in self.network.dead:
                    raise RuntimeError(f"Connection closed by peer (rank {src})")
                try:
                    tensors[0].copy_(channel.get(timeout=0.01))
                    return
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise RuntimeError("Timed out waiting for recv operation to complete") from None

        return _Work(wait)


WORKERS = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


class _Job:
    """Servers running in threads and one client per worker."""

    def __init__(self, num_servers: int, mode: str = "sync", max_staleness: int | None = 0, momentum: float = 0.9):
        self.network = _Network()
        self.errors: list[BaseException] = []
        self.servers: list[_ParameterServer] = []
        self.threads: list[threading.Thread] = []
        for index in range(num_servers):
            config = ServerConfig(index, WORKERS, num_servers, "127.0.0.1", 0, "test", 5.0, mode, max_staleness)
            server = _ParameterServer(config, self.network.group(config.rank))  # type: ignore[arg-type]
            thread = threading.Thread(target=self._serve, args=(server,), daemon=True)
            thread.start()
            self.servers.append(server)
            self.threads.append(thread)
        self.models = [_model() for _ in range(WORKERS)]
        self.clients = [
            WorkerClient(
                self.network.group(rank),  # type: ignore[arg-type]
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                num_workers=WORKERS,
                num_servers=num_servers,
                global_rank=rank,
                chunk_bytes=16,
                timeout=5.0,
            )
            for rank, model in enumerate(self.models)
        ]
        self.clients[0].connect()
        self.clients[1].connect()

    def _serve(self, server: _ParameterServer) -> None:
        try:
            server.serve()
        except PeerLostError as error:
            self.errors.append(error)
            server.abort(error)

    def set_grads(self, rank: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for param in self.models[rank].parameters():
            param.grad = torch.randn(param.shape, generator=generator)

    def close(self) -> None:
        for client in self.clients:
            client.shutdown(1.0)
        for thread in self.threads:
            thread.join(5.0)


@pytest.fixture
def job_factory() -> Iterator[Callable[..., _Job]]:
    jobs: list[_Job] = []

    def make(*args: Any, **kwargs: Any) -> _Job:
        jobs.append(_Job(*args, **kwargs))
        return jobs[-1]

    yield make
    for job in jobs:
        job.close()


def _push_all(job: _Job, step: int) -> None:
    threads = []
    for rank in range(WORKERS):
        job.set_grads(rank, seed=100 * step + rank)
        threads.append(threading.Thread(target=job.clients[rank].push_pull))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)


@pytest.mark.parametrize("num_servers", [1, 2, 3])
def test_sync_step_equals_one_optimizer_step_on_the_mean_gradient(
    job_factory: Callable[..., _Job], num_servers: int
) -> None:
    job = job_factory(num_servers)
    reference = _model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        _push_all(job, step)
        grads = []
        for rank in range(WORKERS):
            job.set_grads(rank, seed=100 * step + rank)
            grads.append([p.grad for p in job.models[rank].parameters()])
        for param, *per_worker in zip(reference.parameters(), *grads, strict=True):
            param.grad = torch.stack(per_worker).mean(0)
        optimizer.step()
    for model in job.models:
        for actual, expected in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(actual, expected)
    assert all(len(client.optimizer.state) == 0 for client in job.clients)
    # The state gathered from the servers is the reference optimizer's.
    gathered = job.clients[0].gather_state()
    for index, state in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(gathered["state"][index]["momentum_buffer"], state["momentum_buffer"])


def test_state_moves_between_server_counts(job_factory: Callable[..., _Job]) -> None:
    first = job_factory(2)
    _push_all(first, 0)
    state = first.clients[0].gather_state()
    second = job_factory(3)
    second.clients[0].load_state(state)
    assert second.clients[0].gather_state()["state"].keys() == state["state"].keys()
    for index, entry in state["state"].items():
        torch.testing.assert_close(second.clients[0].gather_state()["state"][index], entry)


def test_stale_synchronous_bound_holds_a_fast_worker_back(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1, mode="async", max_staleness=1)
    fast, slow = job.clients
    job.set_grads(0, seed=1)
    fast.push_pull()  # one step ahead of the slowest: allowed
    job.set_grads(0, seed=2)
    second = threading.Thread(target=fast.push_pull)
    second.start()
    second.join(0.5)
    assert second.is_alive(), "two steps ahead of the slowest must wait"
    job.set_grads(1, seed=3)
    slow.push_pull()
    second.join(5.0)
    assert not second.is_alive()
    # The slow worker's gradient was computed before both of the fast worker's updates.
    assert slow.telemetry.staleness == 2
    assert fast.telemetry.max_staleness_seen <= 1


def test_fully_async_never_waits(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(2, mode="async", max_staleness=None)
    for seed in range(5):
        job.set_grads(0, seed=seed)
        job.clients[0].push_pull()
    job.set_grads(1, seed=9)
    job.clients[1].push_pull()
    assert job.clients[1].telemetry.staleness == 5
    assert job.clients[0].telemetry.steps == 5


def test_a_lost_worker_is_named_to_the_others(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1)
    job.set_grads(0, seed=0)
    failure: list[BaseException] = []

    def push() -> None:
        try:
            job.clients[0].push_pull()
        except PeerLostError as error:
            failure.append(error)

    waiting = threading.Thread(target=push)
    waiting.start()
    time.sleep(0.2)
    job.network.dead.add(1)  # worker 1 dies before pushing
    waiting.join(5.0)
    assert not waiting.is_alive()
    assert "rank 1" in str(failure[0])
    assert "rank 1" in str(job.errors[0])
