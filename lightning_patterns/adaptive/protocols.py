"""The two seams of adaptive batch sizes: DataModules whose batch size changes, strategies that report norms.

:class:`BatchSizeAdjustable` is what :class:`~lightning_patterns.callbacks.AdaptiveBatchSize` needs of the
DataModule; :class:`ReportsGradientNorms` is how a strategy that synchronises gradients itself (the parameter
server) hands :class:`~lightning_patterns.callbacks.GradientNoiseScale` the two norms of each step. Both are
structural: implement the members, no base class needed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from lightning_patterns.adaptive.noise_scale import GradientNormSample

__all__ = ["BatchSizeAdjustable", "ReportsGradientNorms"]


@runtime_checkable
class BatchSizeAdjustable(Protocol):
    """A DataModule whose training batch size (per rank) can change while training.

    Attributes:
        batch_size: the training batch size per rank currently asked for.
    """

    batch_size: int

    def set_batch_size(self, batch_size: int, at_batch: int | None = None) -> None:
        """Yield training batches of ``batch_size`` samples per rank from now on.

        Args:
            batch_size: samples per batch per rank, at least 1.
            at_batch: ``None``: from the next training loader the Trainer builds (the next epoch, when the
                Trainer is told to reload loaders). An integer ``n``: from batch ``n`` (0-based ``batch_idx``) of
                the current epoch on, without losing or repeating a sample; every rank is given the same ``n``.
                A DataModule that cannot change within an epoch, or has already produced batch ``n``, raises
                ``ValueError``.
        """
        ...  # pragma: no cover


@runtime_checkable
class ReportsGradientNorms(Protocol):
    """A strategy that sees each worker's gradient before averaging it, and can report the two norms.

    :class:`~lightning_patterns.callbacks.GradientNoiseScale` uses it with two or more workers: at the start of
    every micro-batch it calls :meth:`measure_gradient_norms` (the same steps on every rank), and after every
    optimizer step :meth:`gradient_norm_sample`. ``ParameterServerStrategy`` implements it: its servers measure the
    norms as they sum the workers' pushes.
    """

    def measure_gradient_norms(self, samples: int) -> None:
        """Measure the optimizer step under way, whose gradient on this rank averages ``samples`` samples (``0``: not).

        Called before each micro-batch with the step's samples so far on this rank, so the value in force when the
        step's last backward starts covers the whole step. A strategy that cannot measure raises ``ValueError``.
        """
        ...  # pragma: no cover

    def gradient_norm_sample(self) -> GradientNormSample | None:
        """The norms of the optimizer step just taken, the same on every rank, or ``None`` if not measured.

        ``small_sqr`` is the mean over workers of each pushed gradient's squared norm (each a mean over the
        worker's batch, before averaging), ``small_batch`` the harmonic mean of the workers' batch sizes,
        ``big_sqr`` the squared norm of the averaged gradient that was applied (a sum over servers of their
        shards' squared norms), ``big_batch = workers · small_batch``. Both are of the unscaled gradient (no
        ``GradScaler`` scale), before gradient clipping, accumulated over the step's micro-batches.
        """
        ...  # pragma: no cover
