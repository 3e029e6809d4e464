"""The training jobs of ``tests/integration/test_parameter_server.py``, run as a script (``python ... JOB --out DIR``).

Lightning's popen launcher re-runs this script for each extra worker, which it cannot do for pytest. The Lightning
package comes from ``LIGHTNING_PATTERNS_LIGHTNING`` (``pytorch_lightning`` by default), so a test chooses which one
a job exercises.

Jobs:

- ``suite``: every equivalence case for both update placements and 1 and 2 servers, each beside DDP on the same
  module and data (computed in the same launch), plus the drop-in, checkpoint and async runs, and the gradient
  noise scale and adaptive batch size fits (``adaptive``, below). Setup-time refusals are caught and written to
  ``refusals.json``. One launch: the servers started for the first fit serve the others.
- ``adaptive``: ``GradientNoiseScale`` under each placement, transport and server count (each rank records its
  local gradients and what the strategy reports); ``AdaptiveBatchSize`` streaming ``OUT/adaptive_data`` (which
  the test writes) through ``ShardedStreamingDataModule``, changing the batch size in the middle of an epoch.
- ``raise``: worker rank 1 raises in ``training_step`` at step 3 (``--sync-dist``: before its ``sync_dist`` log,
  so rank 0 waits in that all-reduce).
- ``kill_worker`` / ``kill_server``: at step 3, rank 1 or server 0 is killed with SIGKILL.
- ``start_failure``: the server cannot import torch (an environment difference on its side).
- ``two_nodes``: one worker per node, under two torchrun agents.
- ``sparse``: sparse tables on the servers (``sparse_modules``): SGD and Adagrad with 1 and 2 servers (compared with
  single-process training by the test), telemetry, a checkpoint written with 2 servers resumed with 1, and
  ``EmbeddingCTR`` with tables built on the meta device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_patterns import _lightning
from lightning_patterns.strategies.parameter_server import launcher
from lightning_patterns.testing.tiny_job import TinyJob

PACKAGE = os.environ.get(_lightning.PACKAGE_ENV) or "pytorch_lightning"
pl: Any = importlib.import_module(_lightning.PACKAGES[PACKAGE][0])
classes: Any = importlib.import_module(f"lightning_patterns.{PACKAGE}")

JOB = TinyJob(steps=4, batch=4, workers=2)
WORKERS = JOB.workers
SERVERS = (1, 2)
PLACEMENTS = ("worker", "server")
TRANSPORTS = ("shm", "tcp")


# -- the equivalence cases -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One module + optimizer + Trainer setting, run under DDP and under each placement.

    Attributes:
        name: the case's name.
        model: ``"mlp"``, ``"frozen"`` (a frozen layer in the optimizer and a branch some steps do not use),
            ``"tied"`` (an encoder and a decoder sharing their weight) or ``"batchnorm"``.
        optimizer: builds ``configure_optimizers``' return value from the module.
        trainer: extra Trainer arguments.
        epochs: epochs to train; each has ``steps`` optimizer steps.
        steps: optimizer steps per epoch.
        mixed: ``16-mixed`` through Lightning's ``MixedPrecision`` plugin with a real ``GradScaler`` on CPU.
        refused_on: placements that must refuse the case at setup (``"*"``: all; then DDP is not run).
        log_loss: log ``train_loss`` per epoch with ``sync_dist=True`` (for ``ReduceLROnPlateau``).
        validate: run a validation loop (one batch) each epoch and a sanity check.
        placements: strategy arguments per placement beyond ``update_on`` (e.g. async with staleness 0).
    """

    name: str
    model: str
    optimizer: Callable[[Any], Any]
    trainer: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    steps: int = 4
    mixed: bool = False
    refused_on: tuple[str, ...] = ()
    log_loss: bool = False
    validate: bool = False
    placements: tuple[str, ...] = PLACEMENTS
    strategy: dict[str, Any] = field(default_factory=dict)


def _adamw(module: Any) -> Any:
    return torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.1)


def _sgd_momentum(module: Any) -> Any:
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def _two_groups(module: Any) -> Any:
    net = module.net
    return torch.optim.SGD(
        [
            {"params": net[0].parameters(), "lr": 0.1},
            {"params": net[2].parameters(), "lr": 0.05, "weight_decay": 0.01},
        ],
        lr=0.1,
        momentum=0.9,
    )


