"""What a sparse table is (name, rows, width, dtype) and how a row comes to life the first time it is used.

Servers create rows lazily: a row costs memory only once a batch has touched it (or a worker assigned it).
Its first value is a pure function of ``(seed, table, row)`` (:mod:`lightning_patterns._counter_random`), never of
which server holds it or when it was first touched, so:

- a table re-sharded over another number of servers, or resumed from a checkpoint that omits untouched rows,
  has the very same values;
- the whole table can be rebuilt in one process (:func:`~.checkpoint.load_full_table`).

The default initialiser draws what ``nn.Embedding`` and ``nn.EmbeddingBag`` draw, ``N(0, 1)`` per element, and zeroes
the ``padding_idx`` row as ``nn.Embedding`` does; the numbers differ from torch's generator stream, the distribution
does not. Modules initialised otherwise name their initialiser (``normal`` with another mean and standard
deviation, ``uniform``, ``zeros``), or have a worker assign the module's own initial rows instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lightning_patterns._counter_random import counter_normal32, counter_uniform32, stream_key
from lightning_patterns.data.sharding.hashed import stable_hash

__all__ = ["ROW_DTYPES", "RowInitializer", "TableSpec"]

#: Row dtypes a table may have, by name.
ROW_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DISTRIBUTIONS = ("normal", "uniform", "zeros")


@dataclass(frozen=True)
class RowInitializer:
    """The first value of each row, from ``(seed, table, row)`` alone.

    Args:
        distribution: ``"normal"`` (``nn.Embedding``'s: mean 0, std 1), ``"uniform"`` on ``[low, high)``, or
            ``"zeros"``.
        mean: mean of ``"normal"``.
        std: standard deviation of ``"normal"``.
        low: lower bound of ``"uniform"``.
        high: upper bound of ``"uniform"``.

    >>> RowInitializer("uniform", low=-0.1, high=0.1).to_json()["distribution"]
    'uniform'
    """

    distribution: Literal["normal", "uniform", "zeros"] = "normal"
    mean: float = 0.0
    std: float = 1.0
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"RowInitializer(distribution={self.distribution!r}) is not supported; expected one of "
                f"{', '.join(_DISTRIBUTIONS)}."
            )
        if not self.std >= 0:
            raise ValueError(f"RowInitializer needs std >= 0, got std={self.std!r}.")
        if not self.low <= self.high:
            raise ValueError(f"RowInitializer needs low <= high, got low={self.low!r}, high={self.high!r}.")

    def values(self, key: np.uint64, ids: np.ndarray, dim: int) -> np.ndarray:
        """``float32 [len(ids), dim]``: the initial rows of ``ids`` under ``key``.

        Single precision (:func:`~lightning_patterns._counter_random.counter_normal32`): a server creates a row the
        first time a batch touches it, so on a large table creating rows is most of the work of a pull, and the
        single-precision generator does it about ten times faster. A ``float64`` table starts from these values.
        """
        if self.distribution == "zeros":
            return np.zeros((len(ids), dim), dtype=np.float32)
        if self.distribution == "uniform":
            values = counter_uniform32(key, ids, dim)
            values *= np.float32(self.high - self.low)
            values += np.float32(self.low)
            return values
        values = counter_normal32(key, ids, dim)
        values *= np.float32(self.std)
        values += np.float32(self.mean)
        return values

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON (checkpoint manifests record the initialiser of every table)."""
        return {
            "distribution": self.distribution,
            "mean": self.mean,
            "std": self.std,
            "low": self.low,
            "high": self.high,
        }


@dataclass(frozen=True)
class TableSpec:
    """One sparse table: ``num_rows`` rows of ``dim`` values of ``dtype``, held by the servers.

    Args:
        name: the table's name: the module's qualified name in the LightningModule (``"item_embedding"``).
        num_rows: rows (``nn.Embedding``'s ``num_embeddings``).
        dim: values per row (``embedding_dim``).
        dtype: name of the rows' dtype, a key of :data:`ROW_DTYPES`.
        initializer: the first value of each row.
        padding_idx: a row that starts at zero (``nn.Embedding(padding_idx=...)``); negative values count from the end.
        seed: with the name, fixes every initial row.

    >>> spec = TableSpec("item", num_rows=5, dim=3, padding_idx=-1)
    >>> rows = spec.initial_rows(np.array([0, 4]))
    >>> rows.shape, rows[1].abs().sum().item()
    (torch.Size([2, 3]), 0.0)
    """

    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"
    initializer: RowInitializer = field(default_factory=RowInitializer)
    padding_idx: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A table needs a non-empty `name`, got name={self.name!r}.")
        for argument in ("num_rows", "dim"):
            value = getattr(self, argument)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Table {self.name!r} needs a positive int `{argument}`, got {argument}={value!r}.")
        if self.dtype not in ROW_DTYPES:
            raise ValueError(
                f"Table {self.name!r} has dtype={self.dtype!r}; expected one of {', '.join(ROW_DTYPES)}. Sparse "
                f"tables hold floating-point rows."
            )
        if self.padding_idx is not None and not -self.num_rows <= self.padding_idx < self.num_rows:
            raise ValueError(
                f"Table {self.name!r} has padding_idx={self.padding_idx!r} outside its {self.num_rows} rows."
            )
        if self.padding_idx is not None and self.padding_idx < 0:
            object.__setattr__(self, "padding_idx", self.padding_idx + self.num_rows)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The rows' torch dtype."""
        return ROW_DTYPES[self.dtype]

    @property
    def salt(self) -> int:
        """A stable 64-bit number of the table's name (BLAKE2b), for its hash sharding and initial rows."""
        return stable_hash(self.name)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row."""
        return self.dim * self.torch_dtype.itemsize

    def initial_rows(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The first value of each row of ``ids``: ``[len(ids), dim]`` of the table's dtype."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().to("cpu").numpy()
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        values = self.initializer.values(stream_key(self.seed, self.salt), flat, self.dim)
        if self.padding_idx is not None:
            values[flat == self.padding_idx] = 0.0
        return torch.from_numpy(values).to(self.torch_dtype)

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON, for checkpoint manifests."""
        return {
            "name": self.name,
            "num_rows": self.num_rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "initializer": self.initializer.to_json(),
            "padding_idx": self.padding_idx,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: Any) -> TableSpec:
        """Inverse of :meth:`to_json`; ``ValueError`` naming what is wrong."""
        try:
            return cls(**{**data, "initializer": RowInitializer(**data["initializer"])})
        except (KeyError, TypeError) as error:
            raise ValueError(f"Invalid table description {data!r}: {error}") from None
