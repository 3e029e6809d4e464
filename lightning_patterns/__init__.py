"""Data-ingestion and distributed-training patterns as parts for PyTorch Lightning.

The patterns of *Distributed Machine Learning Patterns* (sharding, streaming from remote filesystems,
epoch caching, batching, a parameter server) as parts to add to an existing ``Trainer`` and
``LightningModule``.
"""

from __future__ import annotations

# Importing the strategies registers "parameter_server" with Lightning, so `Trainer(strategy="parameter_server")`
# works once `lightning_patterns` is imported.
import lightning_patterns.strategies  # noqa: F401

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"