def _one_cycle(module: Any) -> Any:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.3, total_steps=4, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _plateau(module: Any) -> Any:
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05, betas=(0.8, 0.9))
    # mode="max" on a falling loss: no improvement at each epoch's end, so the learning rate halves each time.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss"}}


def _adam_step_lr(module: Any) -> Any:
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _adam(module: Any) -> Any:
    return torch.optim.Adam(module.parameters(), lr=0.05)


def _adafactor(module: Any) -> Any:
    return torch.optim.Adafactor(module.parameters(), lr=0.05)


def _lbfgs(module: Any) -> Any:
    return torch.optim.LBFGS(module.parameters(), lr=0.5, max_iter=3)


class _OwnPrecision(importlib.import_module(f"{pl.__name__}.plugins.precision").Precision):  # type: ignore[misc]
    """A precision plugin `update_on="server"` does not know."""


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("frozen_adamw", "frozen", _adamw),
        Case("frozen_sgd", "frozen", _sgd_momentum),
        Case("two_groups", "mlp", _two_groups),
        Case("one_cycle", "mlp", _one_cycle),
        Case("plateau", "mlp", _plateau, epochs=3, steps=2, log_loss=True),
        Case("accumulate_clip", "mlp", _sgd_momentum, trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}),
        Case("tied_clip_value", "tied", _adam, trainer={"gradient_clip_val": 0.02, "gradient_clip_algorithm": "value"}),
        # Validation (with a sanity check) at epoch 2 only, so the job ends on training steps; each step of two
        # micro-batches: DDP broadcasts rank 0's buffers before the first only, so rank 1 ends on its own updates.
        Case(
            "batchnorm",
            "batchnorm",
            _sgd_momentum,
            epochs=3,
            steps=1,
            validate=True,
            trainer={"accumulate_grad_batches": 2, "check_val_every_n_epoch": 2},
        ),
        Case("batchnorm_sync", "batchnorm", _sgd_momentum, trainer={"sync_batchnorm": True}, refused_on=("*",)),
        Case("mixed16", "mlp", _sgd_momentum, mixed=True, steps=6, trainer={"gradient_clip_val": 1.0}),
        Case("adafactor", "mlp", _adafactor, refused_on=("server",)),
        Case("lbfgs", "mlp", _lbfgs, refused_on=("server",)),
        Case("async_staleness_0", "mlp", _adam_step_lr, placements=("server",), strategy={"mode": "async"}),
        Case("own_precision", "mlp", _adam, placements=("server",), refused_on=("server",)),
    )
}


class CaseModule(pl.LightningModule):  # type: ignore[misc]
    """The module of an equivalence case: a small regression net, deterministic data split over the workers."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = CASES[case]
        torch.manual_seed(0)
        model = self.case.model
        if model == "batchnorm":
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
        else:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        if model == "frozen":
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)  # still in the optimizer: it must not move (no weight decay, momentum)
            self.extra = nn.Linear(4, 2)  # unused on some steps by some or all workers
        if model == "tied":
            self.encoder = nn.Linear(4, 4, bias=False)
            self.decoder = nn.Linear(4, 4)
            self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor, batch_idx: int = 0) -> torch.Tensor:
        if self.case.model == "frozen":
            x = torch.tanh(self.frozen(x))
        if self.case.model == "tied":
            x = self.decoder(torch.tanh(self.encoder(x)))
        out = self.net(x)
        # Rank 0 uses the branch at batches 0 and 3, rank 1 at batch 2, nobody at batch 1.
        if self.case.model == "frozen" and (batch_idx + self.global_rank) % 3 == 0:
            out = out + self.extra(x)
        return out  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x, batch_idx), y)
        if self.case.log_loss:
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def _loader(self, samples: int, seed: int) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(seed)
        data = TensorDataset(torch.randn(samples, 4, generator=generator), torch.randn(samples, 2, generator=generator))
        sampler: DistributedSampler[Any] = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=JOB.batch, sampler=sampler)

    def train_dataloader(self) -> DataLoader[Any]:
        accumulate = int(self.case.trainer.get("accumulate_grad_batches", 1))
        return self._loader(self.case.steps * accumulate * JOB.batch * self.trainer.world_size, seed=1)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(JOB.batch * self.trainer.world_size, seed=2)

    def configure_optimizers(self) -> Any:
        return self.case.optimizer(self)


class Snapshot(pl.Callback):  # type: ignore[misc]
    """After training (before the strategy ends the fit): each rank's module state, optimizer state, scaler state."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        record = {
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.strategy.optimizer_state(optimizer),
            "worker_state_len": len(optimizer.state),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "global_step": trainer.global_step,
            "telemetry": getattr(trainer.strategy, "telemetry", None),
            "transports": getattr(trainer.strategy, "transports", None),
        }
        torch.save(record, self.out.with_name(f"{self.out.name}_rank{trainer.global_rank}.pt"))


