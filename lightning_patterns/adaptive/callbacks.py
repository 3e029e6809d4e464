"""``GradientNoiseScale`` and ``AdaptiveBatchSize``: AdaptDL / Pollux for Lightning.

``GradientNoiseScale`` measures the gradient noise scale while training; ``AdaptiveBatchSize`` also picks the
batch size that maximises goodput. The formulas are in :mod:`lightning_patterns.adaptive.noise_scale` and
:mod:`lightning_patterns.adaptive.goodput`; where the two gradient norms of a step come from is in
:mod:`lightning_patterns.adaptive.measurement`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import nn

from lightning_patterns import _lightning
from lightning_patterns.adaptive.goodput import (
    StepTimeModel,
    StepTimes,
    adascale_gain,
    best_batch_size,
    efficiency,
)
from lightning_patterns.adaptive.measurement import (
    ConsecutiveSteps,
    DDPCommHook,
    MicroBatches,
    PendingSample,
    read_back,
)
from lightning_patterns.adaptive.noise_scale import GradientStats, NoiseScaleEMA, estimate_gradient_stats
from lightning_patterns.adaptive.protocols import BatchSizeAdjustable, ReportsGradientNorms
from lightning_patterns.callbacks import _batch_len

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning import Callback as _Callback
else:
    _Callback = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["AdaptiveBatchSize", "GradientNoiseScale"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["AdaptiveBatchSize", "GradientNoiseScale"])

log = logging.getLogger(__name__)


def _loss_scale_getter(trainer: pl.Trainer) -> Callable[[], float]:
    """The ``GradScaler`` scale of the current step, or ``1.0`` without one (16-bit mixed precision has one)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None:
        return lambda: 1.0
    return lambda: float(scaler.get_scale())


