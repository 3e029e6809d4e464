"""``ParameterServerStrategy``: the parameter-server pattern as a Lightning strategy.

Workers are Lightning's processes (``devices × num_nodes``, global ranks ``0 .. W-1``) and form Lightning's
default process group, so Lightning's own collectives (``barrier``, ``broadcast``, ``self.log(...,
sync_dist=True)``, torchmetrics) involve workers only. Workers and ``num_servers`` server processes (ranks
``W .. W+S-1``) also join a second, gloo group of ``W + S`` ranks created from the same rendezvous store;
parameter-server messages are point-to-point sends and receives on it. Parameters are partitioned over the servers
in byte-balanced chunks; each step a worker pushes its gradient chunks and gets back either the workers' average
(``update_on="worker"``) or the updated parameters (``update_on="server"``).

What DDP does, this strategy does at the same points of Lightning's loop:

- ``update_on="worker"``: gradients are averaged after each backward that ends an accumulation window (DDP's
  reducer), before ``on_after_backward``; a parameter without a gradient on every worker keeps ``grad=None``;
- with ``broadcast_buffers=True`` rank 0's buffers are broadcast before a forward that follows a synchronizing
  training forward (DDP's ``require_forward_param_sync`` rule), and parameters and buffers are broadcast from rank 0
  when a fit starts;
- ``Trainer(sync_batchnorm=True)`` converts BatchNorm layers to ``SyncBatchNorm`` over the workers' group.

``update_on="server"`` additionally moves what DDP's worker would do after the all-reduce to the servers:
hyperparameters, gradient clipping (by the norm over all servers' chunks), the GradScaler's inf/NaN check.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_patterns import _lightning
from lightning_patterns.strategies.parameter_server.buckets import DEFAULT_BUCKET_BYTES
from lightning_patterns.strategies.parameter_server.client import WorkerClient
from lightning_patterns.strategies.parameter_server.collectives import WorkerCollectives
from lightning_patterns.strategies.parameter_server.cost_model import Cluster
from lightning_patterns.strategies.parameter_server.grad_scaler import (
    gradients_finite,
    unscale_gradients,
    update_grad_scaler,
)
from lightning_patterns.strategies.parameter_server.launcher import (
    PendingSession,
    ServerSession,
    ServerStartError,
    SessionKey,
    drop_session,
    reuse_session,
)
from lightning_patterns.strategies.parameter_server.norms import norm_sample
from lightning_patterns.strategies.parameter_server.placement import PLACEMENTS
from lightning_patterns.strategies.parameter_server.planner import Plan, choose_servers, format_plan
from lightning_patterns.strategies.parameter_server.server import is_sync, join_timeout
from lightning_patterns.strategies.parameter_server.shm import HostCard
from lightning_patterns.strategies.parameter_server.sparse.wiring import SparseWiring
from lightning_patterns.strategies.parameter_server.telemetry import ParameterServerTelemetry

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
    from pytorch_lightning.plugins.precision import Precision

    from lightning_patterns.adaptive.noise_scale import GradientNormSample

__all__ = ["ParameterServerStrategy"]

# `ParameterServerStrategy` is `_ParameterServerStrategy` built for the Lightning package in use.
__getattr__ = _lightning.class_getter(__name__, __all__)

log = logging.getLogger(__name__)

_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_TRANSPORTS = ("auto", "shm", "tcp")
_AUTO_DECISIONS = 0  # `num_servers="auto"` decisions this process took part in
#: Precision plugins whose `optimizer_step` `update_on="server"` reproduces (it steps on the servers itself).
_SERVER_PRECISIONS = ("Precision", "MixedPrecision", "HalfPrecision", "DoublePrecision")


def _grad_ready(client: WorkerClient, index: int, param: Tensor) -> None:
    client.grad_ready(index)


def _inverse_scale(scale: float) -> float:
    """``1 / scale`` rounded as ``GradScaler.unscale_`` rounds it (a float32 reciprocal)."""
    return float(torch.tensor(scale, dtype=torch.float64).reciprocal().float())


def _run_step_hooks(optimizer: Optimizer, post: bool) -> None:
    """Run ``optimizer``'s step pre- or post-hooks (its own and torch's global ones) as ``optimizer.step`` would."""
    from torch.optim import optimizer as hooks  # the module holds torch's global step hooks

    chain: list[Callable[..., Any]]
    if post:
        chain = [*optimizer._optimizer_step_post_hooks.values(), *hooks._global_optimizer_post_hooks.values()]
    else:
        chain = [*hooks._global_optimizer_pre_hooks.values(), *optimizer._optimizer_step_pre_hooks.values()]
    for hook in chain:
        hook(optimizer, (optimizer,), {})


def _check_sparse_mode(
    mode: str, max_staleness: int | None, sparse_mode: str | None, sparse_max_staleness: int | None
) -> None:
    """Refuse combinations of the sparse tables' mode with the fit's that have no meaning, saying what does."""
    if sparse_mode not in (None, "sync", "async"):
        raise ValueError(f"`sparse_mode` must be None (as `mode`), 'sync' or 'async', got sparse_mode={sparse_mode!r}.")
    if sparse_max_staleness is not None and (
        isinstance(sparse_max_staleness, bool) or not isinstance(sparse_max_staleness, int) or sparse_max_staleness < 0
    ):
        raise ValueError(
            "`sparse_max_staleness` must be None or an integer >= 0, "
            f"got sparse_max_staleness={sparse_max_staleness!r}."
        )
    dense_sync = is_sync(mode, max_staleness)
    if sparse_mode == "sync" and not dense_sync:
        raise ValueError(
            f"`sparse_mode='sync'` needs synchronous dense rounds, got mode={mode!r}, max_staleness={max_staleness!r}: "
            "a synchronous round of the tables needs every worker's push of every step, which an asynchronous fit "
            "does not promise. Use sparse_mode=None (the tables follow `mode`), or mode='sync' with "
            "sparse_mode='async' for synchronous dense and asynchronous sparse parts."
        )
    if sparse_max_staleness is not None and not (sparse_mode == "async" and dense_sync):
        raise ValueError(
            f"`sparse_max_staleness` bounds the asynchronous tables of a synchronous fit (mode='sync', "
            f"sparse_mode='async'), got mode={mode!r}, max_staleness={max_staleness!r}, sparse_mode={sparse_mode!r}. "
            "Pass sparse_mode='async' with mode='sync', or drop sparse_max_staleness (in an asynchronous fit the "
            "dense `max_staleness` bounds the workers)."
        )


def _raise_on_local_sigterm(trainer: pl.Trainer, exception: type[BaseException]) -> None:
    if getattr(trainer, "received_sigterm", False):
        raise exception()


class _ParameterServerStrategy(WorkerCollectives):
    """Train an unchanged LightningModule with parameter servers.

    Built for each Lightning package as ``ParameterServerStrategy`` (see :mod:`lightning_patterns._lightning`):
    ``lightning_patterns.strategies.ParameterServerStrategy`` is the one of the package in use.

    Args:
        num_servers: number of server processes. Server ``s`` runs on node ``s % num_nodes``. ``"auto"``: at the
            first fit, worker rank 0 times this machine's copies, sums and a server update over the model's bytes
            and takes the number of servers the cost model predicts fastest
            (:func:`~lightning_patterns.strategies.parameter_server.planner.choose_servers`; the table is logged and
            kept in :attr:`plan`). ``lightning-patterns ps plan`` measures more (the real training step) and
            compares with DDP.
        update_on: where the optimizer runs. ``"worker"`` (default): servers only average the workers' gradients
            and every worker runs the module's own optimizer, schedulers, gradient clipping and GradScaler on the
            average, exactly as under DDP, for any optimizer. ``"server"``: servers hold the parameters and the
            optimizer state and update them (workers hold no optimizer state); only element-wise optimizers
            (SGD, Adam, AdamW, RMSprop, Adagrad, ...) are accepted; the only placement of async modes.
        mode: ``"sync"`` averages all workers' gradients before each update (equal to DDP); ``"async"``
            (``update_on="server"``) applies each worker's push on arrival (scaled by ``1 / world_size``),
            bounded by ``max_staleness``.
        max_staleness: for ``"async"``: no worker runs more than this many steps ahead of the slowest
            (stale-synchronous parallel). ``0`` is exactly ``"sync"``; ``None`` is fully asynchronous.
        timeout: seconds any wait may take; a peer silent for longer while it should talk, or one whose
            connection drops, stops every process with :class:`~lightning_patterns.exceptions.PeerLostError`.
            It must exceed the longest gap between two optimizer steps of the slowest worker.
        chunk_bytes: the most bytes in one partition chunk (``None``: chunks end only at tensor and server
            boundaries).
        transport: how gradients and parameters travel between a worker and a server. ``"auto"`` (default):
            through shared memory for each pair on one host (written once, read in place: no socket, no
            serialisation), over TCP (gloo) between hosts; ``"shm"``: shared memory, refused at setup unless every
            worker and server runs on one host; ``"tcp"``: TCP for every pair. Headers, and failures, always
            travel on gloo, so a lost process is noticed at once whatever the transport.
        bucket_bytes: the most bytes of gradient a worker pushes at once. Buckets are pushed as backward produces
            them (the last layers first), so that communication overlaps the rest of backward, and answered in
            the order the next forward needs them.
        broadcast_buffers: broadcast rank 0's buffers (BatchNorm running statistics) to the other workers before
            each synchronizing forward, as ``DDPStrategy(broadcast_buffers=True)`` does.
        sparse_modules: qualified names of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules whose tables live only on
            the servers, row-sharded (``["user_embedding", "item_embedding"]``); ``None``: detect them by
            ``sparse_min_rows``. A worker pulls the unique rows of each batch and pushes only their gradients; the
            servers update them with the optimizer of the tables' param group (SGD and Adagrad exactly as dense
            training; Adam and AdamW lazily, as ``torch.optim.SparseAdam``). See
            :mod:`lightning_patterns.strategies.parameter_server.sparse`.
        sparse_min_rows: without ``sparse_modules``, embeddings of at least this many rows are sparse (``None``:
            none are).
        sparse_mode: how the sparse tables' rounds run. ``None`` (default): as ``mode``. ``"async"`` with
            ``mode="sync"`` is PERSIA's hybrid: the dense part keeps the synchronous path unchanged, while a worker
            pushes its rows after the dense step (off its critical path) and the servers apply each table push on
            arrival (scaled by ``1 / world_size``) and answer a sparse pull without waiting for the other workers'
            pushes of the step before, within ``sparse_max_staleness``; the end-of-fit
            gather and checkpoints still wait for every worker's pushes. The tables then no longer equal
            single-process training. ``"sync"`` with an asynchronous ``mode`` is refused (``ValueError``): a
            synchronous round of the tables needs every worker at every step, which async mode does not promise.
        sparse_max_staleness: for ``mode="sync", sparse_mode="async"``: a sparse pull of a worker at step ``t`` is
            answered only once every worker's pushes of the steps before ``t - sparse_max_staleness`` are applied
            (held until then, within ``timeout``); ``0`` waits for all of the previous steps' pushes, but applies
            them one by one. ``None`` (default): no bound of its own (the synchronous dense rounds keep the workers
            within about one step anyway). Refused in any other combination.
        sparse_gather_bytes: after a fit, sparse tables of at most this many bytes in all are pulled back into the
            module (so it tests, predicts and saves in one process), and checkpoints hold them whole too (so a plain
            single-process Trainer loads them). Larger ones live in the checkpoints' ``.sparse`` folders only.
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
        num_servers: int | Literal["auto"] = 1,
        update_on: Literal["worker", "server"] = "worker",
        mode: Literal["sync", "async"] = "sync",
        max_staleness: int | None = 0,
        timeout: float = 60.0,
        chunk_bytes: int | None = None,
        transport: Literal["auto", "shm", "tcp"] = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        broadcast_buffers: bool = True,
        sparse_modules: list[str] | None = None,
        sparse_min_rows: int | None = 100_000,
        sparse_gather_bytes: int = 64 * 2**20,
        sparse_mode: Literal["sync", "async"] | None = None,
        sparse_max_staleness: int | None = None,
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
        if num_servers != "auto" and (
            isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 1
        ):
            raise ValueError(f"`num_servers` must be an integer >= 1 or 'auto', got num_servers={num_servers!r}.")
        if update_on not in PLACEMENTS:
            raise ValueError(f"`update_on` must be one of {PLACEMENTS.names()}, got update_on={update_on!r}.")
        if mode not in ("sync", "async"):
            raise ValueError(f"`mode` must be 'sync' or 'async', got mode={mode!r}.")
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise ValueError(
                f"`max_staleness` must be None or an integer >= 0, got max_staleness={max_staleness!r}. "
                "Use 0 for synchronous steps, None for fully asynchronous training."
            )
        if update_on == "worker" and not is_sync(mode, max_staleness):
            raise ValueError(
                f"`update_on='worker'` averages every step's gradients over all workers, so it is synchronous only; "
                f"got mode={mode!r}, max_staleness={max_staleness!r}. For asynchronous training pass "
                "`ParameterServerStrategy(update_on='server', mode='async', ...)`: the servers then apply each "
                "worker's push on arrival."
            )
        _check_sparse_mode(mode, max_staleness, sparse_mode, sparse_max_staleness)
        if not timeout > 0:
            raise ValueError(f"`timeout` must be a positive number of seconds, got timeout={timeout!r}.")
        if chunk_bytes is not None and chunk_bytes < 1:
            raise ValueError(f"`chunk_bytes` must be None or >= 1, got chunk_bytes={chunk_bytes!r}.")
        if transport not in _TRANSPORTS:
            raise ValueError(
                f"`transport` must be one of {_TRANSPORTS}, got transport={transport!r}. 'auto' uses shared memory "
                "between the processes of one host and TCP between hosts."
            )
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"`bucket_bytes` must be an integer >= 1, got bucket_bytes={bucket_bytes!r}.")
        if start_method not in _START_METHODS:
            raise ValueError(f"`start_method` must be one of {_START_METHODS}, got start_method={start_method!r}.")
        #: Servers of the job (``0`` until ``num_servers="auto"`` is decided, at the first fit).
        self.num_servers: int = num_servers if isinstance(num_servers, int) else 0
        self.auto_servers = num_servers == "auto"
        #: ``num_servers="auto"``: the cost model's predictions it decided on (worker rank 0 only).
        self.plan: Plan | None = None
        self.update_on = update_on
        self.mode = mode
        self.max_staleness = max_staleness
        self.timeout = float(timeout)
        self.chunk_bytes = chunk_bytes
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.broadcast_buffers = broadcast_buffers
        self._process_group_backend = process_group_backend
        self._start_method = start_method
        self._num_nodes = 1
        self._session: ServerSession | None = None
        self._client: WorkerClient | None = None
        self._telemetry: ParameterServerTelemetry | None = None
        self._accumulating = False  # inside Lightning's `block_backward_sync` (an accumulation micro-batch)
        self._sync_buffers_next = True  # DDP's `require_forward_param_sync`
        self._mean_loss: float | None = None  # "worker": the workers' mean loss of the last round
        self._clip_request: tuple[float, bool] | None = None  # "server", sync: this step's (value, by norm)
        self._hooks: list[Any] = []  # gradient hooks that push buckets as backward produces them
        self._norm_samples = 0  # this worker's samples in the step under way, when its norms are measured
        self._norm_inverse_scale = 1.0  # 1 / the GradScaler's scale of the measured round's backward
        self.sparse_mode = sparse_mode
        self.sparse_max_staleness = sparse_max_staleness
        self._sparse = SparseWiring(
            sparse_modules,
            sparse_min_rows,
            sparse_gather_bytes,
            sync=None if sparse_mode is None else sparse_mode == "sync",
            max_staleness=sparse_max_staleness,
        )

    # -- topology ----------------------------------------------------------------------------------------------------
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
    def is_distributed(self) -> bool:
        """Always: the Trainer must shard data over the workers."""
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str | None:
        """The ``torch.distributed`` backend in use."""
        return self._process_group_backend

    @property
    def transports(self) -> list[str] | None:
        """How this worker talks to each server in the current or last fit: ``"shm"`` or ``"tcp"`` (``None`` before)."""
        return list(self._telemetry.transports) if self._telemetry is not None else None

    @property
    def telemetry(self) -> ParameterServerTelemetry | None:
        """This worker's communication counters of the current or last fit (``None`` before the first)."""
        if self._client is not None and not self._client.finished:
            self._client.settle()  # the last round counts once its replies are in
        return self._telemetry

    @property
    def sparse_telemetry(self) -> Any:
        """This worker's sparse counters (``ps/sparse_rows``, ``ps/sparse_bytes``) of the current or last fit."""
        return self._sparse.last_telemetry

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Around ``configure_model`` of a fit: embeddings that will be sparse are built on the meta device."""
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and module.trainer.state.fn == "fit"
        if not fitting:
            yield
            return
        with self._sparse.building(module):
            yield

    @property
    def _sync(self) -> bool:
        return is_sync(self.mode, self.max_staleness)

    @property
    def _hybrid(self) -> bool:
        """Synchronous dense rounds, asynchronous sparse tables (PERSIA's hybrid)."""
        return self.sparse_mode == "async" and self._sync

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            launcher = self._internal("pl:strategies.launchers:_SubprocessScriptLauncher")
            self._launcher = launcher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            launcher = self._internal("pl:strategies.launchers:_MultiProcessingLauncher")
            self._launcher = launcher(self, start_method=self._start_method)

    # -- process groups ----------------------------------------------------------------------------------------------
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
        """Join Lightning's workers-only group, then (to fit) the servers' session: new, or kept from the last fit."""
        self._lp_tree.fabric("utilities.seed").reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        # Joining waits for every process to start, which takes longer than a step: give it at least two minutes.
        join_seconds = join_timeout(self.timeout)
        join_workers = partial(
            self._internal("fabric:utilities.distributed:_init_dist_connection"),
            self.cluster_environment,
            self._process_group_backend,
            timeout=datetime.timedelta(seconds=join_seconds),
        )
        # Only fitting needs servers; evaluation runs on the workers alone.
        if self.lightning_module is not None and self.lightning_module.trainer.state.fn != "fit":
            join_workers()
        else:
            joined = False
            if self.num_servers == 0:  # "auto": decided once the workers can agree on it
                join_workers()
                joined = True
                self.num_servers = self._choose_servers(join_seconds)
            environment = self.cluster_environment
            key = SessionKey(
                environment.main_address, environment.main_port, self.world_size, self.num_servers, self.num_nodes
            )
            self._session = reuse_session(key, self.timeout)
            if self._session is not None:
                if not joined:
                    join_workers()
            else:
                # The servers start while the workers gather; one that exits meanwhile is reported at once.
                pending = PendingSession(key, self.node_rank, self.local_rank, join_seconds)
                try:
                    if not joined:
                        pending.watching(join_workers)
                    self._session = pending.join(self.global_rank, self.timeout)
                except ServerStartError:
                    # The job cannot start: stop the workers this process launched, which would wait for it.
                    if self.launcher is not None:
                        self.launcher.kill(signal.SIGKILL)
                    raise
        log.info(
            "rank %d: %d workers (%s) and %d servers (gloo), update_on=%r",
            self.global_rank,
            self.world_size,
            self._process_group_backend,
            self.num_servers if self._session is not None else 0,
            self.update_on,
        )

    def _choose_servers(self, timeout: float) -> int:
        """``num_servers="auto"``: rank 0 asks the cost model; every worker reads its answer from the store."""
        global _AUTO_DECISIONS
        store = dist.distributed_c10d._get_default_store()
        # Every worker decides its fits in the same order: the count names this decision alike everywhere.
        key = f"lightning_patterns/parameter_server/auto_servers/{_AUTO_DECISIONS}"
        _AUTO_DECISIONS += 1
        if self.global_rank == 0:
            module = self.lightning_module
            assert module is not None
            model_bytes = float(sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad))
            cores = os.cpu_count() or 1
            per_node = self.num_processes
            cluster = Cluster(
                workers=self.world_size,
                nodes=self.num_nodes,
                cores=cores,
                workers_on_cpu=self.root_device.type == "cpu",
                shared_memory=self.transport != "tcp",
            )
            max_servers = max(2, min(8, cores // max(per_node, 1))) * self.num_nodes
            threads = max(1, cores // (per_node + 1))
            chosen, self.plan = choose_servers(model_bytes, cluster, max_servers, self.update_on, threads)
            log.info("num_servers='auto' chose %d servers:\n%s", chosen, format_plan(self.plan))
            store.set(key, str(chosen))
        store.wait([key], datetime.timedelta(seconds=timeout))
        return int(store.get(key))

    # -- model and optimizer -----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        fitting = trainer.state.fn == "fit"
        layer_sync = _lightning.layer_sync(self._lp_tree, self)
        if fitting and layer_sync is not None:
            if self.root_device.type == "cpu":
                raise ValueError(
                    "`Trainer(sync_batchnorm=True)` converts BatchNorm layers to torch's SyncBatchNorm, which runs on "
                    "GPUs only (DDP fails the same way on CPU, at the first forward). On CPU, drop "
                    "`sync_batchnorm=True`: each worker then normalizes with its own batch's statistics, and with "
                    "`ParameterServerStrategy(broadcast_buffers=True)` rank 0's running statistics are broadcast "
                    "before each step, as under DDP."
                )
            self.model = layer_sync.apply(self.model)
        if fitting:
            assert self.lightning_module is not None
            self._sparse.prepare(self.lightning_module, max(self.num_servers, 1), self.global_rank)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            with self._sparse.building_optimizer():
                self.setup_optimizers(trainer)
            if len(self.optimizers) == 1:
                self._sparse.take_from_optimizer(self._unwrap(self.optimizers[0]))
        self.setup_precision_plugin()
        if not fitting:
            self._broadcast_module_state()  # as DDP's `_sync_module_states` when it does not wrap the module
            return
        self._internal("fabric:utilities.optimizer:_optimizers_to_device")(self.optimizers, self.root_device)
        self._check_fit()
        self._connect()

    def _check_fit(self) -> None:
        """Refuse, on every worker alike and before any server hears of the fit, what this strategy cannot do."""
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
        plugin = self.precision_plugin
        if self.update_on == "server" and type(plugin).__name__ not in _SERVER_PRECISIONS:
            raise ValueError(
                f"`ParameterServerStrategy(update_on='server')` steps the optimizer on the servers itself, which "
                f"reproduces the precision plugins {', '.join(_SERVER_PRECISIONS)}; {type(plugin).__name__} steps in "
                "its own way. Use `ParameterServerStrategy(update_on='worker')`: every worker then runs the plugin's "
                "own `optimizer_step`, as under DDP."
            )
        if self._session is None:
            raise RuntimeError("ParameterServerStrategy: fitting needs servers, but none joined the process group.")
        if self.transport == "shm":
            self._check_one_host(self._session.link.cards)
        if self._sparse.active and self._grad_scaler() is not None:
            raise ValueError(
                "ParameterServerStrategy cannot scale the gradients of sparse tables with a GradScaler (mixed "
                "precision with float16): the servers update their rows without an inf check. Use "
                "precision='bf16-mixed' or '32-true', or keep the embeddings dense (sparse_min_rows=None)."
            )

    def _check_one_host(self, cards: Mapping[int, HostCard]) -> None:
        """``transport="shm"``: every worker and server must share this worker's host (decided alike everywhere)."""
        here = cards.get(0)
        for rank, card in sorted(cards.items()):
            if here is None or not here.same_host(card):
                role = f"worker rank {rank}" if rank < self.world_size else f"server rank {rank}"
                raise ValueError(
                    f"`ParameterServerStrategy(transport='shm')` needs every worker and server on one host, but "
                    f"{role} runs on {card.hostname!r} (boot {card.boot_id[:8]}, {card.pid_namespace}) and worker "
                    f"rank 0 on {here.hostname if here else '?'!r}. Use transport='auto' (shared memory within a "
                    "host, TCP between hosts) or transport='tcp'."
                )

    def _connect(self) -> None:
        assert self._session is not None
        self._client = WorkerClient(
            self._session.link,
            self._unwrap(self.optimizers[0]),
            update_on=self.update_on,
            world_size=self.world_size,
            num_servers=self.num_servers,
            sync=self._sync,
            max_staleness=self.max_staleness,
            chunk_bytes=self.chunk_bytes,
            timeout=self.timeout,
            transport=self.transport,
            bucket_bytes=self.bucket_bytes,
        )
        self._telemetry = self._client.telemetry
        self._client.start()
        self._sparse.connect(self._session.link, self.world_size, self.num_servers, self.timeout, self.root_device)
        self._sparse.set_before_pull(self._client.settle)
        # Like DDP when it wraps the module: every worker starts from rank 0's parameters and buffers.
        self._broadcast_module_state()
        self._client.attach()
        self._register_gradient_hooks(self._client)
        self._sync_buffers_next = True
        if self.update_on == "server" and self._sync:
            # Clipping must apply to the average over the workers, which only the servers see: record what the
            # module's `configure_gradient_clipping` asks the precision plugin for, and send it with the push.
            self.precision_plugin.clip_gradients = self._record_clipping  # type: ignore[method-assign]

    def _register_gradient_hooks(self, client: WorkerClient) -> None:
        """Push each bucket as soon as backward has accumulated all its gradients, like DDP's reducer."""
        for index, param in enumerate(client.params):
            if param.requires_grad:
                hook = partial(_grad_ready, client, index)
                self._hooks.append(param.register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]

    def _remove_gradient_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _unwrap(self, optimizer: Any) -> Optimizer:
        wrapper = self._lp_tree.module("core.optimizer").LightningOptimizer
        return cast(Optimizer, optimizer._optimizer if isinstance(optimizer, wrapper) else optimizer)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- DDP's points in the loop ------------------------------------------------------------------------------------
    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning enters this for the micro-batches of an accumulation window that do not step."""
        self._accumulating = True
        try:
            yield None
        finally:
            self._accumulating = False

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._before_forward()
        output = super().training_step(*args, **kwargs)
        self._after_forward()
        return output

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        # DDP's wrapper runs validation while fitting only (a validate-only run has no wrapper).
        fitting = self._client is not None
        if fitting:
            self._before_forward()
        output = super().validation_step(*args, **kwargs)
        if fitting:
            self._after_forward()
        return output

    def _before_forward(self) -> None:
        if self._client is not None and self.broadcast_buffers and self._sync_buffers_next:
            self._broadcast(list(self.model.buffers()) if self.model is not None else [])

    def _after_forward(self) -> None:
        # The next forward broadcasts buffers only after a training forward whose backward synchronizes.
        self._sync_buffers_next = torch.is_grad_enabled() and not self._accumulating

    def _broadcast_module_state(self) -> None:
        if self.model is not None and self.world_size > 1:
            self._broadcast([*self.model.parameters(), *self.model.buffers()])

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """Lightning's ``Strategy.backward``, pushing gradient buckets while backward produces them.

        ``"worker"``: the round ends here with the workers' average in ``.grad``, where DDP's reducer would have
        it. ``"server"``: the round is committed in ``optimizer_step`` (async: pushed there too, after this
        worker's own clipping).
        """
        client = self._client
        if client is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        synchronizing = not self._accumulating
        loss = 0.0
        if synchronizing:
            if self.update_on == "worker":
                loss = float(closure_loss.detach())
            samples = self._norm_samples if self._sync else 0
            if samples:
                scaler = self._grad_scaler()
                self._norm_inverse_scale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
            client.begin_round(loss, collect=self.update_on == "worker" or self._sync, samples=samples)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        if synchronizing:
            client.end_backward()
            if self.update_on == "worker":
                self._mean_loss = client.sum_gradients(loss)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """``"worker"``: the precision plugin's own step, on averaged gradients. ``"server"``: push, then pull."""
        if self._client is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        model = model or self.lightning_module
        assert isinstance(model, self._lp_tree.pl.LightningModule)
        optimizer = self._unwrap(optimizer)
        # The hybrid pushes the tables' rows after the dense step, off its critical path: the other workers' next
        # pulls need not wait for them (within `sparse_max_staleness`). Otherwise before the dense round, so that
        # a synchronous round of the tables completes with the dense one.
        rows_after_step = self._sparse.active and self._hybrid
        if self._sparse.active and not rows_after_step:
            closure = partial(self._closure_then_push_rows, closure, optimizer)
        if self.update_on == "worker":
            result = super().optimizer_step(optimizer, partial(self._closure_with_mean_loss, closure), model, **kwargs)
        else:
            result = self._step_on_servers(optimizer, closure, model)
        if rows_after_step:
            self._sparse.push(optimizer)
        self._log_telemetry()
        return result

    def _closure_then_push_rows(self, closure: Callable[[], Any], optimizer: Optimizer) -> Any:
        """Run the step's closure; then push the sparse tables' row gradients of the step (micro-batches summed)."""
        result = closure()
        self._sparse.push(optimizer)
        return result

    def _closure_with_mean_loss(self, closure: Callable[[], Any]) -> Any:
        """Run the closure; hand the optimizer the workers' mean loss, so LBFGS decides alike on every worker."""
        assert self._client is not None
        rounds = self._client.rounds
        result = closure()
        if self._client.rounds == rounds:  # no backward (`training_step` returned None): still take part
            self._mean_loss = self._client.sum_gradients(0.0)
        if isinstance(result, Tensor) and self._mean_loss is not None:
            return torch.full_like(result, self._mean_loss)
        return result

    def _step_on_servers(self, optimizer: Optimizer, closure: Callable[[], Any], model: pl.LightningModule) -> Any:
        assert self._client is not None
        scaler = self._grad_scaler()
        params = self._client.params
        unscaled = [False]

        def forward_backward() -> Any:
            result = closure()
            if scaler is not None and result is not None:
                # As MixedPrecision does before `on_before_optimizer_step`: hooks and clipping see unscaled gradients.
                unscale_gradients(params, scaler.get_scale())
                unscaled[0] = True
            return result

        self._clip_request = None
        # `wrap_closure` runs the closure, `on_before_optimizer_step` and gradient clipping, which in sync mode only
        # records what to clip (see `_connect`) and otherwise clips this worker's gradient.
        result = _lightning.wrap_closure(self._lp_tree, self.precision_plugin, model, optimizer, forward_backward)
        clip_value, clip_norm = self._clip_request or (0.0, True)
        client = self._client
        # The servers' update is this optimizer's step: its step hooks run around it, and the hyperparameters a
        # pre-hook sets (AdaptiveBatchSize's learning-rate gain) travel with the commit.
        _run_step_hooks(optimizer, post=False)
        try:
            skipped = self._commit_on_servers(client, scaler, clip_value, clip_norm, unscaled[0])
        finally:
            _run_step_hooks(optimizer, post=True)
        if scaler is not None:
            update_grad_scaler(scaler, found_inf=skipped)
        if not skipped:
            # What torch's LR-scheduler wrapper of `optimizer.step` records; schedulers check it.
            _lightning.mark_optimizer_stepped(optimizer)
        return result

    def _commit_on_servers(
        self,
        client: WorkerClient,
        scaler: torch.amp.GradScaler | None,
        clip_value: float,
        clip_norm: bool,
        unscaled: bool,
    ) -> bool:
        """Hand the round to the servers; whether they skipped the step."""
        params = client.params
        if self._sync:
            # Backward pushed the gradients still scaled: the servers unscale the average, as GradScaler does after
            # DDP's all-reduce; this worker's own unscale (for the hooks above) is no reason to push them again.
            inverse = _inverse_scale(scaler.get_scale()) if scaler is not None else 1.0
            client.commit(clip_value, clip_norm, scaler is not None, False, inverse, bumps=int(unscaled))
            if scaler is None:
                # Go on: the parameters arrive bucket by bucket while the next step starts, and every read of one
                # waits for its own bucket (see `overlap.PendingParameters`).
                client.defer()
            else:
                client.settle()  # the scaler's update needs the servers' inf check now
            skipped = client.skipped
        else:
            # This worker's gradients, unscaled and clipped here, are pushed now.
            skip = scaler is not None and not gradients_finite(params)
            skipped = client.step_on_servers(0.0, True, check_finite=False, skip=skip)
        return skipped

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        mixed = self._lp_tree.module("plugins.precision").MixedPrecision
        return getattr(self.precision_plugin, "scaler", None) if isinstance(self.precision_plugin, mixed) else None

    def _record_clipping(self, optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = "norm") -> None:
        if clip_val <= 0:
            return
        if self._clip_request is not None:
            raise ValueError(
                "`ParameterServerStrategy(update_on='server')` applies one gradient clipping per step, on the servers, "
                "but `clip_gradients` was called twice in this step. Clip once in `configure_gradient_clipping`, or "
                "use `update_on='worker'`."
            )
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)).lower()
        self._clip_request = (float(clip_val), algorithm == "norm")

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
        if self._sparse.client is not None:
            metrics.update(self._sparse.client.telemetry.metrics())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        """``"server"``, on rank 0: the whole optimizer state gathered from the servers, laid out as one process's."""
        client = self._client
        if client is not None and self.update_on == "server" and not client.finished and self.global_rank == 0:
            return client.gather_state()
        return super().optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """``"server"``: keep hyperparameters on the workers and send the state to the servers (any number of them)."""
        if self._client is None or self.update_on != "server":
            super().load_optimizer_state_dict(checkpoint)
            return
        for optimizer, state_dict in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            self._unwrap(optimizer).load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
            if self.global_rank == 0:
                self._client.load_state(state_dict)
        # No worker may push before the servers hold the restored state (async servers apply pushes at once).
        self.barrier("parameter_server_load_optimizer_state")

    # -- gradient norms (lightning_patterns.adaptive.ReportsGradientNorms) ------------------------------------------
    def measure_gradient_norms(self, samples: int) -> None:
        """Measure the gradient norms of the optimizer step under way (``samples > 0``), or stop (``0``).

        The servers measure them as they sum the workers' pushes
        (:mod:`~lightning_patterns.strategies.parameter_server.norms`): two floats per bucket in the replies they
        send anyway. Unmeasured steps cost nothing. Every worker must ask alike for the same steps.

        Args:
            samples: the samples this worker's gradient of the step is a mean over (all micro-batches of the
                step, as far as they are known when the step's last backward starts); ``0``: do not measure.

        Raises:
            ValueError: for an asynchronous fit, whose pushes are never averaged over the workers.
        """
        if samples > 0 and not self._sync:
            raise ValueError(
                "ParameterServerStrategy measures the gradient noise scale from the workers' pushes of a synchronous "
                f"step, but this fit is asynchronous (mode={self.mode!r}, max_staleness={self.max_staleness!r}): no "
                "step averages the workers' gradients. Use mode='sync' (or max_staleness=0), or drop the "
                "GradientNoiseScale/AdaptiveBatchSize callback."
            )
        self._norm_samples = max(int(samples), 0)

    def gradient_norm_sample(self) -> GradientNormSample | None:
        """The gradient norms of the optimizer step just taken, the same on every worker (``None``: not measured).

        ``small_sqr`` is the mean over workers of each worker's squared gradient norm, ``big_sqr`` the squared norm
        of their average, both of the gradient as backward accumulated it over the step's micro-batches (the loss
        divided by the accumulation, as Lightning does), unscaled by the ``GradScaler`` and before gradient
        clipping; ``small_batch`` is the harmonic mean of the workers' samples per step (micro-batch ×
        accumulation), ``big_batch = world_size · small_batch``. ``None`` when the step was not measured, with one
        worker, or when the gradient overflowed (a step the ``GradScaler`` skips). Sparse tables
        (``sparse_modules``) are not part of the norms: only the dense parameters the servers sum.

        With ``update_on="server"`` the norms come with the step's parameters, which the next forward waits for
        anyway: reading them waits for the step's replies.
        """
        client = self._client
        if client is None:
            return None
        if self.update_on == "server" and any(client.outstanding):
            client.settle()
        if client.last_norms is None:
            return None
        return norm_sample(client.last_norms, self.world_size, self._norm_inverse_scale)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Sparse tables: every server writes its rows under ``<filepath>.sparse``; then Lightning's save."""
        if self._sparse.client is not None:
            assert self._client is not None
            self._client.settle()
            self._sparse.save(checkpoint, filepath, self.global_rank)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: str | Path) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            self._sparse.remove(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._sparse.checkpoint_path = Path(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """A checkpoint with sparse tables: load the rest; the servers load the tables' rows when the fit starts."""
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and module.trainer.state.fn == "fit"
        # Evaluation runs on the workers alone: tables small enough are in the state_dict whole.
        if module is None or not fitting or not self._sparse.load_state(module, checkpoint, strict):
            super().load_model_state_dict(checkpoint, strict=strict)

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self) -> None:
        if self._client is None or (self._sync and not self._hybrid):
            return
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        loop = trainer.fit_loop.epoch_loop
        # Lightning broadcasts a SIGTERM flag from rank 0 before every batch, which would hold every worker in
        # step with rank 0 and defeat asynchronous training (in the hybrid: make every pull wait for the other
        # workers' row pushes of the step before). Check this worker's own flag instead; a worker that stops is
        # then seen by the others as a lost peer.
        exception = self._lp_tree.module("utilities.exceptions").SIGTERMException
        _lightning.replace_sigterm_broadcast(self._lp_tree, loop, partial(_raise_on_local_sigterm, trainer, exception))

    @override
    def on_validation_start(self) -> None:
        if self._client is not None and self._client.initialized and not self._client.finished:
            self._client.pause()

    @override
    def on_train_end(self) -> None:
        """The fit succeeded: the only place that tells the servers this worker is done."""
        if self._client is None or self._client.finished:
            return
        if self.update_on == "server" and not self._sync:
            # Async workers may hold slightly different parameters: end on the servers' values.
            self._client.pull()
        self._client.settle()
        self._sparse.finish(gather=True)
        self._client.end()

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Tell the servers this worker failed and why; they stop every other process."""
        if self._client is None:
            return  # no server heard of this fit: the failure (a refusal at setup) is every worker's own
        if not self._client.finished:
            self._client.fail(exception, timeout=min(self.timeout, 5.0))
        self._client.close()  # no read of a parameter waits for a server any more
        drop_session()
        self._session = None

    @override
    def teardown(self) -> None:
        if self._client is not None and not self._client.finished:
            # Neither `on_train_end` nor `on_exception` ran: the servers must not wait for this worker.
            self.on_exception(RuntimeError("the fit stopped before it finished"))
        vars(self.precision_plugin).pop("clip_gradients", None)  # the recorder of `_connect`
        self._remove_gradient_hooks()
        self._sparse.finish(gather=False)
        if self._client is not None:
            self._client.close()
        module = self.lightning_module
        layer_sync = _lightning.layer_sync(self._lp_tree, self)
        fitted = module is not None and module._trainer is not None and module.trainer.state.fn == "fit"
        if layer_sync is not None and fitted and self.model is not None:
            self.model = layer_sync.revert(self.model)
        self._client = None
        self._session = None
        self._norm_samples = 0
        super().teardown()


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    ParameterServerStrategy = _ParameterServerStrategy
