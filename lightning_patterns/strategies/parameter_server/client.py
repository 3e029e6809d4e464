"""The worker's side of the protocol: push gradients, pull parameters, move optimizer state.

A worker keeps its optimizer only as a proxy: its ``param_groups`` carry the hyperparameters (and the
learning rate that schedulers change, sent with every push), its ``state`` stays empty. The servers
run the same optimizer class on their chunks.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.messages import (
    BASE_FIELDS,
    Header,
    Kind,
    P2PGroup,
    recv_header,
    recv_object,
    recv_tensor,
    send_header,
    send_object,
    send_tensor,
)
from lightning_patterns.strategies.parameter_server.partition import Chunk, partition_parameters, server_loads
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry

__all__ = ["WorkerClient"]


class WorkerClient:
    """Talks to the servers for one worker.

    Args:
        pg: the gloo group of workers and servers.
        optimizer: the worker's optimizer, from ``configure_optimizers``.
        num_workers: number of workers.
        num_servers: number of servers.
        global_rank: this worker's global rank.
        chunk_bytes: the most bytes per chunk (``None``: no limit).
        timeout: seconds any wait may take.
    """

    def __init__(
        self,
        pg: P2PGroup,
        optimizer: torch.optim.Optimizer,
        num_workers: int,
        num_servers: int,
        global_rank: int,
        chunk_bytes: int | None,
        timeout: float,
    ) -> None:
        self.pg = pg
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.num_servers = num_servers
        self.rank = global_rank
        self.timeout = timeout
        self.params: list[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        self.group_of: list[int] = [g for g, group in enumerate(optimizer.param_groups) for _ in group["params"]]
        self.num_groups = len(optimizer.param_groups)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(
                "ParameterServerStrategy needs every optimized parameter to have one dtype, got "
                f"{sorted(map(str, dtypes))}. Convert the model to one dtype (for example `model.float()`) or use a "
                "precision plugin that does."
            )
        if any(not p.is_contiguous() for p in self.params):
            raise ValueError("ParameterServerStrategy needs contiguous parameters; call `.contiguous()` on them.")
        self.dtype = self.params[0].dtype
        itemsizes = [p.element_size() for p in self.params]
        self.chunks = partition_parameters([p.numel() for p in self.params], itemsizes, num_servers, chunk_bytes)
        self.by_server: list[list[Chunk]] = [[c for c in self.chunks if c.server == s] for s in range(num_servers)]
        numels = [sum(c.numel for c in chunks) for chunks in self.by_server]
        # Host buffers per server, reused every step: gloo sends and receives from CPU memory.
        self.send_buffers = [torch.empty(n, dtype=self.dtype) for n in numels]
        self.buffers = [torch.empty(n, dtype=self.dtype) for n in numels]
        self.header_bytes = (BASE_FIELDS + self.num_groups) * 8  # a header is float64 values
        self.versions = [0] * num_servers
        self.telemetry = ParameterServerTelemetry(
            num_servers=num_servers, partition_bytes=server_loads(self.chunks, itemsizes, num_servers)
        )
        self.initialized = False
        self.shut_down = False
        self._last_pull_end = time.perf_counter()

    def server_rank(self, server: int) -> int:
        """Global rank of server ``server``."""
        return self.num_workers + server

    # -- start and stop ----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Rank 0 sends each server its chunks and the optimizer spec; every worker pulls the parameters."""
        if self.rank == 0:
            groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            for server, chunks in enumerate(self.by_server):
                # send_object pickles the spec at once, so sending the reused buffer is safe.
                spec = {
                    "optimizer_class": type(self.optimizer),
                    "defaults": dict(self.optimizer.defaults),
                    "groups": groups,
                    "chunks": [(c.tensor, c.start, c.stop) for c in chunks],
                    "chunk_groups": [self.group_of[c.tensor] for c in chunks],
                    "values": self._gather(server, grads=False),
                }
                send_object(self.pg, Kind.INIT, spec, self.server_rank(server), 0, self.timeout)
        self.initialized = True
        self.pull()

    def pull(self) -> None:
        """Replace the local parameters with the servers' current ones."""
        for server in range(self.num_servers):
            send_header(self.pg, Header(Kind.PULL), self.server_rank(server), self.num_groups, self.timeout)
        for server in range(self.num_servers):
            self._receive_params(server)
        self._last_pull_end = time.perf_counter()

    def pause(self) -> None:
        """Tell the servers not to expect pushes for a while (validation, checkpointing)."""
        for server in range(self.num_servers):
            send_header(self.pg, Header(Kind.PAUSE), self.server_rank(server), self.num_groups, self.timeout)

    def shutdown(self, timeout: float) -> None:
        """Tell the servers this worker is done (best effort: a lost server is skipped)."""
        if self.shut_down or (not self.initialized and self.rank != 0):
            return
        self.shut_down = True
        groups = self.num_groups if self.initialized else 0
        for server in range(self.num_servers):
            try:
                send_header(self.pg, Header(Kind.SHUTDOWN), self.server_rank(server), groups, timeout)
            except PeerLostError:
                continue

    # -- one step ----------------------------------------------------------------------------------------
    def push_pull(self) -> None:
        """Push this worker's gradients to their servers and pull the updated parameters."""
        start = time.perf_counter()
        compute = start - self._last_pull_end
        lrs = tuple(float(group["lr"]) for group in self.optimizer.param_groups)
        pushed = [0] * self.num_servers
        pulled = [0] * self.num_servers
        step = self.telemetry.steps
        for server in range(self.num_servers):
            grad = self._gather(server, grads=True)
            header = Header(Kind.PUSH, step=step, version=self.versions[server], numel=grad.numel(), lrs=lrs)
            dst = self.server_rank(server)
            pushed[server] = send_header(self.pg, header, dst, self.num_groups, self.timeout) + send_tensor(
                self.pg, grad, dst, self.timeout
            )
        staleness = 0
        for server in range(self.num_servers):
            received, header = self._receive_params(server)
            pulled[server] = received
            staleness = max(staleness, header.version)
        end = time.perf_counter()
        self._last_pull_end = end
        self.telemetry.record_step(pushed, pulled, end - start, compute, staleness)

    def _gather(self, server: int, grads: bool) -> torch.Tensor:
        """Copy ``server``'s chunks of the gradients (or of the parameters) into its send buffer; return it.

        The buffer is reused: every send waits for completion before returning, so it is free again by the next call.
        """
        buffer = self.send_buffers[server]
        offset = 0
        with torch.no_grad():
            for c in self.by_server[server]:
                param = self.params[c.tensor]
                source = param.grad if grads else param.detach()
                piece = buffer[offset : offset + c.numel]
                if source is None:  # no gradient this step (unused parameter): push zeros
                    piece.zero_()
                else:
                    piece.copy_(source.reshape(-1)[c.start : c.stop])
                offset += c.numel
        return buffer

    def _expect(self, server: int, kinds: tuple[Kind, ...]) -> Header:
        src = self.server_rank(server)
        header = recv_header(self.pg, src, self.num_groups, self.timeout)
        if header.kind == Kind.ABORT:
            raise PeerLostError(
                f"Worker rank {self.rank}: server rank {src} reports that rank {header.lost} was lost; "
                f"training cannot continue. Check the log of rank {header.lost}."
            )
        if header.kind not in kinds:
            raise RuntimeError(f"Worker rank {self.rank} expected {kinds} from rank {src}, got {header.kind.name}.")
        return header

    def _receive_params(self, server: int) -> tuple[int, Header]:
        header = self._expect(server, (Kind.PARAMS,))
        buffer = self.buffers[server]
        received = self.header_bytes + recv_tensor(self.pg, buffer, self.server_rank(server), self.timeout)
        self.versions[server] = header.step
        offset = 0
        with torch.no_grad():
            for c in self.by_server[server]:
                param = self.params[c.tensor]
                param.view(-1)[c.start : c.stop].copy_(buffer[offset : offset + c.numel])
                offset += c.numel
        return received, header

    # -- optimizer state ---------------------------------------------------------------------------------
    def gather_state(self) -> dict[str, Any]:
        """The optimizer's ``state_dict`` as a single-process optimizer would have it, assembled from servers."""
        state: dict[int, dict[str, Any]] = {}
        for server, chunks in enumerate(self.by_server):
            send_header(self.pg, Header(Kind.GET_STATE), self.server_rank(server), self.num_groups, self.timeout)
            header = self._expect(server, (Kind.STATE,))
            reply = recv_object(self.pg, header, self.server_rank(server), self.timeout)
            for c, chunk_state in zip(chunks, reply["state"], strict=True):
                param = self.params[c.tensor]
                full = state.setdefault(c.tensor, {})
                for key, value in chunk_state.items():
                    if isinstance(value, torch.Tensor) and value.dim() >= 1:
                        if key not in full:
                            full[key] = torch.zeros(param.numel(), dtype=value.dtype)
                        full[key][c.start : c.stop] = value
                    else:
                        full[key] = value
        for index, full in state.items():
            shape = self.params[index].shape
            for key, value in full.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1:
                    full[key] = value.reshape(shape)
        state_dict = self.optimizer.state_dict()
        state_dict["state"] = dict(sorted(state.items()))
        return state_dict

    def load_state(self, state_dict: dict[str, Any]) -> None:
        """Split a single-process optimizer ``state_dict`` over the servers (any number of them)."""
        state = state_dict["state"]
        for server, chunks in enumerate(self.by_server):
            per_chunk = []
            for c in chunks:
                full = state.get(c.tensor, {})
                # Servers keep their state in host memory, whichever device the checkpoint was saved from.
                per_chunk.append(
                    {
                        key: value.reshape(-1)[c.start : c.stop].to("cpu", copy=True)
                        if isinstance(value, torch.Tensor) and value.dim() >= 1
                        else value
                        for key, value in full.items()
                    }
                )
            send_object(
                self.pg, Kind.SET_STATE, {"state": per_chunk}, self.server_rank(server), self.num_groups, self.timeout
            )
            self._expect(server, (Kind.ACK,))