def _trainer(strategy: Any, **kwargs: Any) -> Any:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": WORKERS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(strategy=strategy, **{**defaults, **kwargs})


def run_case(case: Case, strategy: Any, out: Path) -> None:
    """Fit ``case`` under ``strategy``; write each rank's snapshot to ``out_rank{r}.pt``."""
    kwargs: dict[str, Any] = {**case.trainer, "max_epochs": case.epochs, "callbacks": [Snapshot(out)]}
    if case.mixed:
        # How Lightning builds `precision="16-mixed"` for a GPU, on CPU: autocast to float16 and a real GradScaler.
        # The initial scale overflows float16 on the first steps, so some steps are skipped and the scale backs off.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
        kwargs["plugins"] = [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    if case.name == "own_precision":
        kwargs["plugins"] = [_OwnPrecision()]
    if not case.validate:
        kwargs["limit_val_batches"] = 0
        kwargs["num_sanity_val_steps"] = 0
    else:
        kwargs["limit_val_batches"] = 1
    _trainer(strategy, **kwargs).fit(CaseModule(case.name))


def _ps(servers: int, update_on: str, **kwargs: Any) -> Any:
    return classes.ParameterServerStrategy(num_servers=servers, update_on=update_on, timeout=30.0, **kwargs)


def _equivalence_runs() -> list[tuple[str, str, int, str]]:
    """Every (case, placement, servers, transport) the suite runs under the parameter server, in launch order.

    Server counts outermost: each count's servers are started once and serve all its fits, over both transports.
    """
    return [
        (name, update_on, servers, transport)
        for servers in SERVERS
        for transport in TRANSPORTS
        for name, case in CASES.items()
        for update_on in case.placements
    ]


def run_equivalence_suite(out: Path) -> None:
    """Every case under DDP and under each placement and server count; refusals go to ``refusals.json``."""
    refusals: dict[str, str] = {}
    timings: dict[str, float] = {}
    for name, case in CASES.items():
        if "*" in case.refused_on or case.name == "own_precision":
            continue
        started = time.perf_counter()
        ddp = pl.strategies.DDPStrategy(find_unused_parameters=case.model == "frozen")
        run_case(case, ddp, out / f"{name}_ddp")
        timings[f"{name}_ddp"] = time.perf_counter() - started
    for name, update_on, servers, transport in _equivalence_runs():
        case = CASES[name]
        label = f"{name}_{update_on}_s{servers}_{transport}"
        started = time.perf_counter()
        strategy = _ps(servers, update_on, transport=transport, **case.strategy)
        refused = "*" in case.refused_on or update_on in case.refused_on
        try:
            run_case(case, strategy, out / label)
        except ValueError as error:
            if not refused:
                raise
            refusals[label] = str(error)
        timings[label] = time.perf_counter() - started
    timings["sessions_opened"] = launcher._SESSIONS_OPENED
    if pl.utilities.rank_zero_only.rank == 0:
        (out / "refusals.json").write_text(json.dumps(refusals, indent=1))
        (out / "timings.json").write_text(json.dumps(timings, indent=1))


# -- drop-in, checkpoint and async -----------------------------------------------------------------------------------
class _Record(pl.Callback):  # type: ignore[misc]
    """Rank 0 writes what the drop-in test checks: metrics, worker optimizer state, telemetry, restored state."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        state = trainer.strategy.optimizer_state(trainer.optimizers[0])
        self.record["start_step"] = trainer.global_step
        self.record["start_optimizer_state"] = state
        self.record["num_params"] = sum(p.numel() for p in pl_module.parameters())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.record["worker_state_len"] = len(trainer.optimizers[0].state)
        self.record["telemetry"] = trainer.strategy.telemetry
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.record["global_step"] = trainer.global_step
        if trainer.global_rank == 0:
            torch.save(self.record, self.out)


def run_dropin(out_dir: Path, servers: int, resume: Path | None = None, max_epochs: int = 1) -> None:
    """The example MLP with validation, accumulation, clipping, a CSV logger and checkpoints; optimizer on servers."""
    pl.seed_everything(0)
    name = f"dropin_s{servers}_e{max_epochs}"
    trainer = _trainer(
        _ps(servers, "server"),
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(out_dir, name=name),
        enable_checkpointing=True,
        callbacks=[
            pl.callbacks.ModelCheckpoint(dirpath=out_dir / f"{name}_ckpt", save_last=True),
            _Record(out_dir / f"{name}.pt"),
        ],
    )
    model = classes.MLPClassifier(hidden_dim=32, num_layers=1, lr=0.01, optimizer="sgd", momentum=0.9)
    data = classes.InMemoryDataModule(train_samples=512, val_samples=128, batch_size=32, seed=0)
    trainer.fit(model, datamodule=data, ckpt_path=resume)


class _SlowRank1(pl.Callback):  # type: ignore[misc]
    """Rank 1 starts late and stays slower: fully async, rank 0 finishes its steps before rank 1's first push."""

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_rank == 1:
            time.sleep(0.5 if trainer.global_step == 0 else 0.1)


def run_async(out: Path, servers: int, staleness: int | None) -> None:
    """Async SGD with rank 1 slowed down; rank 1 records the staleness it saw."""
    strategy = _ps(servers, "server", mode="async", max_staleness=staleness)
    trainer = _trainer(strategy, max_steps=JOB.steps, callbacks=[Snapshot(out), _SlowRank1()])
    trainer.fit(classes.TinyRegressor("sgd", JOB))


def run_auto(out: Path) -> None:
    """``num_servers="auto"``: the cost model picks S at the first fit; rank 0 records it and the plan."""
    strategy = classes.ParameterServerStrategy(num_servers="auto", update_on="server", timeout=30.0)
    _trainer(strategy, max_steps=JOB.steps, callbacks=[Snapshot(out / "auto")]).fit(classes.TinyRegressor("sgd", JOB))
    if pl.utilities.rank_zero_only.rank == 0:
        from lightning_patterns.strategies.parameter_server.planner import format_plan

        assert strategy.plan is not None
        record = {"num_servers": strategy.num_servers, "plan": format_plan(strategy.plan)}
        (out / "auto.json").write_text(json.dumps(record))


# -- gradient noise scale and adaptive batch size --------------------------------------------------------------------
NORM_STEPS, NORM_ACCUMULATION = 3, 2
#: Each rank's micro-batch: unequal, so the reported batch is their harmonic mean.
NORM_BATCHES = (4, 6)


class NormsModule(pl.LightningModule):  # type: ignore[misc]
    """A small regression net that records each micro-batch's local gradient (``autograd.grad`` of its own loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        #: Per optimizer step, this rank's micro-batches: (samples, flat local gradient).
        self.local: list[list[tuple[int, list[float]]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        grads = torch.autograd.grad(loss, list(self.parameters()), retain_graph=True)
        if len(self.local) <= self.trainer.global_step:
            self.local.append([])
        self.local[self.trainer.global_step].append((len(x), torch.cat([g.reshape(-1) for g in grads]).tolist()))
        return loss

    def train_dataloader(self) -> DataLoader[Any]:
        # Each rank its own data and batch size (no DistributedSampler: the Trainer is told not to add one).
        batch = NORM_BATCHES[self.global_rank]
        generator = torch.Generator().manual_seed(10 + self.global_rank)
        samples = NORM_STEPS * NORM_ACCUMULATION * batch
        data = TensorDataset(torch.randn(samples, 4, generator=generator), torch.randn(samples, 2, generator=generator))
        return DataLoader(data, batch_size=batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _NormsRecord(pl.Callback):  # type: ignore[misc]
    """After each step: what the strategy reports; counts the optimizer's step hooks; writes it all at the end."""

    def __init__(self, out: Path, gns: Any) -> None:
        self.out, self.gns = out, gns
        self.reported: list[list[float] | None] = []
        self.hook_calls = [0, 0]
        self._seen = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        optimizer.register_step_pre_hook(lambda *args: self._count(0))
        optimizer.register_step_post_hook(lambda *args: self._count(1))

    def _count(self, which: int) -> None:
        self.hook_calls[which] += 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self._seen:
            return
        self._seen = trainer.global_step
        sample = trainer.strategy.gradient_norm_sample()
        self.reported.append(
            None if sample is None else [sample.small_sqr, sample.small_batch, sample.big_sqr, sample.big_batch]
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        record = {
            "reported": self.reported,
            "local": pl_module.local,
            "hook_calls": self.hook_calls,
            "source": self.gns.source_name,
            "noise_scale": self.gns.noise_scale,
            "history": self.gns.history,
        }
        self.out.with_name(f"{self.out.name}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_noise_scale(out: Path, servers: int) -> None:
    """GradientNoiseScale under each placement and transport: accumulation, clipping (and a GradScaler for S = 1)."""
    for update_on in PLACEMENTS:
        for transport in TRANSPORTS:
            label = f"norms_{update_on}_s{servers}_{transport}"
            gns = classes.GradientNoiseScale(log_every_n_steps=1, smoothing=0.5)
            kwargs: dict[str, Any] = {}
            if servers == 1:
                # Scaled gradients travel: the reported norms must be unscaled (no overflow at this scale).
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
                kwargs["plugins"] = [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)]
            trainer = _trainer(
                _ps(servers, update_on, transport=transport),
                max_steps=NORM_STEPS,
                accumulate_grad_batches=NORM_ACCUMULATION,
                gradient_clip_val=0.01,  # clips every step: the norms are the gradient's before clipping
                use_distributed_sampler=False,
                log_every_n_steps=1,
                logger=pl.loggers.CSVLogger(out, name=label),
                callbacks=[gns, _NormsRecord(out / label, gns)],
                limit_val_batches=0,
                num_sanity_val_steps=0,
                **kwargs,
            )
            trainer.fit(NormsModule())


class _Streamed(pl.LightningModule):  # type: ignore[misc]
    """Classifies the streamed 4×4 images and records every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 4)
        self.rows: list[tuple[int, int, int, int, list[int]]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        k = self.trainer.accumulate_grad_batches
        self.rows.append((self.current_epoch, batch_idx, len(batch["index"]), k, batch["index"].tolist()))
        return F.cross_entropy(self.linear(batch["image"].float().flatten(1)), batch["label"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def run_adaptive(out: Path, url: Path) -> None:
    """AdaptiveBatchSize streams ``url`` and changes the batch size in the middle of the first epoch."""
    adaptive = classes.AdaptiveBatchSize(
        adapt_every_n_steps=4, min_batch_size=64, max_batch_size=64, max_accumulation=1
    )
    module = _Streamed()
    data = classes.ShardedStreamingDataModule(train_url=str(url), batch_size=16, seed=1)
    trainer = _trainer(_ps(1, "server"), max_epochs=2, callbacks=[adaptive])
    trainer.fit(module, datamodule=data)
    record = {"rows": module.rows, "decisions": adaptive.decisions, "source": adaptive.source_name}
    (out / f"adaptive_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_suite(out: Path) -> None:
    run_equivalence_suite(out)
    run_auto(out)
    run_dropin(out, servers=1)
    run_dropin(out, servers=2, resume=out / "dropin_s1_e1_ckpt" / "last.ckpt", max_epochs=2)
    run_async(out / "async_none", 2, None)
    run_noise_scale(out, servers=2)  # the servers of the fits above serve these too
    run_async(out / "async_s1", 1, 1)
    run_noise_scale(out, servers=1)
    run_adaptive(out, out / "adaptive_data")


# -- sparse tables ---------------------------------------------------------------------------------------------------
SPARSE_STEPS = 4
SPARSE_BATCH = 256
SPARSE_ROWS = (300, 500)


class SparseNet(nn.Module):
    """Two tables (an ``nn.Embedding`` with a padding row, a summing ``nn.EmbeddingBag``) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.users = nn.Embedding(SPARSE_ROWS[0], 16, padding_idx=0)
        self.items = nn.EmbeddingBag(SPARSE_ROWS[1], 16, mode="sum")
        self.head = nn.Linear(32, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.users(users), self.items(items)], dim=1)).squeeze(1)  # type: ignore[no-any-return]


