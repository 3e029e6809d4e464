"""GradientNoiseScale and AdaptiveBatchSize under real Trainers in one process, on both Lightning packages."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_patterns.adaptive.goodput import adascale_gain
from lightning_patterns.adaptive.noise_scale import GradientNormSample, NoiseScaleEMA, estimate_gradient_stats
from lightning_patterns.testing.gradient_noise import LinearRegressionNoise

if TYPE_CHECKING:
    from tests.conftest import LightningPackage

PROBLEM = LinearRegressionNoise(num_samples=4096, dim=8, noise=1.0, offset=0.5, seed=0)
QUIET = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def _regression(lightning: LightningPackage) -> Any:
    """Linear regression at PROBLEM's weights with SGD(lr=0): the weights never move, so the exact values hold."""

    class Regression(lightning.pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(PROBLEM.dim, 1, bias=False)
            with torch.no_grad():
                self.linear.weight.copy_(PROBLEM.weights[None])
            self.micro_batches: list[list[int]] = []  # sample indices of each micro-batch, in order

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, index = batch
            self.micro_batches.append(index.tolist())
            return 0.5 * ((self.linear(x).squeeze(1) - y) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Regression()


def _loader(batch_size: int) -> DataLoader[Any]:
    data = TensorDataset(PROBLEM.inputs, PROBLEM.targets, torch.arange(PROBLEM.num_samples))
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def _offline_ema(micro_batches: list[list[int]], accumulation: int, smoothing: float) -> NoiseScaleEMA:
    """The same estimate recomputed in float64 from the batches the model saw (the callback's plumbing check)."""
    ema = NoiseScaleEMA(smoothing)
    grads = [PROBLEM.batch_gradient(torch.tensor(indices)) for indices in micro_batches]
    # Consecutive steps pair steps 1-2, 3-4, ...; micro-batches group each step's K.
    group = 2 if accumulation == 1 else accumulation
    groups = [grads[i : i + group] for i in range(0, len(grads) - group + 1, group)]
    sizes = [[len(b) for b in micro_batches[i : i + group]] for i in range(0, len(grads) - group + 1, group)]
    for group, size in zip(groups, sizes, strict=True):
        mean = sum(group) / len(group)
        inverse = sum(1 / s for s in size) / len(size)
        small = float(sum(g @ g for g in group) / len(group))
        sample = GradientNormSample(small, 1 / inverse, float(mean @ mean), len(group) / inverse)
        ema.update(estimate_gradient_stats(sample))
    return ema


@pytest.mark.parametrize(
    ("accumulation", "steps", "source"), [(1, 1500, "consecutive_steps"), (4, 400, "micro_batches")]
)
def test_noise_scale_in_one_process_matches_the_exact_value(
    lightning_package: LightningPackage, tmp_path: Path, accumulation: int, steps: int, source: str
) -> None:
    """Issue 15: within 15% of |G|², tr(Σ) and B computed from every per-sample gradient; logged to the logger."""
    callback = lightning_package.classes.GradientNoiseScale(smoothing=0.995, log_every_n_steps=100)
    model = _regression(lightning_package)
    trainer = lightning_package.pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulation,
        callbacks=[callback],
        logger=lightning_package.pl.loggers.CSVLogger(str(tmp_path)),
        **QUIET,
    )
    trainer.fit(model, _loader(16))
    assert callback.source_name == source
    exact, stats = PROBLEM.exact(), callback.stats
    assert stats is not None
    assert stats.grad_sqr == pytest.approx(exact.grad_sqr, rel=0.15)
    assert stats.grad_var == pytest.approx(exact.grad_var, rel=0.15)
    assert callback.noise_scale == pytest.approx(exact.noise_scale, rel=0.15)
    # The callback's numbers are the estimator applied to exactly the batches trained on.
    offline = _offline_ema(model.micro_batches, accumulation, smoothing=0.995).stats
    assert offline is not None
    assert stats.grad_sqr == pytest.approx(offline.grad_sqr, rel=1e-3)
    assert stats.grad_var == pytest.approx(offline.grad_var, rel=1e-3)
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    header = logged.splitlines()[0]
    for name in ("gns/noise_scale", "gns/grad_sqr", "gns/grad_var", "gns/batch_size"):
        assert name in header
    assert len(logged.splitlines()) - 1 == steps // 100
    assert {100.0, 200.0} <= {row["step"] for row in callback.history}  # and at each epoch's end
    assert callback.history[0]["batch_size"] == 16 * accumulation


class _Recorder:
    """Per optimizer step: epoch, micro-batch sizes, accumulation, the learning rate used and the expected one."""

    def __init__(self, adaptive: Any, base_lr: float) -> None:
        self.adaptive = adaptive
        self.base_lr = base_lr
        self.rows: list[dict[str, float]] = []
        self._micro: list[int] = []
        self._steps = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._micro.append(len(batch[0]))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        batch = sum(self._micro)
        noise_scale = self.adaptive.noise_scale
        base = self.adaptive.base_batch_size
        expected = 1.0
        if noise_scale is not None and base is not None:
            expected = float(adascale_gain(batch / base, noise_scale, base))
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "micro": max(self._micro),
                "accumulation": trainer.accumulate_grad_batches,
                "batch": batch,
                "lr": optimizer.param_groups[0]["lr"],
                "schedule": pl_module.lr_schedule_value(),
                "expected_lr": expected * pl_module.lr_schedule_value(),
            }
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self._steps:
            return  # accumulating
        self._steps = trainer.global_step
        self._micro = []
        # After the step the optimizer holds the unscaled rate again (what schedulers see).
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(pl_module.lr_schedule_value())


