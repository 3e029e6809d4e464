"""Batching patterns: how a worker's samples are grouped into batches.

- :class:`ClassBalancer`: class-balanced batches, at least ``min_per_class`` samples of every class in each
  batch, planned greedily over a bounded look-ahead so it works on streamed data; each sample is used
  exactly once and the number and sizes of batches never change (see :mod:`.balanced` for the tail).
- :func:`check_class_counts`: a clear error up front when a class is too rare for ``min_per_class``.
"""

from __future__ import annotations

from lightning_patterns.data.batching.balanced import BatchPlan, ClassBalancer, check_class_counts

__all__ = ["BatchPlan", "ClassBalancer", "check_class_counts"]