def sparse_data(samples: int = SPARSE_STEPS * SPARSE_BATCH * WORKERS) -> TensorDataset:
    """Zipf-like ids (repeats within a batch), three items per sample, a regression target."""
    generator = torch.Generator().manual_seed(3)
    users = (torch.rand(samples, generator=generator) ** 3 * SPARSE_ROWS[0]).long()
    items = (torch.rand(samples, 3, generator=generator) ** 3 * SPARSE_ROWS[1]).long()
    return TensorDataset(users, items, torch.randn(samples, generator=generator))


def sparse_optimizer(net: SparseNet, name: str) -> torch.optim.Optimizer:
    tables = [net.users.weight, net.items.weight]
    groups = [{"params": tables, "lr": 0.5}, {"params": list(net.head.parameters()), "lr": 0.05}]
    return torch.optim.SGD(groups) if name == "sgd" else torch.optim.Adagrad(groups)


class SparseModule(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = SparseNet()
        self.optimizer_name = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        users, items, target = batch
        return F.mse_loss(self.net(users, items), target)

    def train_dataloader(self) -> DataLoader[Any]:
        data = sparse_data()
        sampler: DistributedSampler[Any] = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=SPARSE_BATCH, sampler=sampler)

    def configure_optimizers(self) -> Any:
        return sparse_optimizer(self.net, self.optimizer_name)