def _classifier(lightning: LightningPackage) -> Any:
    """MLPClassifier with SGD and a per-step StepLR, to check scale-invariant progress."""

    class Classifier(lightning.classes.MLPClassifier):  # type: ignore[name-defined,misc]
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.999)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}

        def lr_schedule_value(self) -> float:
            return float(self.scheduler.get_last_lr()[0])

    return Classifier(hidden_dim=16, lr=0.05)


def test_adaptive_batch_size_end_to_end(lightning_package: LightningPackage, tmp_path: Path) -> None:
    """One process, InMemoryDataModule: split base batch, a goodput decision, the next epoch, AdaScale, a plot."""
    torch.manual_seed(0)
    pl, classes = lightning_package.pl, lightning_package.classes
    adaptive = classes.AdaptiveBatchSize(
        adapt_every_n_steps=8, min_batch_size=128, max_batch_size=256, log_every_n_steps=4, plot="gns.png"
    )
    recorder = type("Recorder", (_Recorder, pl.Callback), {})(adaptive, base_lr=0.05)
    data = classes.InMemoryDataModule(train_samples=1024, val_samples=128, batch_size=32)
    model = _classifier(lightning_package)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[adaptive, recorder],
        logger=pl.loggers.CSVLogger(str(tmp_path)),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, data)

    first = [row for row in recorder.rows if row["epoch"] == 0]
    second = [row for row in recorder.rows if row["epoch"] == 1]
    # One process: the batch of 32 is two micro-batches of 16 from the first step (unbiased noise measurement).
    assert adaptive.base_batch_size == 32
    assert {(row["micro"], row["accumulation"]) for row in first} == {(16, 2)}
    # min_batch_size=128 rules out the current 32, so the first decision (every 8 steps, once |G|² > 0 is measured)
    # picks a batch in [128, 256] within the first epoch of 32 steps.
    decision = adaptive.decisions[0]
    assert decision["step"] % 8 == 0
    assert decision["step"] < 32
    assert 128 <= decision["batch_size"] <= 256
    assert decision["accumulation"] >= 2
    # ... applied from the next epoch (the loader rebuilt), micro-batch and accumulation together.
    full = [row for row in second if row["batch"] == decision["batch_size"]]
    assert full
    assert {(row["micro"], row["accumulation"]) for row in full} == {
        (decision["micro_batch_size"], decision["accumulation"])
    }
    assert data.batch_size == decision["micro_batch_size"]
    # Step times: every step but an epoch's first and a configuration's first (loader re-plan, new shapes).
    kept = {(m, k): n for m, k, _, n in adaptive.step_times.summary()}
    assert kept[(16, 2)] == len(first) - 1
    assert kept[(decision["micro_batch_size"], decision["accumulation"])] <= len(full) - 1
    # AdaScale: the rate used is the scheduler's times gain(S), 1 < gain <= S once the batch grew.
    for row in recorder.rows:
        assert row["lr"] == pytest.approx(row["expected_lr"], rel=1e-6)
    assert all(row["lr"] == pytest.approx(row["expected_lr"]) for row in first)
    scaled = full[-1]
    scale = scaled["batch"] / 32
    assert 1.0 < scaled["lr"] / scaled["schedule"] <= scale
    # Scale-invariant progress: the per-step scheduler stepped floor(progress) times, more than the step count.
    assert adaptive.progress > trainer.global_step
    assert model.scheduler.last_epoch == math.floor(adaptive.progress)
    # Logged and plotted.
    log_dir = Path(trainer.logger.log_dir)
    assert (log_dir / "gns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert "gns/noise_scale" in header
    assert "gns/lr" in header


def test_adaptive_batch_size_resumes_from_a_checkpoint(lightning_package: LightningPackage, tmp_path: Path) -> None:
    """The configuration, M₀, progress and noise averages come back; the DataModule gets the saved batch size."""
    pl, classes = lightning_package.pl, lightning_package.classes

    def run(max_epochs: int, ckpt: str | None) -> tuple[Any, list[tuple[int, int, int]], Any]:
        torch.manual_seed(0)
        adaptive = classes.AdaptiveBatchSize(adapt_every_n_steps=8, min_batch_size=128, max_batch_size=256)
        seen: list[tuple[int, int, int]] = []  # (epoch, micro-batch size, accumulation) of every batch
        record = pl.callbacks.LambdaCallback(
            on_train_batch_start=lambda trainer, module, batch, index: seen.append(
                (trainer.current_epoch, len(batch[0]), trainer.accumulate_grad_batches)
            )
        )
        data = classes.InMemoryDataModule(train_samples=1024, val_samples=64, batch_size=32)
        trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[adaptive, record], logger=False, **QUIET)
        trainer.fit(classes.MLPClassifier(hidden_dim=8, optimizer="sgd", lr=0.01), data, ckpt_path=ckpt)
        return adaptive, seen, trainer

    first, _, trainer = run(1, None)
    path = str(tmp_path / "adaptive.ckpt")
    trainer.save_checkpoint(path)
    decided = first.decisions[0]
    resumed, seen, trainer = run(2, path)
    assert resumed.base_batch_size == 32
    # The resumed epoch (1) trains with the configuration decided before the checkpoint, not the DataModule's 32.
    assert (1, decided["micro_batch_size"], decided["accumulation"]) == seen[0]
    assert resumed.decisions[0] == decided
    assert resumed.progress > first.progress
    assert resumed.ema.count > first.ema.count
    assert resumed.history[: len(first.history)] == first.history
    before = {(m, k): n for m, k, _, n in first.step_times.summary()}
    after = {(m, k): n for m, k, _, n in resumed.step_times.summary()}
    assert set(before) <= set(after)  # the step times came back from the checkpoint ...
    assert all(after[config] >= n for config, n in before.items())  # ... and went on


