"""``ParameterServerStrategy``: the parameter-server pattern as a Lightning strategy.

Workers are Lightning's processes (``devices × num_nodes``, global ranks ``0 .. W-1``) and form
Lightning's default process group, so Lightning's own collectives (``barrier``, ``broadcast``,
``self.log(..., sync_dist=True)``, torchmetrics) involve workers only. Workers and ``num_servers``
server processes (ranks ``W .. W+S-1``) also join a second, gloo group of ``W + S`` ranks created from the
same rendezvous store; parameter-server messages are point-to-point sends and receives on it.
Parameters are partitioned over the servers in byte-balanced chunks; each step a worker pushes its
gradient chunks and pulls the updated parameters.

Gradient clipping (``gradient_clip_val``) runs on each worker's local, accumulated gradient before the
push, so sync mode averages clipped gradients, whereas DDP clips the average. Without clipping, sync mode
equals single-process training on the concatenated batch.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing.process
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor
from torch.distributed.distributed_c10d import ReduceOp
from torch.optim import Optimizer
from typing_extensions import override

from lightning_patterns import _lightning
from lightning_patterns.exceptions import PeerLostError
from lightning_patterns.strategies.parameter_server.client import WorkerClient
from lightning_patterns.strategies.parameter_server.launcher import servers_on_node, start_servers, stop_servers
from lightning_patterns.strategies.parameter_server.messages import P2PGroup, connect_group
from lightning_patterns.strategies.parameter_server.server import ServerConfig, is_sync, join_timeout
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.strategies.parallel import ParallelStrategy as _ParallelStrategy
    from pytorch_lightning.strategies.strategy import TBroadcast
else:
    _ParallelStrategy = object
    TBroadcast = Any

__all__ = ["ParameterServerStrategy"]

# `ParameterServerStrategy` is `_ParameterServerStrategy` built for the Lightning package in use.
__getattr__ = _lightning.class_getter(__name__, __all__)

log = logging.getLogger(__name__)

_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_GROUPS_CREATED = 0  # worker-and-server groups this process has joined


def _raise_on_local_sigterm(trainer: pl.Trainer, exception: type[BaseException]) -> None:
    if getattr(trainer, "received_sigterm", False):
        raise exception()


class _ParameterServerStrategy(_ParallelStrategy):
    """Train an unchanged LightningModule with parameter servers.

    Built for each Lightning package as ``ParameterServerStrategy`` (see :mod:`lightning_patterns._lightning`):
    ``lightning_patterns.strategies.ParameterServerStrategy`` is the one of the package in use.

    Args:
        num_servers: number of server processes. Server ``s`` runs on node ``s % num_nodes``.
        mode: ``"sync"`` averages all workers' gradients before each update (equal to single-process
            training on the concatenated batch); ``"async"`` applies each worker's push on arrival (scaled by
            ``1 / num_workers``), bounded by ``max_staleness``.
        max_staleness: for ``"async"``: no worker runs more than this many steps ahead of the slowest
            (stale-synchronous parallel). ``0`` is exactly ``"sync"``; ``None`` is fully asynchronous.
        timeout: seconds any wait may take; a peer silent for longer while it should talk, or one whose
            connection drops, stops every process with :class:`~lightning_patterns.exceptions.PeerLostError`.
            It must exceed the longest gap between two optimizer steps of the slowest worker.
        chunk_bytes: the most bytes in one partition chunk (``None``: chunks end only at tensor and server
            boundaries).
        process_group_backend: backend of the workers' group: ``"gloo"`` (default on CPU) or ``"nccl"`` (default
            on GPU). Parameter-server messages always travel on gloo, from CPU buffers.
        start_method: how Lightning starts the workers on one machine, as for ``DDPStrategy``.
        accelerator: set by the Trainer.
        parallel_devices: set by the Trainer.
        cluster_environment: set by the Trainer (torchrun, SLURM, ...).
        checkpoint_io: set by the Trainer.
        precision_plugin: set by the Trainer.
    """

    strategy_name = "parameter_server"
    #: The Lightning package this class was built for (set on each built class).
    _lp_tree: ClassVar[_lightning.Tree]

    def __init__(
        self,
        num_servers: int = 1,
        mode: Literal["sync", "async"] = "sync",
        max_staleness: int | None = 0,
        timeout: float = 60.0,
        chunk_bytes: int | None = None,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 1:
            raise ValueError(f"`num_servers` must be an integer >= 1, got num_servers={num_servers!r}.")
        if mode not in ("sync", "async"):
            raise ValueError(f"`mode` must be 'sync' or 'async', got mode={mode!r}.")
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise ValueError(
                f"`max_staleness` must be None or an integer >= 0, got max_staleness={max_staleness!r}. "
                "Use 0 for synchronous steps, None for fully asynchronous training."
            )
        if not timeout > 0:
            raise ValueError(f"`timeout` must be a positive number of seconds, got timeout={timeout!r}.")
        if chunk_bytes is not None and chunk_bytes < 1:
            raise ValueError(f"`chunk_bytes` must be None or >= 1, got chunk_bytes={chunk_bytes!r}.")
        if start_method not in _START_METHODS:
            raise ValueError(f"`start_method` must be one of {_START_METHODS}, got start_method={start_method!r}.")
        self.num_servers = num_servers
        self.mode = mode
        self.max_staleness = max_staleness
        self.timeout = float(timeout)
        self.chunk_bytes = chunk_bytes
        self._process_group_backend = process_group_backend
        self._start_method = start_method
        self._num_nodes = 1
        self._servers: list[multiprocessing.process.BaseProcess] = []
        self._client: WorkerClient | None = None
        self._ps_group: P2PGroup | None = None
        self._telemetry: ParameterServerTelemetry | None = None

    # -- topology ----------------------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        """Number of machines."""
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        """Workers per node."""
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def num_workers(self) -> int:
        """Workers in all (``num_nodes × devices``)."""
        return self.num_nodes * self.num_processes

    @property
    def is_distributed(self) -> bool:
        """Always: the Trainer must shard data over the workers."""
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_workers, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str | None:
        """The ``torch.distributed`` backend in use."""
        return self._process_group_backend

    @property
    def telemetry(self) -> ParameterServerTelemetry | None:
        """This worker's communication counters of the current or last fit (``None`` before the first)."""
        return self._telemetry

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            launcher = self._internal("pl:strategies.launchers:_SubprocessScriptLauncher")
            self._launcher = launcher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            launcher = self._internal("pl:strategies.launchers:_MultiProcessingLauncher")
            self._launcher = launcher(self, start_method=self._start_method)

    def _internal(self, spec: str) -> Any:
        return _lightning.internal(self._lp_tree, spec)

    # -- process group -----------------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.setup_distributed()

    def set_world_ranks(self) -> None:
        """Workers keep Lightning's ranks; servers come after them."""
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        # Both Lightning packages re-export this one `rank_zero_only`; `rank_zero_*` functions read its flag.
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    def _get_process_group_backend(self) -> str:
        default = self._internal("fabric:utilities.distributed:_get_default_process_group_backend_for_device")
        return self._process_group_backend or default(self.root_device)

    def setup_distributed(self) -> None:
        """Start this node's servers, join Lightning's workers-only group, then the workers-and-servers group."""
        self._lp_tree.fabric("utilities.seed").reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        fitting = self.lightning_module is None or self.lightning_module.trainer.state.fn == "fit"
        address, port = self.cluster_environment.main_address, self.cluster_environment.main_port
        global _GROUPS_CREATED
        # Every process runs the same sequence of fits, so this names the same group everywhere.
        prefix = f"lightning_patterns/parameter_server/{_GROUPS_CREATED}"
        _GROUPS_CREATED += 1
        # Only fitting needs servers; evaluation runs on the workers alone.
        if fitting and self.local_rank == 0:
            config = ServerConfig(
                server_index=0,
                num_workers=self.num_workers,
                num_servers=self.num_servers,
                main_address=address,
                main_port=port,
                prefix=prefix,
                timeout=self.timeout,
                mode=self.mode,
                max_staleness=self.max_staleness,
            )
            self._servers = start_servers(config, servers_on_node(self.num_servers, self.num_nodes, self.node_rank))
        # Joining waits for every process to start, which takes longer than a step: give it at least two minutes.
        join_seconds = join_timeout(self.timeout)
        self._internal("fabric:utilities.distributed:_init_dist_connection")(
            self.cluster_environment, self._process_group_backend, timeout=datetime.timedelta(seconds=join_seconds)
        )
        if fitting:
            try:
                self._ps_group = connect_group(
                    address, port, self.global_rank, self.num_workers + self.num_servers, prefix, join_seconds
                )
            except RuntimeError as error:
                dead = [(p.name, p.exitcode) for p in self._servers if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"Server processes this node started exited while joining: {dead}. Their log is above; a "
                        "script that starts training must guard it with `if __name__ == '__main__':`, because "
                        "servers are started with the 'spawn' method, which re-imports the main module."
                    ) from error
                raise
        log.info(
            "rank %d: %d workers (%s) and %d servers (gloo)",
            self.global_rank,
            self.num_workers,
            self._process_group_backend,
            self.num_servers if fitting else 0,
        )

    # -- model and optimizer -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == "fit"
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            self._internal("fabric:utilities.optimizer:_optimizers_to_device")(self.optimizers, self.root_device)
            self._connect()

    def _connect(self) -> None:
        if len(self.optimizers) != 1:
            raise ValueError(
                f"ParameterServerStrategy supports exactly one optimizer, got {len(self.optimizers)}. "
                "Return a single optimizer from `configure_optimizers`."
            )
        assert self.lightning_module is not None
        if not self.lightning_module.automatic_optimization:
            raise ValueError(
                "ParameterServerStrategy needs automatic optimization; set `self.automatic_optimization = True`."
            )
        if self._ps_group is None:
            raise RuntimeError("ParameterServerStrategy: fitting needs servers, but none joined the process group.")
        self._client = WorkerClient(
            self._ps_group,
            self._unwrap(self.optimizers[0]),
            num_workers=self.num_workers,
            num_servers=self.num_servers,
            global_rank=self.global_rank,
            chunk_bytes=self.chunk_bytes,
            timeout=self.timeout,
        )
        self._telemetry = self._client.telemetry
        self._client.connect()

    def _unwrap(self, optimizer: Any) -> Optimizer:
        wrapper = self._lp_tree.module("core.optimizer").LightningOptimizer
        return cast(Optimizer, optimizer._optimizer if isinstance(optimizer, wrapper) else optimizer)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run forward, backward and clipping on the worker, then push the gradient and pull parameters.

        The worker's optimizer never steps, so it holds no state.
        """
        if self._client is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        model = model or self.lightning_module
        assert isinstance(model, self._lp_tree.pl.LightningModule)
        optimizer = self._unwrap(optimizer)
        # `_wrap_closure` runs the closure, `on_before_optimizer_step` and gradient clipping (on the local
        # gradient, as the precision plugin's `optimizer.step(closure)` would).
        result = _lightning.wrap_closure(self._lp_tree, self.precision_plugin, model, optimizer, closure)
        self._client.push_pull()
        # What torch's LR-scheduler wrapper of `optimizer.step` records; schedulers check it.
        _lightning.mark_optimizer_stepped(optimizer)
        self._log_telemetry()
        return result

    def _log_telemetry(self) -> None:
        assert self._telemetry is not None
        model = self.lightning_module
        if model is None or self.global_rank != 0:
            return
        trainer = model.trainer
        # Every Trainer has it (its logger connector sets it; 0 under `barebones=True`, hence the `max`).
        every = max(trainer.log_every_n_steps, 1)  # type: ignore[attr-defined]
        if self._telemetry.steps % every != 0:
            return
        metrics = self._telemetry.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        """On rank 0, the whole optimizer state gathered from the servers, laid out as one process's."""
        if self._client is not None and not self._client.shut_down and self.global_rank == 0:
            return self._client.gather_state()
        return super().optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Keep hyperparameters on the workers and send the state to the servers (any number of them)."""
        for optimizer, state_dict in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            self._unwrap(optimizer).load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
            if self._client is not None and self.global_rank == 0:
                self._client.load_state(state_dict)
        if self._client is not None:
            # No worker may push before the servers hold the restored state (async servers apply pushes at once).
            self.barrier("parameter_server_load_optimizer_state")

    # -- Lightning's collectives, on the workers only -----------------------------------------------------
    def _collective_failed(self, what: str, error: BaseException) -> BaseException:
        others = [r for r in range(self.num_workers) if r != self.global_rank]
        if not others:  # a lone worker lost no one: the error is the collective's own
            return error
        lost = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
        return PeerLostError(
            f"Worker rank {self.global_rank} lost {lost} during {what}: {str(error).splitlines()[0]}. "
            f"Check the log of {lost}; if it is only slow, raise `ParameterServerStrategy(timeout=...)`."
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

    # -- lifecycle ---------------------------------------------------------------------------------------
    @override
    def on_train_start(self) -> None:
        if self._client is None or is_sync(self.mode, self.max_staleness):
            return
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        loop = trainer.fit_loop.epoch_loop
        # Lightning broadcasts a SIGTERM flag from rank 0 before every batch, which would hold every worker in
        # step with rank 0 and defeat asynchronous training. Check this worker's own flag instead; a worker
        # that stops is then seen by the others as a lost peer.
        exception = self._lp_tree.module("utilities.exceptions").SIGTERMException
        _lightning.replace_sigterm_broadcast(self._lp_tree, loop, partial(_raise_on_local_sigterm, trainer, exception))

    @override
    def on_validation_start(self) -> None:
        if self._client is not None and self._client.initialized and not self._client.shut_down:
            self._client.pause()

    @override
    def on_train_end(self) -> None:
        if self._client is not None and not self._client.shut_down:
            # In async mode workers may hold slightly different parameters: end on the servers' values.
            self._client.pull()
            self._client.shutdown(self.timeout)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._stop(grace=0.0)

    def _stop(self, grace: float) -> None:
        if self._client is not None and grace > 0:
            self._client.shutdown(min(grace, self.timeout))
        if self._servers:
            codes = stop_servers(self._servers, grace)
            self._servers = []
            failed = [c for c in codes if c not in (0, None)]
            if failed and grace > 0:
                log.warning("rank %d: server processes exited with codes %s", self.global_rank, codes)

    @override
    def teardown(self) -> None:
        self._stop(grace=min(self.timeout, 10.0))
        self._client = None
        self._ps_group = None
        super().teardown()


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    ParameterServerStrategy = _ParameterServerStrategy