def _sparse_ps(servers: int, **kwargs: Any) -> Any:
    return _ps(servers, "worker", sparse_modules=["net.users", "net.items"], **kwargs)


def _save_sparse_run(module: Any, trainer: Any, path: Path) -> None:
    telemetry = trainer.strategy.sparse_telemetry
    record = {
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "history": list(telemetry.history) if telemetry is not None else None,
        "rank": trainer.global_rank,
    }
    torch.save(record, path.with_name(f"{path.name}_rank{trainer.global_rank}.pt"))


class _SaveAt(pl.Callback):  # type: ignore[misc]
    """Save a checkpoint during the fit (the servers then hold the tables) at the end of the epoch of ``step``."""

    def __init__(self, step: int, path: Path) -> None:
        self.step = step
        self.path = path

    def on_train_epoch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def run_sparse(out: Path) -> None:
    """SGD and Adagrad with 1 and 2 servers; a checkpoint at step 2 with 2 servers, resumed with 1; EmbeddingCTR."""
    for servers in SERVERS:
        for optimizer in ("sgd", "adagrad"):
            module = SparseModule(optimizer)
            trainer = _trainer(_sparse_ps(servers), max_steps=SPARSE_STEPS)
            trainer.fit(module)
            _save_sparse_run(module, trainer, out / f"sparse_{optimizer}_s{servers}")
    # A checkpoint written by 2 servers (end of an epoch of 2 steps), resumed by 1 for a second such epoch.
    checkpoints = out / "sparse_ckpt"
    module = SparseModule("adagrad")
    callback = _SaveAt(2, checkpoints / "step2.ckpt")
    trainer = _trainer(_sparse_ps(2), max_epochs=1, limit_train_batches=2, callbacks=[callback])
    trainer.fit(module)
    module = SparseModule("adagrad")
    trainer = _trainer(_sparse_ps(1), max_epochs=2, limit_train_batches=2, default_root_dir=str(checkpoints))
    trainer.fit(module, ckpt_path=str(checkpoints / "step2.ckpt"))
    _save_sparse_run(module, trainer, out / "sparse_resumed")
    # Tables built in `configure_model`, on the meta device: the servers create rows with the module's init.
    run_sparse_ctr(out)
    run_sparse_async(out)
    run_sparse_hybrid(out)


