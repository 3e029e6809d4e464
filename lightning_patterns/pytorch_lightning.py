"""lightning_patterns' Lightning-facing classes built for the ``pytorch_lightning`` package.

Use these with ``import pytorch_lightning as pl`` when a process also imports ``lightning`` (otherwise the plain
names, such as ``lightning_patterns.strategies.ParameterServerStrategy``, already give these classes)::

    import pytorch_lightning as pl
    from lightning_patterns.pytorch_lightning import DataMetricsCallback, ParameterServerStrategy

    trainer = pl.Trainer(strategy=ParameterServerStrategy(num_servers=2), callbacks=[DataMetricsCallback()])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_patterns import _lightning

__all__ = [
    "AdaptiveBatchSize",
    "CNNClassifier",
    "DataMetricsCallback",
    "EmbeddingCTR",
    "GradientNoiseScale",
    "IDXDataModule",
    "ImageClassifier",
    "InMemoryDataModule",
    "MLPClassifier",
    "ParameterServerStrategy",
    "ShardedStreamingDataModule",
]

__getattr__ = _lightning.class_getter(
    __name__, [*__all__, "LightningPatternsCLI", "TinyRegressor"], package="pytorch_lightning"
)

if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    from lightning_patterns.adaptive.callbacks import _AdaptiveBatchSize as AdaptiveBatchSize
    from lightning_patterns.adaptive.callbacks import _GradientNoiseScale as GradientNoiseScale
    from lightning_patterns.callbacks import _DataMetricsCallback as DataMetricsCallback
    from lightning_patterns.ctr import _EmbeddingCTR as EmbeddingCTR
    from lightning_patterns.data.datamodule import _ShardedStreamingDataModule as ShardedStreamingDataModule
    from lightning_patterns.data.idx_datamodule import _IDXDataModule as IDXDataModule
    from lightning_patterns.data.in_memory import _InMemoryDataModule as InMemoryDataModule
    from lightning_patterns.models import _CNNClassifier as CNNClassifier
    from lightning_patterns.models import _ImageClassifier as ImageClassifier
    from lightning_patterns.models import _MLPClassifier as MLPClassifier
    from lightning_patterns.strategies.parameter_server.strategy import (
        _ParameterServerStrategy as ParameterServerStrategy,
    )
