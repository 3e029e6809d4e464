"""Unique ids of a batch, their routes to servers, and gradients summed per unique row.

The bytes a worker moves per step are set by the *unique* rows of its batch: a batch of 4,096 impressions
touching 1,000 distinct items pulls and pushes 1,000 item rows, not 4,096. So a worker:

1. deduplicates the batch's ids (:func:`unique_ids`): the unique ids, and for each position of the batch the
   index of its id among them (the batch's ids remapped to a compact table);
2. splits the unique ids by server (:func:`route_ids`) and pulls each server's rows;
3. after backward, has one gradient row per unique id (autograd sums the uses of each compact row) and pushes
   each server its rows' gradients.

A server sums what the workers pushed per unique row (:class:`RowGradientAccumulator`), divides by the number
of workers (each worker's loss is a mean over its own batch, so the mean over workers is the loss of the global
batch, as in the dense path), and applies one optimizer step (:meth:`~.store.RowStore.apply`).
"""

from __future__ import annotations

import torch

from lightning_patterns.strategies.parameter_server.sparse.sharding import RowSharding

__all__ = ["RowGradientAccumulator", "accumulate_rows", "route_ids", "unique_ids"]


def unique_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids of ``ids`` (ascending), and ``ids`` remapped to positions among them (same shape).

    >>> unique, compact = unique_ids(torch.tensor([[7, 3], [7, 9]]))
    >>> unique.tolist(), compact.tolist()
    ([3, 7, 9], [[1, 0], [1, 2]])
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"Embedding ids must be int64 or int32, got {ids.dtype}.")
    unique, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
    return unique.to(torch.int64), inverse.reshape(ids.shape)


def accumulate_rows(inverse: torch.Tensor, grads: torch.Tensor, num_unique: int) -> torch.Tensor:
    """Sum the gradient rows ``grads`` (``[n, dim]``) of positions mapped to the same unique row by ``inverse``.

    >>> accumulate_rows(torch.tensor([1, 0, 1]), torch.tensor([[1.0], [2.0], [4.0]]), 2).tolist()
    [[2.0], [5.0]]
    """
    summed = torch.zeros(num_unique, grads.shape[1], dtype=grads.dtype)
    return summed.index_add_(0, inverse.reshape(-1), grads)


def route_ids(ids: torch.Tensor, sharding: RowSharding) -> list[torch.Tensor]:
    """For each server, the positions in ``ids`` (a 1-D tensor) of the ids it holds, ascending.

    ``ids[positions[s]]`` is what to pull from server ``s``; its reply goes to ``rows[positions[s]]``.

    >>> from lightning_patterns.strategies.parameter_server.sparse import RangeRowSharding
    >>> [p.tolist() for p in route_ids(torch.tensor([0, 9, 1, 5]), RangeRowSharding(10, 2))]
    [[0, 2], [1, 3]]
    """
    servers = torch.from_numpy(sharding.server_of(ids))
    order = torch.argsort(servers, stable=True)
    counts = torch.bincount(servers, minlength=sharding.num_servers).tolist()
    return list(torch.split(order, counts))


class RowGradientAccumulator:
    """Sums row gradients pushed in several parts (workers, micro-batches) into one gradient per unique row.

    Parts are summed in the order they were added, so the result is deterministic for a given order.

    Args:
        dim: values per row.
        dtype: the gradients' dtype.

    >>> accumulator = RowGradientAccumulator(dim=1)
    >>> accumulator.add(torch.tensor([4, 2]), torch.tensor([[1.0], [2.0]]))
    >>> accumulator.add(torch.tensor([4]), torch.tensor([[3.0]]))
    >>> ids, grads = accumulator.drain(divide_by=2)
    >>> ids.tolist(), grads.tolist(), accumulator.num_parts
    ([2, 4], [[1.0], [2.0]], 0)
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32) -> None:
        self.dim = dim
        self.dtype = dtype
        self._ids: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []

    @property
    def num_parts(self) -> int:
        """Parts added since the last :meth:`drain`."""
        return len(self._ids)

    def add(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """Add the gradients ``grads`` (``[n, dim]``) of rows ``ids`` (``[n]``, repeats allowed)."""
        if ids.dim() != 1 or grads.shape != (ids.numel(), self.dim) or grads.dtype != self.dtype:
            raise ValueError(
                f"Expected ids of shape [n] and {self.dtype} gradients of shape [n, {self.dim}], got ids of shape "
                f"{tuple(ids.shape)} and {grads.dtype} gradients of shape {tuple(grads.shape)}."
            )
        self._ids.append(ids.to(torch.int64))
        self._grads.append(grads)

    def drain(self, divide_by: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The unique ids (ascending) and their summed gradients divided by ``divide_by``; then start afresh."""
        if not self._ids:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim, dtype=self.dtype)
        unique, inverse = unique_ids(torch.cat(self._ids))
        summed = accumulate_rows(inverse, torch.cat(self._grads), unique.numel())
        self._ids.clear()
        self._grads.clear()
        if divide_by != 1:
            summed.div_(divide_by)
        return unique, summed