class _RowGradients(pl.Callback):  # type: ignore[misc]
    """Records the row gradients each step pushes (the unique ids, the compact weight's gradient); slows rank 1.

    Rank 1 sleeps before each batch (async: so that it is the last to end, and its table, gathered then, holds
    every push), or before each optimizer step (``before_step``, the hybrid: the step's dense round is complete,
    its sparse push, after the step, not yet sent, so rank 0's next pull finds the tables one step behind).
    """

    def __init__(self, before_step: bool = False) -> None:
        self.before_step = before_step
        self.ids: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pushed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == 1 and not self.before_step:
            time.sleep(0.2)
        self.ids.append((batch[0].unique(), batch[1].unique()))

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        users, items = self.ids[-1]
        net = pl_module.net
        self.pushed.append((users, net.users.weight.grad.clone(), items, net.items.weight.grad.clone()))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_rank == 1 and self.before_step:
            time.sleep(0.25)


def run_sparse_async(out: Path) -> None:
    """Async SGD (staleness 1) on the sparse tables with rank 1 slowed: each worker records what it pushed."""
    module, recorder = SparseModule("sgd"), _RowGradients()
    strategy = _ps(2, "server", mode="async", max_staleness=1, sparse_modules=["net.users", "net.items"])
    trainer = _trainer(strategy, max_steps=SPARSE_STEPS, callbacks=[recorder])
    trainer.fit(module)
    record = {
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "pushed": recorder.pushed,
        "telemetry": trainer.strategy.telemetry,
    }
    torch.save(record, out / f"sparse_async_rank{trainer.global_rank}.pt")