class _GradientNoiseScale(_Callback):
    """Measures the gradient noise scale ``B = tr(Σ) / |G|²`` while training and logs it.

    Every optimizer step gives two squared gradient norms at two batch sizes, chosen by where training runs:
    each rank's gradient before DDP's all-reduce and the averaged one (DDP); each micro-batch's gradient and the
    accumulated one (one process, ``accumulate_grad_batches ≥ 2``); the gradients of two consecutive steps (one
    process otherwise: a pair every second step, biased by the parameters' motion between the two); or what the
    strategy reports (:class:`~lightning_patterns.adaptive.ReportsGradientNorms`, the parameter server's seam).
    Their estimates of ``|G|²`` and ``tr(Σ)`` are smoothed by a moving
    average and logged every ``log_every_n_steps`` optimizer steps to every logger of the Trainer as
    ``gns/noise_scale``, ``gns/grad_sqr`` and ``gns/grad_var``. The averages are saved in checkpoints.

    Args:
        smoothing: decay of the moving averages per measured step, in ``[0, 1)``.
        log_every_n_steps: read the measurements back and log them every this many optimizer steps (default: the
            Trainer's ``log_every_n_steps``). Between reads nothing waits for the device.
        prefix: prefix of the logged names.
        measure_every_n_steps: measure one optimizer step in this many (consecutive steps: one pair of steps in
            this many), to bound the cost; the others run untouched. The moving averages then count measured steps.
        plot: write a PNG of batch size, noise scale and learning rate over the steps at the end of ``fit``,
            to this path (relative paths: under the Trainer's ``log_dir``); ``None``: no plot. Needs matplotlib.
    """

    def __init__(
        self,
        smoothing: float = 0.99,
        log_every_n_steps: int | None = None,
        prefix: str = "gns/",
        plot: str | None = None,
        measure_every_n_steps: int = 1,
    ) -> None:
        if measure_every_n_steps < 1:
            raise ValueError(
                f"`measure_every_n_steps` must be at least 1, got {measure_every_n_steps=}. "
                "Use 1 to measure every step."
            )
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(
                f"`log_every_n_steps` must be at least 1 (or None for the Trainer's), got {log_every_n_steps=}."
            )
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ImportError(
                    f"`plot={plot!r}` needs matplotlib; install it with `pip install 'lightning-patterns[plot]'` "
                    "or pass plot=None."
                ) from None
        self.ema = NoiseScaleEMA(smoothing)
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.plot = plot
        self.measure_every_n_steps = measure_every_n_steps
        self._measuring = True  # whether the step under way is measured
        #: One row per read-back: step, global batch size, noise scale, |G|², tr(Σ), learning rate.
        self.history: list[dict[str, float]] = []
        self.source_name = ""
        self._source: ConsecutiveSteps | MicroBatches | DDPCommHook | ReportsGradientNorms | None = None
        self._reporter: ReportsGradientNorms | None = None  # the strategy, when it reports the norms
        self._parameters: list[nn.Parameter] = []
        self._consecutive = ConsecutiveSteps()
        self._micro: MicroBatches | None = None
        self._pending: list[PendingSample] = []
        self._step_batches: list[int] = []  # micro-batch sizes of the step under way, this rank
        self._steps_seen = 0
        self._last_batch_size = 0  # samples in the last optimizer step, all ranks (this rank's × world size)
        self._world_size = 1

    # -- choosing the source ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose where the two norms come from."""
        self._world_size = trainer.world_size
        self._parameters = [p for p in pl_module.parameters() if p.requires_grad]
        strategy = trainer.strategy
        if isinstance(strategy, ReportsGradientNorms) and trainer.world_size >= 2:
            self._source = self._reporter = strategy
            self.source_name = "strategy"
        elif trainer.world_size == 1:
            self._source, self.source_name = self._consecutive, ConsecutiveSteps.name
            self._one_process_source(trainer, pl_module, forget=False)  # keeps averages restored from a checkpoint
        elif isinstance(strategy.model, nn.parallel.DistributedDataParallel):
            self._source = DDPCommHook(strategy.model, _loss_scale_getter(trainer))
            self.source_name = DDPCommHook.name
        else:
            raise RuntimeError(
                f"{type(self).__name__} measures the gradient noise scale in one process, under DDP "
                "(DistributedDataParallel), or with a strategy that reports the norms it sees "
                f"(lightning_patterns.adaptive.ReportsGradientNorms); {type(strategy).__name__} with "
                f"world_size={trainer.world_size} is none of those. Use strategy='ddp', or implement "
                "`gradient_norm_sample()` on the strategy."
            )
        log.info("Gradient noise scale measured from: %s", self.source_name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count steps from here: a checkpoint's step count is restored after ``on_fit_start``."""
        self._steps_seen = trainer.global_step

    def _one_process_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, forget: bool = True) -> None:
        """Micro-batches while accumulating, consecutive steps otherwise; ``forget`` the averages on a change."""
        accumulating = trainer.accumulate_grad_batches >= 2
        if accumulating == (self._micro is not None):
            return
        if accumulating:
            self._micro = MicroBatches(_loss_scale_getter(trainer))
            self._source, self.source_name = self._micro, MicroBatches.name
        else:
            self._micro = None
            self._consecutive.reset()
            self._source, self.source_name = self._consecutive, ConsecutiveSteps.name
        if forget:
            # Consecutive steps also measure the parameters' motion: never average them with unbiased measurements.
            self._pending = []
            self.ema.reset()

    # -- measuring -------------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Note the micro-batch's size, and at a step's first one whether the step is measured."""
        if not self._step_batches:
            if isinstance(self._source, (ConsecutiveSteps, MicroBatches)):
                self._one_process_source(trainer, pl_module)
            self._measuring = self._measures(trainer.global_step)
        self._step_batches.append(_batch_len(batch))
        if self._reporter is not None:
            # The strategy measures the step whose last backward follows: its samples so far (on this rank).
            self._reporter.measure_gradient_norms(sum(self._step_batches) if self._measuring else 0)

    def _measures(self, step: int) -> bool:
        """Whether the step after ``step`` steps is measured: one in ``n`` (consecutive steps: a pair in ``2n``)."""
        n = self.measure_every_n_steps
        if isinstance(self._source, ConsecutiveSteps):
            return n == 1 or step % (2 * n) < 2
        return step % n == 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Take the step's two norms (gradients are complete, unscaled and not yet clipped)."""
        source, step, parameters = self._source, trainer.global_step, self._parameters
        pending: PendingSample | None = None
        if not self._measuring:
            if isinstance(source, (ConsecutiveSteps, MicroBatches, DDPCommHook)):
                source.reset()
        elif isinstance(source, ConsecutiveSteps):
            pending = source.measure(step, parameters, sum(self._step_batches))
        elif isinstance(source, MicroBatches):
            pending = source.measure(step, parameters, self._step_batches[-1], len(self._step_batches))
        elif isinstance(source, DDPCommHook):
            pending = source.measure(step, parameters, sum(self._step_batches))
        if pending is not None:
            self._pending.append(pending)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step: take the strategy's report, and read back and log every few steps."""
        if trainer.global_step == self._steps_seen:  # accumulating: no step taken yet
            if isinstance(self._source, MicroBatches) and self._measuring:
                self._source.end_micro_batch(self._parameters, self._step_batches[-1])
            return
        self._steps_seen = trainer.global_step
        self._last_batch_size = sum(self._step_batches) * self._world_size
        self._step_batches = []
        if self._reporter is not None:
            sample = self._reporter.gradient_norm_sample()
            if sample is not None:
                self.ema.update(estimate_gradient_stats(sample))
        every = self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
        if trainer.global_step % every == 0:
            self._read_back(trainer)
            self._log(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read back what is pending."""
        self._read_back(trainer)

    def _read_back(self, trainer: pl.Trainer) -> None:
        """Fold the pending measurements into the moving averages (one device sync) and note a history row."""
        for sample in read_back(self._pending):
            self.ema.update(estimate_gradient_stats(sample))
        self._pending = []
        stats = self.ema.stats
        if stats is not None:
            if self.history and self.history[-1]["step"] == trainer.global_step:
                self.history.pop()  # read back twice at one step (epoch end, then fit end): keep the last
            self.history.append(
                {
                    "step": float(trainer.global_step),
                    "batch_size": float(self._last_batch_size),
                    "noise_scale": stats.noise_scale,
                    "grad_sqr": stats.grad_sqr,
                    "grad_var": stats.grad_var,
                    "lr": self.learning_rate(trainer),
                }
            )

    def learning_rate(self, trainer: pl.Trainer) -> float:
        """The learning rate of the first parameter group of the first optimizer, as the last step used it."""
        return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan

    def _log(self, trainer: pl.Trainer) -> None:
        stats = self.ema.stats
        if stats is None or not self.history:
            return
        row = self.history[-1]
        metrics = {
            self.prefix + "noise_scale": stats.noise_scale,
            self.prefix + "grad_sqr": stats.grad_sqr,
            self.prefix + "grad_var": stats.grad_var,
            self.prefix + "batch_size": row["batch_size"],
            self.prefix + "lr": row["lr"],
        }
        # Straight to the loggers (rank zero inside them): `LightningModule.log` costs too much per step.
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=trainer.global_step)

    @property
    def stats(self) -> GradientStats | None:
        """The smoothed ``|G|²`` and ``tr(Σ)`` as of the last read-back."""
        return self.ema.stats

    @property
    def noise_scale(self) -> float | None:
        """The smoothed noise scale as of the last read-back."""
        return self.ema.noise_scale

    # -- end of fit, checkpoints -----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read back the rest and write the plot."""
        self._read_back(trainer)
        if self.plot is not None and self.history:
            self._write_plot(trainer)

    @rank_zero_only
    def _write_plot(self, trainer: pl.Trainer) -> None:
        from lightning_patterns.adaptive.plot import plot_history

        path = Path(self.plot or "")
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        plot_history(self.history, path)
        log.info("Gradient noise scale plot written to %s", path)

    def state_dict(self) -> dict[str, Any]:
        """The moving averages and the history."""
        return {"ema": self.ema.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's averages and history."""
        self.ema.load_state_dict(state_dict["ema"])
        self.history = list(state_dict["history"])


class _AdaptiveBatchSize(_GradientNoiseScale):
    """Picks the batch size (and gradient accumulation) of highest goodput while training, as Pollux does.

    On top of :class:`GradientNoiseScale` (whose measurements and logs it includes), it times every optimizer
    step and, every ``adapt_every_n_steps`` steps, fits the step-time model ``T(m, K) = K (α + β m) + γ`` to the
    times of the configurations tried (each one's median over its recent steps, :attr:`step_times`), and picks the
    micro-batch ``m`` per rank and the accumulation ``K`` that maximise goodput = throughput × statistical
    efficiency ``(B + M₀) / (B + M)``, within ``min_batch_size ≤ M = R·m·K ≤ max_batch_size``,
    ``m ≤ max_micro_batch_size`` and ``K ≤ max_accumulation`` (formulas: :mod:`lightning_patterns.adaptive.goodput`).
    In one process every step accumulates at least two micro-batches, whose gradients measure the noise scale
    without bias (consecutive steps would add the parameters' motion to the noise and mislead the choice: on the
    time-to-accuracy benchmark they measured 16,556 where two micro-batches measured 886, and the run diverged): a
    first batch of ``b`` becomes two micro-batches of ``b // 2``, and
    ``M₀ = 2 · (b // 2)``. A new configuration is adopted when its predicted goodput beats the current one's by
    ``min_improvement``; rank zero decides and every rank follows.

    The DataModule must implement :class:`~lightning_patterns.adaptive.BatchSizeAdjustable`. One that changes
    batch size within an epoch (``ShardedStreamingDataModule``) is asked for the change at the first batch past
    the one Lightning has prefetched that is a step boundary of both the old and the new accumulation, the same
    batch on every rank; one that changes it only between epochs (``InMemoryDataModule``, which raises
    ``ValueError`` for ``at_batch``) gets the new size from the next epoch on, the Trainer being told to rebuild
    its loaders then.

    Each optimizer step multiplies the learning rate of every parameter group by AdaScale's gain
    ``S (B + M₀) / (B + S M₀)`` (``S = M / M₀``) raised to ``lr_gain_power``, for the step only: schedulers and
    ``LearningRateMonitor`` see the unscaled rate, ``gns/lr`` logs the one used. With ``scale_schedulers`` the
    step-interval schedulers (frequency 1, not ReduceLROnPlateau) advance by scale-invariant progress, ``gain``
    base-batch steps per step, instead of one. The configuration, ``M₀``, the step times, the progress and the
    noise-scale averages are saved in checkpoints; resuming continues with them.

    Args:
        max_batch_size: the largest global batch ``M`` (default: 16 × ``M₀``).
        min_batch_size: the smallest global batch ``M`` (default: ``M₀``).
        max_micro_batch_size: the largest batch per rank that fits in memory (e.g. what ``BatchSizeFinder``
            found; default: no limit below ``max_batch_size``).
        max_accumulation: the most micro-batches per step (``K``).
        adapt_every_n_steps: steps between decisions; the first comes after as many steps.
        min_improvement: relative goodput gain a new configuration must promise.
        lr_gain_power: the learning rate is multiplied by ``gain ** lr_gain_power``: ``1`` is AdaScale (SGD),
            ``0.5`` the square-root rule often used with Adam, ``0`` leaves it alone.
        scale_schedulers: advance step-interval LR schedulers by scale-invariant progress.
        smoothing: decay of the noise-scale moving averages per measured step.
        log_every_n_steps: see :class:`GradientNoiseScale`.
        prefix: see :class:`GradientNoiseScale`.
        plot: see :class:`GradientNoiseScale` (e.g. ``"gns.png"``).
        measure_every_n_steps: see :class:`GradientNoiseScale`.
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        min_batch_size: int | None = None,
        max_micro_batch_size: int | None = None,
        max_accumulation: int = 4,
        adapt_every_n_steps: int = 50,
        min_improvement: float = 0.05,
        lr_gain_power: float = 1.0,
        scale_schedulers: bool = True,
        smoothing: float = 0.99,
        log_every_n_steps: int | None = None,
        prefix: str = "gns/",
        plot: str | None = None,
        measure_every_n_steps: int = 1,
    ) -> None:
        super().__init__(
            smoothing=smoothing,
            log_every_n_steps=log_every_n_steps,
            prefix=prefix,
            plot=plot,
            measure_every_n_steps=measure_every_n_steps,
        )
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("min_batch_size", min_batch_size),
            ("max_micro_batch_size", max_micro_batch_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be at least 1 (or None for the default), got {name}={value!r}.")
        if max_batch_size is not None and min_batch_size is not None and min_batch_size > max_batch_size:
            raise ValueError(f"Cannot have max_batch_size={max_batch_size!r} < min_batch_size={min_batch_size!r}.")
        if max_accumulation < 1 or adapt_every_n_steps < 1:
            raise ValueError(
                f"`max_accumulation` and `adapt_every_n_steps` must be at least 1, got {max_accumulation=}, "
                f"{adapt_every_n_steps=}."
            )
        if min_improvement < 0 or lr_gain_power < 0:
            raise ValueError(
                f"`min_improvement` and `lr_gain_power` must be >= 0, got {min_improvement=}, {lr_gain_power=}."
            )
        self.max_batch_size = max_batch_size
        self.min_batch_size = min_batch_size
        self.max_micro_batch_size = max_micro_batch_size
        self.max_accumulation = max_accumulation
        self.adapt_every_n_steps = adapt_every_n_steps
        self.min_improvement = min_improvement
        self.lr_gain_power = lr_gain_power
        self.scale_schedulers = scale_schedulers
        #: ``M₀``: the global batch of the first step, the one the learning rate was tuned for.
        self.base_batch_size: int | None = None
        #: The configuration in use: micro-batch per rank ``m`` and accumulation ``K``.
        self.micro_batch_size = 0
        self.accumulation = 1
        #: Base-batch steps of scale-invariant progress (the sum of the gains).
        self.progress = 0.0
        #: One row per adopted configuration: step, micro_batch_size, accumulation, batch_size, noise_scale, goodput.
        self.decisions: list[dict[str, float]] = []
        #: Seconds per optimizer step of each configuration tried (their medians fit the step-time model).
        self.step_times = StepTimes()
        self._timed_config: tuple[int, int] | None = None  # (m, K) of the last step, to skip a change's first
        self._restored: tuple[int, int] | None = None
        # A decided configuration not in use yet: (m, K, at_batch), at_batch None for "from the next epoch".
        self._pending_change: tuple[int, int, int | None] | None = None
        self._saved_reload: int | None = None
        self._datamodule: BatchSizeAdjustable | None = None
        self._last_step_end: float | None = None
        self._gain = 1.0
        self._saved_lrs: list[float] = []
        self._scheduler_steps_added = 0
        self._hook_handles: list[Any] = []
        self._min_accumulation = 1

    # -- setup -----------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the DataModule, apply a restored configuration, and hook the optimizers' steps."""
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(datamodule, BatchSizeAdjustable):
            what = (
                "no DataModule was given"
                if datamodule is None
                else f"{type(datamodule).__name__} has no `batch_size` attribute and `set_batch_size` method"
            )
            raise TypeError(
                f"AdaptiveBatchSize changes the batch size through the DataModule, but {what} "
                "(`set_batch_size(batch_size, at_batch=None)`, see lightning_patterns.adaptive.BatchSizeAdjustable). "
                "Pass a DataModule that has them, such as "
                "lightning_patterns.data.InMemoryDataModule, to `trainer.fit(model, datamodule=...)`."
            )
        self._datamodule = datamodule
        one_process = trainer.world_size == 1  # one worker: even a strategy that reports norms has one gradient
        self._min_accumulation = 2 if one_process else 1
        if self._restored is not None:
            self.micro_batch_size, self.accumulation = self._restored
        else:
            self.micro_batch_size, self.accumulation = int(datamodule.batch_size), trainer.accumulate_grad_batches
            if self.accumulation < self._min_accumulation:
                self._split_first_batch()
        datamodule.set_batch_size(self.micro_batch_size, at_batch=None)
        if self._pending_change is not None and self._pending_change[2] is not None:
            # Saved between a mid-epoch decision and its batch: the resumed epoch switches at the same batch.
            datamodule.set_batch_size(self._pending_change[0], at_batch=self._pending_change[2])
        trainer.accumulate_grad_batches = self.accumulation
        super().on_fit_start(trainer, pl_module)  # after the accumulation is restored: it picks the source
        for optimizer in trainer.optimizers:
            self._hook_handles += [
                optimizer.register_step_pre_hook(self._scale_learning_rate),
                optimizer.register_step_post_hook(self._restore_learning_rate),
            ]

    def _split_first_batch(self) -> None:
        """One process: measure from two micro-batches of half the batch each, from the first step on."""
        if self.max_accumulation < 2 or self.micro_batch_size < 2:
            raise ValueError(
                "AdaptiveBatchSize in one process accumulates two micro-batches per step (their gradients measure the "
                f"noise scale), but max_accumulation={self.max_accumulation!r} and the DataModule's "
                f"batch_size={self.micro_batch_size!r} leave no room for two. Use max_accumulation >= 2 and a batch "
                "size >= 2."
            )
        log.info(
            "AdaptiveBatchSize: one process; each step of %d samples is two micro-batches of %d (measures the "
            "gradient noise scale)",
            2 * (self.micro_batch_size // 2),
            self.micro_batch_size // 2,
        )
        self.micro_batch_size, self.accumulation = self.micro_batch_size // 2, 2

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks and put back the Trainer's reload setting."""
        super().teardown(trainer, pl_module, stage)
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        if self._saved_reload is not None:
            trainer.reload_dataloaders_every_n_epochs = self._saved_reload  # type: ignore[attr-defined]
            self._saved_reload = None

    # -- the learning rate -----------------------------------------------------------------------------------------
    def gain(self, batch_size: int) -> float:
        """AdaScale's gain for a global batch of ``batch_size`` at the current noise scale (``1`` before any)."""
        noise_scale = self.ema.noise_scale
        if self.base_batch_size is None or noise_scale is None or batch_size < 1:
            return 1.0
        return float(adascale_gain(batch_size / self.base_batch_size, noise_scale, self.base_batch_size))

    def _scale_learning_rate(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._gain = self.gain(sum(self._step_batches) * self._world_size)
        factor = self._gain**self.lr_gain_power
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def _restore_learning_rate(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved_lrs, strict=True):
            group["lr"] = lr

    def learning_rate(self, trainer: pl.Trainer) -> float:
        """The learning rate the last step used: the first group's, times the gain."""
        return super().learning_rate(trainer) * float(self._gain**self.lr_gain_power)

    # -- each step -------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adopt a configuration decided in the last epoch: the loader was just rebuilt with it."""
        self._last_step_end = None  # the first step of an epoch waits for a new loader
        if self._pending_change is not None:
            micro, accumulation, at_batch = self._pending_change
            self._pending_change = None
            if at_batch is None:
                self.micro_batch_size, self.accumulation = micro, accumulation
                trainer.accumulate_grad_batches = self.accumulation
            else:  # the epoch ended before its batch (the loader drops the change too)
                self._datamodule.set_batch_size(self.micro_batch_size, at_batch=None)  # type: ignore[union-attr]
        if self._saved_reload is not None:
            trainer.reload_dataloaders_every_n_epochs = self._saved_reload  # type: ignore[attr-defined]
            self._saved_reload = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Adopt a mid-epoch change at its batch: the loader switched its batch size there."""
        pending = self._pending_change
        if pending is not None and pending[2] == batch_idx:
            self.micro_batch_size, self.accumulation = pending[0], pending[1]
            trainer.accumulate_grad_batches = self.accumulation
            self._pending_change = None
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation is not part of the next step's time."""
        self._last_step_end = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Time the step, advance progress and schedulers, and decide every ``adapt_every_n_steps`` steps."""
        stepped = trainer.global_step != self._steps_seen
        if stepped:
            self._time_step()
            if self.base_batch_size is None:
                self.base_batch_size = sum(self._step_batches) * self._world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not stepped:
            return
        self.progress += self._gain
        if self.scale_schedulers:
            self._advance_schedulers(trainer)
        if trainer.global_step % self.adapt_every_n_steps == 0:
            self._adapt(trainer, batch_idx)
        self._last_step_end = time.perf_counter()  # our own work above belongs to this step

    def _time_step(self) -> None:
        now, batches = time.perf_counter(), self._step_batches
        config = (batches[0], len(batches)) if batches and min(batches) == max(batches) else None
        # The first step of a configuration also re-plans the loader and allocates for the new shapes: not timed.
        if self._last_step_end is not None and config is not None and config == self._timed_config:
            self.step_times.add(config[0], config[1], now - self._last_step_end)
        self._timed_config = config

    def _advance_schedulers(self, trainer: pl.Trainer) -> None:
        """Step each per-step scheduler so that its count of steps follows ``floor(progress)``."""
        due = math.floor(self.progress) - trainer.global_step - self._scheduler_steps_added
        if due <= 0:
            return
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and config.frequency == 1 and not config.reduce_on_plateau:
                for _ in range(due):
                    config.scheduler.step()  # type: ignore[call-arg]
        self._scheduler_steps_added += due

    # -- deciding --------------------------------------------------------------------------------------------------
    def step_time_model(self) -> StepTimeModel | None:
        """The step-time model fitted to the recent step times of each configuration (``None`` before any)."""
        return self.step_times.model()

    def _switch_batch(self, batch_idx: int, accumulation: int) -> int:
        """The first batch a mid-epoch change can take effect at, the same on every rank.

        Lightning has fetched batch ``batch_idx + 1`` already, so the earliest is ``batch_idx + 2``; and the
        change lands on a step boundary of both accumulations (Lightning steps when the epoch's batch count is a
        multiple of ``K``), so no step mixes the two configurations.
        """
        period = math.lcm(self.accumulation, accumulation)
        return -(-(batch_idx + 2) // period) * period

    def _adapt(self, trainer: pl.Trainer, batch_idx: int) -> None:
        decision: tuple[int, int, float] | None = None
        if self._pending_change is None:
            self._read_back(trainer)
            decision = self._decide()
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision is None:
            return
        micro, accumulation, goodput = decision
        assert self._datamodule is not None  # checked in on_fit_start
        at_batch: int | None = self._switch_batch(batch_idx, accumulation)
        try:
            # Every rank gets the same batch (same batch_idx, same broadcast decision), so all switch together.
            self._datamodule.set_batch_size(micro, at_batch=at_batch)
        except ValueError as error:
            log.debug("AdaptiveBatchSize: no change within this epoch (%s); from the next one instead", error)
            at_batch = None
            self._datamodule.set_batch_size(micro, at_batch=None)
            if self._saved_reload is None:
                self._saved_reload = trainer.reload_dataloaders_every_n_epochs  # type: ignore[attr-defined]
            trainer.reload_dataloaders_every_n_epochs = 1  # type: ignore[attr-defined]
        self._pending_change = (micro, accumulation, at_batch)
        batch_size = micro * accumulation * self._world_size
        self.decisions.append(
            {
                "step": float(trainer.global_step),
                "micro_batch_size": float(micro),
                "accumulation": float(accumulation),
                "batch_size": float(batch_size),
                "noise_scale": self.ema.noise_scale or math.nan,
                "goodput": goodput,
            }
        )
        log.info(
            "AdaptiveBatchSize: batch %d per rank × %d accumulated × %d ranks = %d from %s "
            "(noise scale %.1f, predicted goodput %.1f samples/s)",
            micro,
            accumulation,
            self._world_size,
            batch_size,
            "the next epoch" if at_batch is None else f"batch {at_batch} of this epoch",
            self.ema.noise_scale or math.nan,
            goodput,
        )

    def _decide(self) -> tuple[int, int, float] | None:
        """A better configuration: one promising ``min_improvement`` more goodput, or any if the current is barred.

        This is rank zero's view; the caller broadcasts it.
        """
        stats, model, base = self.ema.stats, self.step_time_model(), self.base_batch_size
        if stats is None or model is None or base is None:
            return None
        if stats.grad_sqr <= 0:
            # Not "all noise": consecutive steps give |G|² ≈ g_t · g_(t-1), negative when steps oscillate.
            log.info("AdaptiveBatchSize: |G|² not measurable yet (%.3g); keeping the batch size", stats.grad_sqr)
            return None
        noise_scale = stats.noise_scale
        world = self._world_size
        min_batch, max_batch = self.min_batch_size or base, self.max_batch_size or 16 * base
        best = best_batch_size(
            model,
            noise_scale,
            base_batch_size=base,
            max_batch_size=max_batch,
            min_batch_size=min_batch,
            max_micro_batch_size=self.max_micro_batch_size,
            max_accumulation=self.max_accumulation,
            replicas=world,
            min_accumulation=self._min_accumulation,
        )
        m, k = self.micro_batch_size, self.accumulation
        if (best.micro_batch_size, best.accumulation) == (m, k):
            return None
        current = float(model.throughput(m, k, world) * efficiency(world * m * k, noise_scale, base))
        allowed = min_batch <= world * m * k <= max_batch and k >= self._min_accumulation
        if allowed and best.goodput <= current * (1 + self.min_improvement):
            return None
        return best.micro_batch_size, best.accumulation, best.goodput

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The noise-scale state, the configuration, ``M₀``, the step times and the progress."""
        pending = self._pending_change
        current = (
            pending[:2] if pending is not None and pending[2] is None else (self.micro_batch_size, self.accumulation)
        )
        return {
            "switch": list(pending) if pending is not None and pending[2] is not None else None,
            **super().state_dict(),
            "base_batch_size": self.base_batch_size,
            "micro_batch_size": current[0],
            "accumulation": current[1],
            "progress": self.progress,
            "scheduler_steps_added": self._scheduler_steps_added,
            "timings": self.step_times.state_dict(),
            "decisions": list(self.decisions),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue with a checkpoint's configuration (applied at ``fit`` start), step times and progress."""
        super().load_state_dict(state_dict)
        self.base_batch_size = state_dict["base_batch_size"]
        self._restored = (int(state_dict["micro_batch_size"]), int(state_dict["accumulation"]))
        switch = state_dict.get("switch")
        self._pending_change = None if switch is None else (int(switch[0]), int(switch[1]), int(switch[2]))
        self.progress = float(state_dict["progress"])
        self._scheduler_steps_added = int(state_dict["scheduler_steps_added"])
        self.step_times.load_state_dict(state_dict["timings"])
        self.decisions = list(state_dict["decisions"])


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    AdaptiveBatchSize = _AdaptiveBatchSize
    GradientNoiseScale = _GradientNoiseScale
