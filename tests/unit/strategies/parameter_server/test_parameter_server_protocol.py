"""The worker/server protocol in one process: servers and workers in threads over an in-memory transport.

Fast and deterministic checks of what the multi-process tests show end to end: averaging with presence masks,
server-side clipping and inf checks over several servers, hyperparameters following the workers, the stale-synchronous
bound, optimizer state moved between server counts, failures reported by name, and messages that are refused.
"""

from __future__ import annotations

import datetime
import pickle
import queue
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_patterns.exceptions import PeerFailedError, PeerLostError
from lightning_patterns.strategies.parameter_server.client import WorkerClient
from lightning_patterns.strategies.parameter_server.link import Link
from lightning_patterns.strategies.parameter_server.messages import Exit, Init
from lightning_patterns.strategies.parameter_server.server import ParameterServer


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

    def link(self, rank: int, timeout: float = 5.0) -> Link:
        return Link(_Transport(self, rank), rank, timeout)  # type: ignore[arg-type]

    def channel(self, src: int, dst: int, tag: int) -> queue.Queue[torch.Tensor]:
        with self.lock:
            return self.queues[(src, dst, tag)]


class _Transport:
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
    """Servers running in threads and one client per worker, for one fit."""

    def __init__(
        self,
        num_servers: int,
        update_on: str = "server",
        sync: bool = True,
        max_staleness: int | None = 0,
        optimizer: Callable[[nn.Module], torch.optim.Optimizer] = lambda m: torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.9
        ),
        network: _Network | None = None,
        bucket_bytes: int = 1 << 20,
    ) -> None:
        self.network = network or _Network()
        self.num_servers = num_servers
        self.errors: list[BaseException] = []
        self.servers = [
            ParameterServer(self.network.link(WORKERS + s), WORKERS, num_servers) for s in range(num_servers)
        ]
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.servers]
        for thread in self.threads:
            thread.start()
        self.models = [_model() for _ in range(WORKERS)]
        self.clients = [
            WorkerClient(
                self.network.link(rank),
                optimizer(model),
                update_on=update_on,
                world_size=WORKERS,
                num_servers=num_servers,
                sync=sync,
                max_staleness=max_staleness,
                chunk_bytes=16,
                timeout=5.0,
                bucket_bytes=bucket_bytes,
                first_bucket_bytes=bucket_bytes,
            )
            for rank, model in enumerate(self.models)
        ]
        for client in self.clients:
            client.start()

    def _serve(self, server: ParameterServer) -> None:
        try:
            server.serve()
        except (PeerLostError, RuntimeError, ValueError) as error:
            self.errors.append(error)
            server.abort(error)

    def set_grads(self, rank: int, seed: int, skip: tuple[int, ...] = ()) -> None:
        generator = torch.Generator().manual_seed(seed)
        for index, param in enumerate(self.models[rank].parameters()):
            grad = torch.randn(param.shape, generator=generator)
            param.grad = None if index in skip else grad

    def in_parallel(self, step: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * WORKERS
        failures: list[BaseException] = []

        def run(rank: int) -> None:
            try:
                results[rank] = step(rank)
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10.0)
        if failures:
            raise failures[0]
        return results

    def close(self) -> None:
        for client in self.clients:
            if not client.finished:
                client.end()
        for server in range(self.num_servers):
            self.network.link(0).send(Exit(), WORKERS + server)
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
        if not job.errors:
            job.close()


def _reference_step(job: _Job, step: int, optimizer: torch.optim.Optimizer, reference: nn.Module) -> None:
    grads = []
    for rank in range(WORKERS):
        job.set_grads(rank, seed=100 * step + rank)
        grads.append([p.grad for p in job.models[rank].parameters()])
    for param, *per_worker in zip(reference.parameters(), *grads, strict=True):
        param.grad = torch.stack(per_worker).mean(0)
    optimizer.step()


