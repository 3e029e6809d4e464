"""The rows of one table that one server holds: created on first use, updated row-wise, exported for checkpoints.

Memory is what was touched, not what the table could hold: a created row costs ``dim × itemsize`` for its
values, as much again for each optimizer state (one for Adagrad, two for Adam) and 8 bytes for its id. The index
from row id to storage slot is one ``int32`` per row of the *whole* table, allocated zeroed (the operating system
maps its pages on first write), so 10M rows cost at most 40 MB of index per server beside the 2.56 GB a
materialised ``10M × 64`` fp32 table would take. Storage grows by doubling, so creating rows is amortised
``O(1)`` per row, at the price of up to twice the rows' memory during one growth.

Why lazily created rows rather than materialised shards: a table's rows are touched with Zipf popularity, so
most rows of a large table are never touched in a run, and creating them would cost memory and checkpoint
bytes for nothing. A row's first value is a pure function of the table and the row
(:meth:`~.table.TableSpec.initial_rows`), so creating it late changes no result.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_patterns.strategies.parameter_server.sparse.optimizers import RowOptimizer
from lightning_patterns.strategies.parameter_server.sparse.sharding import RowSharding
from lightning_patterns.strategies.parameter_server.sparse.table import TableSpec

__all__ = ["RowStore", "TableShardArrays"]

_MIN_CAPACITY = 1024
TableShardArrays = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _distinct(ids: np.ndarray) -> np.ndarray:
    """The distinct values of ``ids``, ascending: a sort and a comparison (``np.unique`` hashes first, ~4× slower)."""
    ordered = np.sort(ids)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _has_repeats(ids: np.ndarray) -> bool:
    """Whether some id occurs twice; ``O(n)`` for ascending ids (what a worker's summed gradients have)."""
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return False
    return len(_distinct(ids)) != len(ids)


class RowStore:
    """The rows of one sparse table held by one server, with their optimizer state.

    Args:
        table: the table.
        sharding: the rule placing rows on servers; this store accepts only ids it places on ``server``.
        server: this server's index.
        optimizer: the row-wise update.

    Attributes:
        step: updates applied to the table so far (the optimizer's step count).

    >>> from lightning_patterns.strategies.parameter_server.sparse import RangeRowSharding, RowSGD
    >>> store = RowStore(TableSpec("t", num_rows=8, dim=2), RangeRowSharding(8, 2), server=1, optimizer=RowSGD(lr=1.0))
    >>> before = store.pull(torch.tensor([5, 7]))
    >>> store.apply(torch.tensor([5]), torch.ones(1, 2))
    >>> bool(torch.equal(store.pull(torch.tensor([5]))[0], before[0] - 1)), store.num_created
    (True, 2)
    """

    def __init__(self, table: TableSpec, sharding: RowSharding, server: int, optimizer: RowOptimizer) -> None:
        if sharding.num_rows != table.num_rows:
            raise ValueError(
                f"Table {table.name!r} has {table.num_rows} rows but its sharding covers {sharding.num_rows}; build "
                f"the sharding for the table's num_rows."
            )
        if not 0 <= server < sharding.num_servers:
            raise ValueError(
                f"server={server!r} is not one of the {sharding.num_servers} servers of table {table.name!r}."
            )
        self.table = table
        self.sharding = sharding
        self.server = server
        self.optimizer = optimizer
        self.step = 0
        index_dtype = np.int32 if table.num_rows < 2**31 - 1 else np.int64
        self._slot_plus_one = np.zeros(table.num_rows, dtype=index_dtype)  # 0: not created yet
        self._size = 0
        self._ids = np.empty(0, dtype=np.int64)
        self._values = torch.empty(0, table.dim, dtype=table.torch_dtype)
        self._state = {name: torch.empty(0, table.dim, dtype=table.torch_dtype) for name in optimizer.state_names}

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    @property
    def num_created(self) -> int:
        """Rows created so far."""
        return self._size

    @property
    def capacity(self) -> int:
        """Rows the storage holds room for before it grows."""
        return int(self._values.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the created rows, their optimizer state and ids (without spare capacity and the index)."""
        return self._size * (self.table.row_nbytes * (1 + len(self._state)) + 8)

    def _grow(self, needed: int) -> None:
        capacity = self._values.shape[0]
        if needed <= capacity:
            return
        capacity = min(max(needed, 2 * capacity, _MIN_CAPACITY), self.table.num_rows)
        dim, dtype = self.table.dim, self.table.torch_dtype
        values = torch.empty(capacity, dim, dtype=dtype)
        values[: self._size] = self._values[: self._size]
        self._values = values
        for name, old in self._state.items():
            state = torch.empty(capacity, dim, dtype=dtype)
            state[: self._size] = old[: self._size]
            self._state[name] = state
        ids = np.empty(capacity, dtype=np.int64)
        ids[: self._size] = self._ids[: self._size]
        self._ids = ids

    def _create(self, ids: np.ndarray, values: torch.Tensor) -> None:
        """Create the distinct, not yet created rows ``ids`` with ``values`` and fresh optimizer state."""
        start, stop = self._size, self._size + len(ids)
        self._grow(stop)
        self._ids[start:stop] = ids
        self._values[start:stop] = values
        for name, state in self._state.items():
            state[start:stop] = self.optimizer.initial_state(name, len(ids), self.table.dim, self.table.torch_dtype)
        self._slot_plus_one[ids] = np.arange(start + 1, stop + 1)
        self._size = stop

    def _checked_ids(self, ids: torch.Tensor, what: str) -> np.ndarray:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(
                f"Table {self.table.name!r} on server {self.server}: {what} needs ids as a 1-D int64 tensor, got {got}."
            )
        flat = ids.numpy()
        servers = self.sharding.server_of(flat)
        foreign = servers != self.server
        if foreign.any():
            raise ValueError(
                f"Server {self.server} of table {self.table.name!r} got rows it does not hold: ids "
                f"{flat[foreign][:5].tolist()} belong to servers {servers[foreign][:5].tolist()} under "
                f"{self.sharding!r}. Route ids with the same sharding the servers use."
            )
        return flat

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        """Storage slots of ``ids``, creating the rows not created yet with the table's initialiser."""
        slots = self._slot_plus_one[ids].astype(np.int64) - 1
        missing = slots < 0
        if missing.any():
            new = _distinct(ids[missing])
            self._create(new, self.table.initial_rows(new))
            slots = self._slot_plus_one[ids].astype(np.int64) - 1
        return slots  # type: ignore[no-any-return]

    # -- the protocol ------------------------------------------------------------------------------------------------
    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        """The current values of rows ``ids`` (``[len(ids), dim]``, a copy), creating rows never used before."""
        slots = torch.from_numpy(self._slots(self._checked_ids(ids, "pull")))
        return self._values.index_select(0, slots)

    def prepare(self, ids: torch.Tensor) -> None:
        """Create the rows of ``ids`` not created yet, ahead of the pull that will need them.

        A server calls this for a pull it must hold back until a round is applied: creating rows is most of the
        work of a pull on a large, mostly untouched table, and doing it while the round waits for the slowest
        worker takes it off the critical path. The result is the same as creating them at the pull, since a row's
        first value depends on the table and the row alone, and the round being waited for only updates rows its
        workers pulled before (created then).
        """
        self._slots(self._checked_ids(ids, "pull"))

    def apply(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """One optimizer step of the table: update the distinct rows ``ids`` with their summed gradients ``grads``.

        Raises:
            ValueError: repeated ids (sum their gradients first: :class:`~.gradients.RowGradientAccumulator`), or
                gradients of another shape or dtype than the rows.
        """
        flat = self._checked_ids(ids, "apply")
        if grads.shape != (len(flat), self.table.dim) or grads.dtype != self.table.torch_dtype:
            raise ValueError(
                f"Table {self.table.name!r}: gradients must be {self.table.dtype} of shape [{len(flat)}, "
                f"{self.table.dim}] (one row per id), got {grads.dtype} of shape {tuple(grads.shape)}."
            )
        if _has_repeats(flat):
            raise ValueError(
                f"Table {self.table.name!r}: apply() got repeated row ids; an optimizer step must see each row once. "
                f"Sum the gradients of each row first (RowGradientAccumulator)."
            )
        self.step += 1
        slots = torch.from_numpy(self._slots(flat))
        rows = self._values.index_select(0, slots)
        state = {name: values.index_select(0, slots) for name, values in self._state.items()}
        self.optimizer.update(rows, grads, state, self.step)
        self._values.index_copy_(0, slots, rows)
        for name, values in self._state.items():
            values.index_copy_(0, slots, state[name])

    def assign(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows ``ids`` to ``values`` (a worker's initial rows of a module built in full): state starts fresh."""
        flat = self._checked_ids(ids, "assign")
        if values.shape != (len(flat), self.table.dim):
            raise ValueError(
                f"Table {self.table.name!r}: assign() needs values of shape [{len(flat)}, {self.table.dim}], got "
                f"{tuple(values.shape)}."
            )
        slots = torch.from_numpy(self._slots(flat))
        self._values.index_copy_(0, slots, values.to(self.table.torch_dtype))
        for name, state in self._state.items():
            fresh = self.optimizer.initial_state(name, len(flat), self.table.dim, self.table.torch_dtype)
            state.index_copy_(0, slots, fresh)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def export(self) -> TableShardArrays:
        """``(ids, values, state)`` of the created rows, ascending by id (copies): what a checkpoint stores."""
        order = np.argsort(self._ids[: self._size], kind="stable")
        index = torch.from_numpy(order)
        ids = torch.from_numpy(self._ids[: self._size][order].copy())
        return (
            ids,
            self._values[: self._size].index_select(0, index),
            {name: state[: self._size].index_select(0, index) for name, state in self._state.items()},
        )

    def load(self, ids: torch.Tensor, values: torch.Tensor, state: dict[str, torch.Tensor], step: int) -> None:
        """Replace the store's rows by checkpointed ones (ids this server holds, each once)."""
        flat = self._checked_ids(ids, "load")
        if sorted(state) != sorted(self._state):
            raise ValueError(
                f"Table {self.table.name!r}: the checkpoint has optimizer state {sorted(state)}, but "
                f"{type(self.optimizer).__name__} needs {sorted(self._state)}. Resume with the optimizer the "
                f"checkpoint was written with."
            )
        if _has_repeats(flat):
            raise ValueError(f"Table {self.table.name!r}: the checkpoint repeats row ids.")
        self._slot_plus_one[self._ids[: self._size]] = 0
        self._size = 0
        self._create(flat, values)
        slots = torch.arange(len(flat))
        for name, values_of_state in state.items():
            self._state[name].index_copy_(0, slots, values_of_state.to(self.table.torch_dtype))
        self.step = step
