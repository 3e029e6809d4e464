"""``DataMetricsCallback``: how the data pipeline did, logged to any Lightning logger and summarised after ``fit``.

Per training epoch it gathers every rank's counters (samples, bytes read from the remote, cache hits and
misses, retries, time waiting for data) and reduces them once: counts are summed over the ranks, the hit rate
is hits over lookups of all ranks, samples per second is all samples over the slowest rank's time, and the
waiting fraction is the ranks' mean. The logged values, the table rank zero prints at the end of ``fit`` and
:attr:`DataMetricsCallback.last_logged` (which ``lightning-patterns`` prints as its closing line) all come from
those reduced counters, so they agree; counts stay integers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only

from lightning_patterns import _lightning

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning import Callback as _Callback
else:
    _Callback = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["AdaptiveBatchSize", "DataMetricsCallback", "EpochDataMetrics", "GradientNoiseScale"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["AdaptiveBatchSize", "DataMetricsCallback", "GradientNoiseScale"])


@dataclass(frozen=True)
class EpochDataMetrics:
    """What the data pipeline did in one training epoch, over all ranks.

    Args:
        epoch: the epoch.
        seconds: training time of the slowest rank (validation left out).
        samples: samples yielded, summed over the ranks.
        samples_per_second: ``samples / seconds``.
        wait_fraction: the fraction of its time a rank waited for data, averaged over the ranks.
        remote_bytes: bytes read from the remote, summed over the ranks.
        cache_hit_rate: cache hits over cache lookups of all ranks (``None`` without a cache).
        retries: remote reads retried, summed over the ranks.
        samples_per_rank: the samples each rank yielded.
        first_batch_seconds: time from the start of the epoch's iteration to its first batch, the slowest rank's
            (``0.0`` when the loader does not report it).
    """

    epoch: int
    seconds: float
    samples: int
    samples_per_second: float
    wait_fraction: float
    remote_bytes: int
    cache_hit_rate: float | None
    retries: int
    samples_per_rank: tuple[int, ...]
    first_batch_seconds: float = 0.0


def _streaming_loader(trainer: pl.Trainer) -> Any:
    """The training loader if it reports streaming metrics (has ``metrics()``), else ``None``."""
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values())) if len(loader) == 1 else None
    return loader if callable(getattr(loader, "metrics", None)) else None


class _DataMetricsCallback(_Callback):
    """Logs data-pipeline metrics each training epoch and prints a summary at the end of ``fit``.

    Works with any loader that has a ``metrics()`` method returning counters (as
    :class:`~lightning_patterns.data.streaming.StreamingDataLoader` does); with another loader it
    still reports samples per second and wait time, measured around the loader.

    Args:
        prefix: prefix of the logged metric names.
        print_summary: print the one-screen summary from rank zero at the end of ``fit``.
    """

    def __init__(self, prefix: str = "data/", print_summary: bool = True) -> None:
        self.prefix = prefix
        self.print_summary = print_summary
        self.epochs: list[EpochDataMetrics] = []
        # What the last epoch logged, exactly (counts as int): the closing line of `lightning-patterns fit`.
        self.last_logged: dict[str, int | float] = {}
        self._start: dict[str, float] = {}
        self._epoch_started = 0.0
        self._batch_requested = 0.0
        self._wait = 0.0
        self._samples = 0
        self._validation_started = 0.0
        self._validation_seconds = 0.0

    def _counters(self, trainer: pl.Trainer) -> dict[str, float]:
        loader = _streaming_loader(trainer)
        return dict(loader.metrics()) if loader is not None else {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot the counters."""
        self._start = self._counters(trainer)
        self._epoch_started = self._batch_requested = time.perf_counter()
        self._wait = 0.0
        self._samples = 0
        self._validation_seconds = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation inside a training epoch is not training time."""
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add this validation run to the time left out of the epoch."""
        if trainer.training or trainer.state.fn == "fit":
            self._validation_seconds += time.perf_counter() - self._validation_started

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Time since the previous step ended is time spent waiting for this batch."""
        self._wait += time.perf_counter() - self._batch_requested
        self._samples += _batch_len(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Start timing the wait for the next batch."""
        self._batch_requested = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reduce this epoch's counters over the ranks and log them."""
        seconds = max(time.perf_counter() - self._epoch_started - self._validation_seconds, 1e-9)
        now = self._counters(trainer)
        delta = {name: now.get(name, 0.0) - self._start.get(name, 0.0) for name in now}
        local = [
            delta.get("samples", self._samples),
            delta.get("remote_bytes", 0.0),
            delta.get("cache_hits", 0.0),
            delta.get("cache_misses", 0.0),
            delta.get("retries", 0.0),
            min(delta.get("loader_wait_seconds", self._wait) / seconds, 1.0),
            seconds,
            now.get("first_batch_seconds", 0.0),  # a time, not a counter: the latest iteration's
        ]
        # float64 keeps byte counts exact (to 2**53); on the module's device, since NCCL gathers CUDA tensors only.
        gathered = trainer.strategy.all_gather(torch.tensor(local, dtype=torch.float64, device=pl_module.device))
        per_rank = gathered.reshape(-1, len(local)).cpu()
        samples, remote_bytes, hits, misses, retries = (round(float(v)) for v in per_rank[:, :5].sum(dim=0))
        slowest = float(per_rank[:, 6].max())
        metrics = EpochDataMetrics(
            epoch=trainer.current_epoch,
            seconds=slowest,
            samples=samples,
            samples_per_second=samples / slowest,
            wait_fraction=float(per_rank[:, 5].mean()),
            remote_bytes=remote_bytes,
            cache_hit_rate=hits / (hits + misses) if hits + misses else None,
            retries=retries,
            samples_per_rank=tuple(round(float(n)) for n in per_rank[:, 0]),
            first_batch_seconds=float(per_rank[:, 7].max()),
        )
        self.epochs.append(metrics)
        logged: dict[str, int | float] = {
            "samples_per_second": metrics.samples_per_second,
            "wait_fraction": metrics.wait_fraction,
            "remote_bytes": metrics.remote_bytes,
            "retries": metrics.retries,
            "samples": metrics.samples,
            "samples_per_rank_min": min(metrics.samples_per_rank),
            "samples_per_rank_max": max(metrics.samples_per_rank),
            "first_batch_seconds": metrics.first_batch_seconds,
        }
        if metrics.cache_hit_rate is not None:
            logged["cache_hit_rate"] = metrics.cache_hit_rate
        self.last_logged = {self.prefix + name: value for name, value in logged.items()}
        # The same value on every rank already: sync_dist's mean leaves it as it is.
        pl_module.log_dict({name: float(value) for name, value in self.last_logged.items()}, sync_dist=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the summary."""
        if self.print_summary and self.epochs:
            self._print_summary(trainer)

    @rank_zero_only
    def _print_summary(self, trainer: pl.Trainer) -> None:
        world = len(self.epochs[-1].samples_per_rank)
        lines = ["", f"Data pipeline ({world} rank{'s' if world > 1 else ''}: counts summed, waiting averaged)"]
        lines.append(
            f"{'epoch':>5}  {'samples/s':>11}  {'waiting':>7}  {'remote bytes':>14}  {'cache hits':>10}  retries"
        )
        for m in self.epochs:
            hits = "-" if m.cache_hit_rate is None else f"{m.cache_hit_rate:.1%}"
            lines.append(
                f"{m.epoch:>5}  {m.samples_per_second:>11,.0f}  {m.wait_fraction:>7.1%}  {m.remote_bytes:>14,}  "
                f"{hits:>10}  {m.retries:>7}"
            )
        last = self.epochs[-1]
        lines.append(f"samples per rank in the last epoch: {', '.join(f'{n:,}' for n in last.samples_per_rank)}")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
    elif isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
    else:
        return 0
    return len(first) if hasattr(first, "__len__") else 0


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    from lightning_patterns.adaptive.callbacks import _AdaptiveBatchSize as AdaptiveBatchSize
    from lightning_patterns.adaptive.callbacks import _GradientNoiseScale as GradientNoiseScale

    DataMetricsCallback = _DataMetricsCallback