@pytest.mark.parametrize("num_servers", [1, 2, 3])
def test_server_placement_step_equals_one_optimizer_step_on_the_mean_gradient(
    job_factory: Callable[..., _Job], num_servers: int
) -> None:
    job = job_factory(num_servers)
    reference = _model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        _reference_step(job, step, optimizer, reference)
        for rank in range(WORKERS):
            job.set_grads(rank, seed=100 * step + rank)
        job.in_parallel(lambda rank: job.clients[rank].step_on_servers(0.0, True, False, False))
    for model in job.models:
        for actual, expected in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(actual, expected)
    assert all(len(client.optimizer.state) == 0 for client in job.clients)
    # The state gathered from the servers is the reference optimizer's.
    gathered = job.clients[0].gather_state()
    for index, state in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(gathered["state"][index]["momentum_buffer"], state["momentum_buffer"])


def test_worker_placement_hands_back_the_average_and_keeps_none_where_no_worker_had_a_gradient(
    job_factory: Callable[..., _Job],
) -> None:
    """Parameter 1 has a gradient on rank 0 only (DDP: half of it everywhere); parameter 3 on nobody (stays None)."""
    job = job_factory(2, update_on="worker")
    job.set_grads(0, seed=1, skip=(3,))
    job.set_grads(1, seed=2, skip=(1, 3))
    expected = [
        (a.grad + b.grad) / 2 if b.grad is not None else (a.grad / 2 if a.grad is not None else None)
        for a, b in zip(job.models[0].parameters(), job.models[1].parameters(), strict=True)
    ]
    losses = job.in_parallel(lambda rank: job.clients[rank].sum_gradients(loss=1.0 + rank))
    assert losses == [1.5, 1.5]
    for model in job.models:
        for param, grad in zip(model.parameters(), expected, strict=True):
            if grad is None:
                assert param.grad is None
            else:
                torch.testing.assert_close(param.grad, grad)
    assert all(len(s.deferred) == 0 for s in job.servers)


def test_a_parameter_without_gradient_is_skipped_by_the_servers_optimizer(job_factory: Callable[..., _Job]) -> None:
    """AdamW would decay a zero-pushed parameter: a parameter no worker has a gradient for must not move."""
    job = job_factory(2, optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5))
    before = [p.detach().clone() for p in job.models[0].parameters()]
    for rank in range(WORKERS):
        job.set_grads(rank, seed=rank, skip=(2,))
    job.in_parallel(lambda rank: job.clients[rank].step_on_servers(0.0, True, False, False))
    after = list(job.models[0].parameters())
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    assert not torch.equal(after[0], before[0])
    assert 2 not in job.clients[0].gather_state()["state"]


