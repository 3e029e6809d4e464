"""Data-ingestion and distributed-training patterns as parts for PyTorch Lightning.

The patterns of *Distributed Machine Learning Patterns* (sharding, streaming from remote filesystems,
epoch caching, batching, a parameter server) as parts to add to an existing ``Trainer`` and
``LightningModule``.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"
