"""Data-ingestion and distributed-training patterns as parts for PyTorch Lightning.

The patterns of *Distributed Machine Learning Patterns* (sharding, streaming from remote filesystems,
epoch caching, batching, a parameter server) as parts to add to an existing ``Trainer`` and
``LightningModule``.

Importing the package imports neither torch nor Lightning. It registers ``strategy="parameter_server"`` with
each Lightning package (``lightning.pytorch`` and ``pytorch_lightning``): at once with those already imported,
and with the others when they are imported.
"""

from __future__ import annotations

from lightning_patterns import _lightning

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"

_lightning.register_when_imported()
