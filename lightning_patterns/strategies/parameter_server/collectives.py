"""Lightning's collectives of ``ParameterServerStrategy``: on the workers' group only, failures named by rank.

Lightning's default process group holds the workers alone (the servers talk on a group of their own), so
``barrier``, ``broadcast``, ``reduce`` (``self.log(..., sync_dist=True)``) and ``all_gather`` never wait for a server.
A collective that fails because a peer is gone raises :class:`~lightning_patterns.exceptions.PeerLostError` naming
it, with the reason the servers give for stopping the job when a failed worker told them.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import ReduceOp
from typing_extensions import override

from lightning_patterns import _lightning
from lightning_patterns.exceptions import PeerFailedError, PeerLostError
from lightning_patterns.strategies.parameter_server.client import WorkerClient
from lightning_patterns.strategies.parameter_server.server import join_timeout

if TYPE_CHECKING:
    from pytorch_lightning.strategies.parallel import ParallelStrategy as _ParallelStrategy
    from pytorch_lightning.strategies.strategy import TBroadcast
else:
    _ParallelStrategy = object
    TBroadcast = Any

__all__ = ["WorkerCollectives"]


class WorkerCollectives(_ParallelStrategy):
    """Collectives over the workers' group, for a strategy whose ``_client`` talks to the servers."""

    _lp_tree: ClassVar[_lightning.Tree]
    _client: WorkerClient | None
    _process_group_backend: str | None
    timeout: float

    def _internal(self, spec: str) -> Any:
        return _lightning.internal(self._lp_tree, spec)

    def _broadcast(self, tensors: list[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's, one broadcast per dtype and device."""
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        try:
            with torch.no_grad():
                for group in groups.values():
                    flat = torch.cat([t.detach().reshape(-1) for t in group])
                    dist.broadcast(flat, src=0)
                    offset = 0
                    for t in group:
                        t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
                        offset += t.numel()
        except RuntimeError as error:
            raise self._collective_failed("a broadcast of parameters or buffers", error) from error

    def _collective_failed(self, what: str, error: BaseException) -> BaseException:
        others = [r for r in range(self.world_size) if r != self.global_rank]
        if not others:  # a lone worker lost no one: the error is the collective's own
            return error
        lost = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
        message = f"Worker rank {self.global_rank} lost {lost} during {what}: {str(error).splitlines()[0]}."
        # A worker that failed told the servers why, and they tell everyone: ask them before giving up.
        reason = (
            self._client.probe_abort(timeout=3.0) if self._client is not None and not self._client.finished else None
        )
        if reason is not None:
            return PeerFailedError(f"{message} The servers stopped the job because {reason}")
        return PeerLostError(
            f"{message} Check the log of {lost}; if it is only slow, raise `ParameterServerStrategy(timeout=...)`."
        )

    def _on_backend_device(self, tensor: Tensor) -> Tensor:
        # NCCL only moves CUDA tensors: a callback's CPU counter would fail with "No backend type associated
        # with device type cpu", so it travels on this worker's GPU (as Lightning's metrics do).
        if self._process_group_backend == "nccl" and tensor.device.type == "cpu":
            return tensor.to(self.root_device)
        return tensor

    @override
    def barrier(self, name: str | None = None) -> None:
        if not self._internal("fabric:utilities.distributed:_distributed_is_initialized")():
            return
        try:
            if self._process_group_backend == "gloo":
                # A barrier may legitimately wait for a slow rank (rank 0 saving a checkpoint): join-length bound.
                timeout = datetime.timedelta(seconds=join_timeout(self.timeout))
                dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
            else:
                dist.barrier()
        except RuntimeError as error:
            raise self._collective_failed("a barrier", error) from error

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not self._internal("fabric:utilities.distributed:_distributed_is_initialized")():
            return obj
        box = [obj]
        try:
            dist.broadcast_object_list(box, src)
        except RuntimeError as error:
            raise self._collective_failed("a broadcast", error) from error
        return box[0]

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        """Reduce over the workers (never the servers)."""
        if not isinstance(tensor, Tensor):
            return tensor
        try:
            sync = self._internal("fabric:utilities.distributed:_sync_ddp_if_available")
            return cast(Tensor, sync(self._on_backend_device(tensor), group, reduce_op=reduce_op))
        except RuntimeError as error:
            raise self._collective_failed("a reduction", error) from error

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        try:
            gather = self._internal("fabric:utilities.distributed:_all_gather_ddp_if_available")
            return cast(Tensor, gather(self._on_backend_device(tensor), group=group, sync_grads=sync_grads))
        except RuntimeError as error:
            raise self._collective_failed("an all-gather", error) from error