def test_adaptive_batch_size_needs_a_batch_size_adjustable_datamodule(lightning_package: LightningPackage) -> None:
    trainer = lightning_package.pl.Trainer(
        max_steps=2, callbacks=[lightning_package.classes.AdaptiveBatchSize()], logger=False, **QUIET
    )
    with pytest.raises(TypeError, match=r"no DataModule was given \(`set_batch_size\(batch_size, at_batch=None\)`"):
        trainer.fit(_regression(lightning_package), _loader(16))


def test_adaptive_batch_size_in_one_process_needs_room_for_two_micro_batches(
    lightning_package: LightningPackage,
) -> None:
    classes = lightning_package.classes
    trainer = lightning_package.pl.Trainer(
        max_steps=2, callbacks=[classes.AdaptiveBatchSize(max_accumulation=1)], logger=False, **QUIET
    )
    data = classes.InMemoryDataModule(train_samples=64, val_samples=16, batch_size=16)
    with pytest.raises(ValueError, match="accumulates two micro-batches per step"):
        trainer.fit(classes.MLPClassifier(hidden_dim=8), data)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("GradientNoiseScale", {"smoothing": 1.0}, "`smoothing` must be in"),
        ("GradientNoiseScale", {"log_every_n_steps": 0}, "`log_every_n_steps` must be at least 1"),
        ("GradientNoiseScale", {"measure_every_n_steps": 0}, "`measure_every_n_steps` must be at least 1"),
        ("AdaptiveBatchSize", {"max_batch_size": 0}, "`max_batch_size` must be at least 1"),
        ("AdaptiveBatchSize", {"min_batch_size": 64, "max_batch_size": 32}, "Cannot have max_batch_size=32"),
        ("AdaptiveBatchSize", {"max_accumulation": 0}, "`max_accumulation` and `adapt_every_n_steps`"),
        ("AdaptiveBatchSize", {"adapt_every_n_steps": 0}, "`max_accumulation` and `adapt_every_n_steps`"),
        ("AdaptiveBatchSize", {"min_improvement": -0.1}, "`min_improvement` and `lr_gain_power` must be >= 0"),
    ],
)
def test_invalid_callback_arguments(name: str, kwargs: dict[str, Any], message: str) -> None:
    from lightning_patterns import callbacks

    with pytest.raises(ValueError, match=message):
        getattr(callbacks, name)(**kwargs)