def test_servers_clip_by_the_norm_of_the_average_over_all_of_them(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(2, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    reference = _model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=1.0)
    grads = []
    for rank in range(WORKERS):
        job.set_grads(rank, seed=10 + rank)
        grads.append([p.grad.clone() for p in job.models[rank].parameters()])  # type: ignore[union-attr]
    for param, *per_worker in zip(reference.parameters(), *grads, strict=True):
        param.grad = torch.stack(per_worker).mean(0)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3)
    assert total > 0.3, "the test must clip"
    optimizer.step()
    job.in_parallel(lambda rank: job.clients[rank].step_on_servers(0.3, True, False, False))
    for actual, expected in zip(job.models[0].parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(actual, expected)


def test_an_inf_on_one_server_skips_the_step_on_every_server(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(2)
    before = [p.detach().clone() for p in job.models[0].parameters()]
    for rank in range(WORKERS):
        job.set_grads(rank, seed=rank)
    job.models[1][2].bias.grad[0] = float("inf")  # type: ignore[index]  # the last tensor: on server 1 only
    skipped = job.in_parallel(lambda rank: job.clients[rank].step_on_servers(0.0, True, True, False))
    assert skipped == [True, True]
    for actual, expected in zip(job.models[0].parameters(), before, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_hyperparameters_follow_the_workers_and_must_agree(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=0.1, betas=(0.9, 0.99)))
    for client in job.clients:
        client.optimizer.param_groups[0]["betas"] = (0.5, 0.9)
        client.optimizer.param_groups[0]["lr"] = 0.01
    for rank in range(WORKERS):
        job.set_grads(rank, seed=rank)
    job.in_parallel(lambda rank: job.clients[rank].step_on_servers(0.0, True, False, False))
    group = job.servers[0].fit.placement.optimizer.param_groups[0]  # type: ignore[union-attr]
    assert (group["lr"], group["betas"]) == (0.01, (0.5, 0.9))
    job.clients[1].optimizer.param_groups[0]["lr"] = 0.02  # rank 1's scheduler went its own way
    with pytest.raises(PeerFailedError, match=r"param group 0's 'lr' \(0.01 against 0.02\)"):
        job.in_parallel(lambda rank: job.clients[rank].step_on_servers(0.0, True, False, False))
    assert "sync_dist=True" in str(job.errors[0])


def test_state_moves_between_server_counts(job_factory: Callable[..., _Job]) -> None:
    first = job_factory(2)
    for rank in range(WORKERS):
        first.set_grads(rank, seed=rank)
    first.in_parallel(lambda rank: first.clients[rank].step_on_servers(0.0, True, False, False))
    state = first.clients[0].gather_state()
    second = job_factory(3)
    second.clients[0].load_state(state)
    gathered = second.clients[0].gather_state()
    assert gathered["state"].keys() == state["state"].keys()
    for index, entry in state["state"].items():
        torch.testing.assert_close(gathered["state"][index], entry)


def test_stale_synchronous_bound_holds_a_fast_worker_back(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1, sync=False, max_staleness=1)
    fast, slow = job.clients
    job.set_grads(0, seed=1)
    fast.step_on_servers(0.0, True, False, False)  # one step ahead of the slowest: allowed
    job.set_grads(0, seed=2)
    second = threading.Thread(target=fast.step_on_servers, args=(0.0, True, False, False))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "two steps ahead of the slowest must wait"
    job.set_grads(1, seed=3)
    slow.step_on_servers(0.0, True, False, False)
    second.join(5.0)
    assert not second.is_alive()
    # The slow worker's gradient was computed before both of the fast worker's updates.
    assert slow.telemetry.staleness == 2
    assert fast.telemetry.max_staleness_seen <= 1


def test_fully_async_never_waits_and_skips_what_the_worker_flags(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(2, sync=False, max_staleness=None)
    for seed in range(5):
        job.set_grads(0, seed=seed)
        job.clients[0].step_on_servers(0.0, True, False, False)
    job.set_grads(1, seed=9)
    before = [p.detach().clone() for p in job.models[0].parameters()]
    assert job.clients[1].step_on_servers(0.0, True, False, skip=True)  # inf on this worker: not applied
    assert job.clients[1].telemetry.staleness == 5
    for actual, expected in zip(job.models[1].parameters(), before, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_lost_worker_is_named_to_the_others(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1)
    job.set_grads(0, seed=0)
    failure: list[BaseException] = []

    def push() -> None:
        try:
            job.clients[0].step_on_servers(0.0, True, False, False)
        except PeerLostError as error:
            failure.append(error)

    waiting = threading.Thread(target=push)
    waiting.start()
    time.sleep(0.2)
    job.network.dead.add(1)  # worker 1 dies before pushing
    waiting.join(5.0)
    assert not waiting.is_alive()
    assert "because rank 1 failed or was lost" in str(failure[0])
    assert "Lost rank 1" in str(job.errors[0])


def test_a_failed_worker_stops_the_others_with_its_error(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(2, update_on="worker")
    job.set_grads(0, seed=0)
    waiting = threading.Thread(target=lambda: failure.append(_catch(lambda: job.clients[0].sum_gradients(0.0))))
    failure: list[BaseException | None] = []
    waiting.start()
    job.clients[1].fail(ValueError("bad batch on rank 1"), timeout=1.0)
    waiting.join(5.0)
    assert isinstance(failure[0], PeerFailedError)
    assert "Worker rank 1 failed: ValueError: bad batch on rank 1" in str(failure[0])


def _catch(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as error:
        return error
    return None


def test_servers_serve_fit_after_fit_and_exit_when_asked() -> None:
    network = _Network()
    first = _Job(1, update_on="worker", network=network)
    first.set_grads(0, seed=0)
    first.set_grads(1, seed=1)
    first.in_parallel(lambda rank: first.clients[rank].sum_gradients(0.0))
    first.clients[0].end()  # rank 0 ends and at once starts another fit, before rank 1's END arrives
    server = first.servers[0]
    clients = [
        WorkerClient(network.link(r), torch.optim.SGD(m.parameters()), "server", WORKERS, 1, True, 0, None, 5.0)
        for r, m in enumerate(first.models)
    ]
    starting = threading.Thread(target=clients[0].start)
    starting.start()
    time.sleep(0.2)
    assert starting.is_alive(), "the next fit waits for the last one to end"
    first.clients[1].end()
    starting.join(5.0)
    assert not starting.is_alive()
    assert server.fit is not None
    assert server.fit.spec.placement == "server"
    for client in clients:
        client.end()
    network.link(0).send(Exit(), WORKERS)
    first.threads[0].join(5.0)
    assert not first.threads[0].is_alive()
    assert not first.errors


def test_a_pickle_instead_of_json_is_refused_and_never_loaded(tmp_path: Path) -> None:
    """A process that reaches a server's port cannot make it run code: pickles are not decoded, ever."""
    network = _Network()
    server = ParameterServer(network.link(WORKERS), WORKERS, 1)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve()
        except ValueError as error:
            errors.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    marker = tmp_path / "pwned"
    crafted = pickle.dumps(_Exploit(str(marker)))
    payload = torch.frombuffer(bytearray(crafted), dtype=torch.uint8)
    network.link(0).send(Init(payload.numel()), WORKERS, {"json": payload})
    thread.join(5.0)
    assert not marker.exists()
    assert "INIT from rank 0 is not UTF-8 JSON" in str(errors[0])
    assert "never pickles" in str(errors[0])
    # The same bytes, announced as anything else a server decodes, fare no better.
    assert "not UTF-8 JSON" in str(_catch(lambda: _decode_fail(crafted)))


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _decode_fail(data: bytes) -> None:
    from lightning_patterns.strategies.parameter_server.messages import decode_json

    decode_json(torch.frombuffer(bytearray(data), dtype=torch.uint8), "FAIL from rank 1")


def test_end_before_the_round_completes_is_an_error(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1, update_on="worker")
    job.set_grads(0, seed=0)
    waiting = threading.Thread(target=lambda: failure.append(_catch(lambda: job.clients[0].sum_gradients(0.0))))
    failure: list[BaseException | None] = []
    waiting.start()
    time.sleep(0.1)
    job.clients[1].end()
    waiting.join(5.0)
    assert "ended its fit while ranks [0] wait in a synchronous step" in str(failure[0])


def test_an_unknown_message_kind_is_refused(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(1)
    job.network.channel(1, WORKERS, 11).put(torch.full((12,), 99.0, dtype=torch.float64))  # a header of kind 99
    job.threads[0].join(5.0)
    assert "Rank 1 sent a message of unknown kind 99.0" in str(job.errors[0])


def _hooked(job: _Job) -> None:
    """Gradient hooks as the strategy registers them: each accumulated gradient may complete a bucket."""
    for client in job.clients:
        for index, param in enumerate(client.params):
            param.register_post_accumulate_grad_hook(lambda _, c=client, i=index: c.grad_ready(i))


def _backward(job: _Job, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 3, generator=generator), torch.randn(5, 2, generator=generator)
    job.models[rank].zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(job.models[rank](x), y).backward()


def test_buckets_are_pushed_while_backward_runs_and_the_average_comes_back(job_factory: Callable[..., _Job]) -> None:
    job = job_factory(2, update_on="worker", bucket_bytes=20)  # several buckets per server
    _hooked(job)
    pushed_during_backward: list[int] = []
    expected = []
    for rank in range(WORKERS):
        _backward(job, rank, seed=rank)
        expected.append([p.grad.clone() for p in job.models[rank].parameters()])  # type: ignore[union-attr]

    def step(rank: int) -> float:
        client = job.clients[rank]
        client.begin_round(loss=float(rank))
        _backward(job, rank, seed=rank)
        pushed_during_backward.append(len(client.pushed))
        client.end_backward()
        return client.sum_gradients(float(rank))

    assert job.in_parallel(step) == [0.5, 0.5]
    buckets = sum(len(b) for b in job.clients[0].buckets)
    assert buckets > job.num_servers
    assert pushed_during_backward == [buckets, buckets], "every bucket left during backward"
    for model in job.models:
        for param, a, b in zip(model.parameters(), *expected, strict=True):
            torch.testing.assert_close(param.grad, (a + b) / 2)


def test_a_gradient_changed_after_its_push_is_pushed_again(job_factory: Callable[..., _Job]) -> None:
    """A hook that edits gradients after backward (the push already left): the servers apply the edited ones."""
    job = job_factory(1, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    _hooked(job)
    before = [p.detach().clone() for p in job.models[0].parameters()]
    grads: list[list[torch.Tensor]] = []

    def step(rank: int) -> bool:
        client = job.clients[rank]
        client.begin_round()
        _backward(job, rank, seed=rank)
        client.end_backward()
        with torch.no_grad():
            job.models[rank][2].bias.grad.mul_(10.0)  # type: ignore[union-attr]
        grads.append([p.grad.clone() for p in job.models[rank].parameters()])  # type: ignore[union-attr]
        return client.step_on_servers(0.0, True, False, False)

    job.in_parallel(step)
    for param, start, *per_worker in zip(job.models[0].parameters(), before, *grads, strict=True):
        torch.testing.assert_close(param, start - torch.stack(per_worker).mean(0))


def test_parameters_arrive_while_the_next_step_reads_them(job_factory: Callable[..., _Job]) -> None:
    """After a commit the worker goes on; its first read of a parameter waits for that parameter's bucket."""
    job = job_factory(2, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5), bucket_bytes=20)
    reference = _model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    _reference_step(job, 0, optimizer, reference)
    outputs: list[torch.Tensor] = []

    def step(rank: int) -> None:
        client = job.clients[rank]
        job.set_grads(rank, seed=rank)
        client.commit(0.0, True, False, False)
        client.defer()
        assert any(client.outstanding) or rank == 1, "nothing is awaited until something reads a parameter"
        outputs.append(job.models[rank](torch.ones(1, 3)))
        client.settle()
        assert not any(client.outstanding)

    job.in_parallel(step)
    expected = reference(torch.ones(1, 3))
    for output in outputs:
        torch.testing.assert_close(output, expected)
    assert torch.overrides._get_current_function_mode() is None  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("update_on", "second", "match"),
    [
        ("worker", "again", r"Rank 1 pushed a bucket twice in one round \(bucket 0\)"),
        ("worker", "replace", "Rank 1 replaced bucket 0, but update_on='worker' sums each bucket as it arrives"),
        ("server", "commit", r"Rank 1 committed step 0 without pushing buckets \[1, 2, "),
    ],
)
def test_pushes_out_of_protocol_are_refused(
    job_factory: Callable[..., _Job], update_on: str, second: str, match: str
) -> None:
    from lightning_patterns.strategies.parameter_server.messages import Commit, Push, PushFlags, dtype_code

    job = job_factory(1, update_on=update_on, bucket_bytes=20)
    assert len(job.clients[1].buckets[0]) > 1
    numel = job.clients[1].buckets[0][0].numel
    push = Push(bucket=0, offset=0, numel=numel, dtype=dtype_code(torch.float32))
    link = job.network.link(1)
    link.send(push, WORKERS, {"grad": torch.zeros(numel)})
    if second == "commit":
        link.send(Commit(step=0), WORKERS)
    else:
        flags = int(PushFlags.REPLACE) if second == "replace" else 0
        link.send(Push(**{**push.__dict__, "flags": flags}), WORKERS, {"grad": torch.zeros(numel)})
    job.threads[0].join(5.0)
    assert job.errors
    assert re.search(match, str(job.errors[0]))
