"""A tiny deterministic training job and its single-process reference, for checking a distributed strategy.

Worker ``r`` of ``W`` gets samples ``r, r + W, ...`` in order, so step ``k`` of all workers together covers samples
``k·B·W .. (k + 1)·B·W - 1``: synchronous data-parallel training must equal :func:`single_process_reference`,
plain training on those concatenated batches. Used by the parameter-server tests (CPU) and the GPU check in
``benchmarks/parameter_server_gpu.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_patterns import _lightning

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule as _LightningModule
else:
    _LightningModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["TinyJob", "TinyRegressor", "single_process_reference"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["TinyRegressor"])


@dataclass(frozen=True)
class TinyJob:
    """Steps, batch per worker and workers of the job; the data is fixed by them."""

    steps: int = 4
    batch: int = 4
    workers: int = 2

    def data(self, repeat: int = 1) -> TensorDataset:
        """``steps × batch × workers`` random regression samples (``repeat`` times over, for long runs)."""
        generator = torch.Generator().manual_seed(1)
        n = self.steps * self.batch * self.workers
        x, y = torch.randn(n, 4, generator=generator), torch.randn(n, 2, generator=generator)
        return TensorDataset(x.repeat(repeat, 1), y.repeat(repeat, 1))


class _TinyRegressor(_LightningModule):
    """Two linear layers; SGD with momentum and two param groups, or Adam with a StepLR stepped every step."""

    def __init__(self, optimizer: str = "sgd", job: TinyJob | None = None) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.optimizer_name = optimizer
        self.job = job or TinyJob()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for ``x``."""
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean squared error of the batch."""
        x, y = batch
        return F.mse_loss(self(x), y)

    def train_dataloader(self) -> DataLoader[Any]:
        """This worker's share of the job's data, in order."""
        # More steps than the job has (a kill test runs until killed): repeat the data.
        repeat = 1 if self.trainer.max_steps <= self.job.steps else 1000
        data = self.job.data(repeat)
        sampler: DistributedSampler[Any] = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.job.batch, sampler=sampler)

    def configure_optimizers(self) -> Any:
        """The optimizer named at construction (Adam comes with its scheduler)."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                [
                    {"params": self.net[0].parameters(), "lr": 0.1},
                    {"params": self.net[2].parameters(), "lr": 0.05, "weight_decay": 0.01},
                ],
                lr=0.1,
                momentum=0.9,
            )
        optimizer = torch.optim.Adam(self.parameters(), lr=0.02)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def single_process_reference(
    optimizer_name: str, job: TinyJob | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain training on the concatenated batch of all workers: what sync data-parallel training must reproduce."""
    job = job or TinyJob()
    model = _lightning.built_class("TinyRegressor")(optimizer_name, job).to(device)
    config = model.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
    x, y = (t.to(device) for t in job.data().tensors)
    per_step = job.batch * job.workers
    for step in range(job.steps):
        xb, yb = x[step * per_step : (step + 1) * per_step], y[step * per_step : (step + 1) * per_step]
        optimizer.zero_grad()
        F.mse_loss(model(xb), yb).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return model.state_dict(), optimizer.state_dict()


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    TinyRegressor = _TinyRegressor