@pytest.mark.parametrize(("accumulation", "source"), [(1, "consecutive_steps"), (2, "micro_batches")])
def test_measuring_every_n_steps_measures_exactly_those(
    lightning_package: LightningPackage, accumulation: int, source: str
) -> None:
    """measure_every_n_steps=3: one step in 3 (a pair of steps in 6), the same estimate over exactly those steps."""
    callback = lightning_package.classes.GradientNoiseScale(smoothing=0.9, measure_every_n_steps=3)
    model = _regression(lightning_package)
    trainer = lightning_package.pl.Trainer(
        max_steps=60, accumulate_grad_batches=accumulation, callbacks=[callback], logger=False, **QUIET
    )
    trainer.fit(model, _loader(16))
    assert callback.source_name == source
    steps = [model.micro_batches[i : i + accumulation] for i in range(0, 60 * accumulation, accumulation)]
    measured = [i for i in range(60) if (i % 6 < 2 if accumulation == 1 else i % 3 == 0)]
    assert callback.ema.count == (len(measured) // 2 if accumulation == 1 else len(measured))
    offline = _offline_ema([b for i in measured for b in steps[i]], accumulation, smoothing=0.9).stats
    assert offline is not None
    assert callback.stats is not None
    assert callback.stats.grad_sqr == pytest.approx(offline.grad_sqr, rel=1e-3)
    assert callback.stats.grad_var == pytest.approx(offline.grad_var, rel=1e-3)


def test_in_memory_datamodule_changes_batch_size_between_epochs_only() -> None:
    from lightning_patterns.adaptive import BatchSizeAdjustable
    from lightning_patterns.data import InMemoryDataModule

    data = InMemoryDataModule(train_samples=64, val_samples=16, batch_size=8)
    assert isinstance(data, BatchSizeAdjustable)
    data.set_batch_size(24)
    assert data.batch_size == 24
    with pytest.raises(ValueError, match="between epochs only, got at_batch=3"):
        data.set_batch_size(16, at_batch=3)
    with pytest.raises(ValueError, match="`batch_size` must be at least 1"):
        data.set_batch_size(0)