def run_sparse_hybrid(out: Path) -> None:
    """PERSIA's hybrid: dense part sync, tables async (staleness 1), rank 1's sparse pushes late."""
    module, recorder = SparseModule("sgd"), _RowGradients(before_step=True)
    strategy = _sparse_ps(2, sparse_mode="async", sparse_max_staleness=1)
    trainer = _trainer(strategy, max_steps=SPARSE_STEPS, callbacks=[recorder])
    trainer.fit(module)
    record = {
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "pushed": recorder.pushed,
        "sparse_staleness": trainer.strategy.sparse_telemetry.max_staleness_seen,
    }
    torch.save(record, out / f"sparse_hybrid_rank{trainer.global_rank}.pt")


def run_sparse_ctr(out: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    samples = 384
    users = torch.randint(0, 200, (samples,), generator=generator)
    items = torch.randint(0, 5000, (samples,), generator=generator)
    dense = torch.randn(samples, 4, generator=generator)
    data = TensorDataset(
        torch.stack([users, items], dim=1), dense, torch.randint(0, 2, (samples,), generator=generator)
    )

    class Ctr(classes.EmbeddingCTR):  # type: ignore[misc,name-defined]
        def train_dataloader(self) -> DataLoader[Any]:
            sampler: DistributedSampler[Any] = DistributedSampler(
                data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
            )
            return DataLoader(data, batch_size=64, sampler=sampler)

    module = Ctr(num_embeddings=[200, 5000], embedding_dim=8, optimizer="adam", sparse_gradients=False)
    trainer = _trainer(_ps(2, "server", sparse_min_rows=1000, sparse_gather_bytes=0), max_steps=3)
    trainer.fit(module)
    tables = module.tables
    record = {
        "users_is_meta": tables[0].weight.is_meta,
        "items_is_meta": tables[1].weight.is_meta,
        "history": list(trainer.strategy.sparse_telemetry.history),
    }
    torch.save(record, out / f"sparse_ctr_rank{trainer.global_rank}.pt")


# -- failures --------------------------------------------------------------------------------------------------------
class RaisingModule(classes.TinyRegressor):  # type: ignore[misc]
    """Rank 1 raises in ``training_step`` at step 3; with ``sync_dist`` every rank logs the loss with ``sync_dist``."""

    def __init__(self, sync_dist: bool) -> None:
        super().__init__("sgd", JOB)
        self.sync_dist = sync_dist

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(0.02)
        if self.global_rank == 1 and self.trainer.global_step == 3:
            print(f"RAISED {time.time()}", flush=True)
            raise RuntimeError("boom at step 3 on rank 1")
        loss = super().training_step(batch, batch_idx)
        if self.sync_dist:
            self.log("loss", loss, sync_dist=True)
        return loss  # type: ignore[no-any-return]


def _shared_regions() -> list[str]:
    """The parameter-server regions of shared memory this process maps."""
    maps = Path("/proc/self/maps").read_text()
    return sorted(set(re.findall(r"memfd:(lp-ps-[\w-]+)", maps)))


class _Kill(pl.Callback):  # type: ignore[misc]
    """At step 3, rank 1 kills itself (``victim="worker"``) or rank 0 kills server 0 (``victim="server"``).

    The killer first prints the shared regions it maps (``SHARED name ...``): the test checks that none survives.
    """

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        time.sleep(0.02)
        if trainer.global_step != 3:
            return
        if self.victim == "worker" and trainer.global_rank == 1:
            print(f"SHARED {' '.join(_shared_regions())}", flush=True)
            print(f"KILLED {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.victim == "server" and trainer.global_rank == 0:
            server = launcher.current_session().processes[0]  # type: ignore[union-attr]
            print(f"SHARED {' '.join(_shared_regions())}", flush=True)
            print(f"KILLED {time.time()}", flush=True)
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def run_failure(args: argparse.Namespace) -> None:
    """A job that must fail: every process must exit non-zero within the strategy's timeout."""
    sync = args.mode == "sync"
    strategy = classes.ParameterServerStrategy(
        num_servers=args.servers,
        update_on="worker" if sync else "server",
        mode=args.mode,
        max_staleness=0 if sync else None,
        timeout=20.0,
    )
    if args.job == "raise":
        _trainer(strategy, max_steps=10_000).fit(RaisingModule(args.sync_dist))
    else:
        _trainer(strategy, max_steps=10_000, callbacks=[_Kill(args.job.removeprefix("kill_"))]).fit(
            classes.TinyRegressor("sgd", JOB)
        )


def run_start_failure(out: Path) -> None:
    """Rank 0 starts its server with a ``torch`` that fails to import: the job must stop within 5 s of that."""
    broken = out / "broken_torch" / "torch"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "__init__.py").write_text("raise ImportError('this torch is broken on purpose')\n")
    started: list[float] = []
    start_servers = launcher.start_servers

    def start_broken_servers(*args: Any, **kwargs: Any) -> Any:
        # Rank 1 was launched already (with this process's environment): only the servers see the broken torch.
        started.append(time.time())
        os.environ["PYTHONPATH"] = str(broken.parent)
        return start_servers(*args, **kwargs)

    launcher.start_servers = start_broken_servers  # type: ignore[assignment]
    try:
        _trainer(_ps(1, "worker"), max_steps=2).fit(classes.TinyRegressor("sgd", JOB))
    except launcher.ServerStartError:
        print(f"START FAILURE REPORTED AFTER {time.time() - started[0]:.2f} s", flush=True)
        raise


def main() -> None:
    torch.set_num_threads(1)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("job")
    parser.add_argument("--out", default=".")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--mode", default="sync")
    parser.add_argument("--sync-dist", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.job == "suite":
        run_suite(out)
    elif args.job in ("raise", "kill_worker", "kill_server"):
        run_failure(args)
    elif args.job == "sparse":
        run_sparse(out)
    elif args.job == "adaptive":  # the suite's noise-scale and adaptive fits alone (OUT/adaptive_data written)
        run_noise_scale(out, servers=2)
        run_noise_scale(out, servers=1)
        run_adaptive(out, out / "adaptive_data")
    elif args.job == "start_failure":
        run_start_failure(out)
    elif args.job == "two_nodes":  # one worker per node, under torchrun
        strategy = _ps(2, "server")
        _trainer(strategy, devices=1, num_nodes=2, max_steps=JOB.steps, callbacks=[Snapshot(out / "two_nodes")]).fit(
            classes.TinyRegressor("sgd", JOB)
        )
    else:
        sys.exit(f"unknown job {args.job!r}")


if __name__ == "__main__":
    main()
