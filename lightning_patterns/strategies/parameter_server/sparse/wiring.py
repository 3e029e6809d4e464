"""What ``ParameterServerStrategy`` does for sparse tables at each point of a fit (kept out of ``strategy.py``).

- ``model_sharded_context`` (around ``configure_model``): large embeddings are built on the meta device
  (:func:`~.embeddings.meta_embeddings`);
- ``setup``: the chosen embeddings lose their weights before the optimizer is built, the optimizer's param groups
  name their row optimizers (:class:`~.embeddings.SparseEmbeddings`);
- connecting: rank 0 describes the tables to the servers, assigns initial rows or loads a checkpoint's;
- each optimizer step: after the closure (forward and backward of the last micro-batch), every table's summed row
  gradients are pushed, with the group's current ``lr``;
- checkpoints: every server writes its rows under ``<checkpoint>.sparse/``; rank 0 writes the manifest, and, for
  tables of at most ``sparse_gather_bytes``, also puts the whole table in the checkpoint's ``state_dict``, so a
  plain single-process Trainer loads it;
- the end of the fit: tables of at most ``sparse_gather_bytes`` are pulled back into the module as ordinary
  parameters; larger ones stay only in checkpoints (the module keeps a meta weight).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_patterns.strategies.parameter_server.link import Link
from lightning_patterns.strategies.parameter_server.sparse.checkpoint import load_full_table
from lightning_patterns.strategies.parameter_server.sparse.client import SparseClient, SparseTelemetry
from lightning_patterns.strategies.parameter_server.sparse.embeddings import (
    SparseEmbeddings,
    choose_sparse_modules,
    materialize,
    meta_embeddings,
)
from lightning_patterns.strategies.parameter_server.sparse.table import RowInitializer

__all__ = ["CHECKPOINT_KEY", "SparseWiring", "sparse_directory"]

log = logging.getLogger(__name__)

#: The checkpoint entry naming the sparse tables' folder (relative to the checkpoint file) and the tables.
CHECKPOINT_KEY = "parameter_server_sparse"


def sparse_directory(filepath: str | Path) -> Path:
    """Where the servers write the rows of the checkpoint ``filepath``: ``<filepath>.sparse``."""
    return Path(f"{filepath}.sparse")


class SparseWiring:
    """The sparse tables of a strategy: configuration, and the state of the current fit.

    Args:
        sparse_modules: qualified names of the embeddings to hold on the servers (``None``: detect).
        sparse_min_rows: detection: embeddings of at least this many rows (``None``: none).
        sparse_gather_bytes: tables up to this many bytes come back into the module after the fit and into
            checkpoints whole.
        sync: the tables' rounds are synchronous (``None``: as the fit's dense part).
        max_staleness: asynchronous tables of a synchronous fit: steps of other workers' pushes a pull may lack
            (``None``: no bound).
    """

    def __init__(
        self,
        sparse_modules: list[str] | None,
        sparse_min_rows: int | None,
        sparse_gather_bytes: int,
        sync: bool | None = None,
        max_staleness: int | None = None,
    ) -> None:
        if sparse_modules is not None and (
            isinstance(sparse_modules, str) or not all(isinstance(name, str) and name for name in sparse_modules)
        ):
            raise ValueError(
                f"`sparse_modules` must be a list of qualified module names, got sparse_modules={sparse_modules!r}; "
                "e.g. sparse_modules=['user_embedding', 'tables.1']."
            )
        if sparse_min_rows is not None and (
            isinstance(sparse_min_rows, bool) or not isinstance(sparse_min_rows, int) or sparse_min_rows < 1
        ):
            raise ValueError(
                f"`sparse_min_rows` must be None or an integer >= 1, got sparse_min_rows={sparse_min_rows!r}. Use "
                "None to keep every embedding dense."
            )
        if isinstance(sparse_gather_bytes, bool) or not isinstance(sparse_gather_bytes, int) or sparse_gather_bytes < 0:
            raise ValueError(
                f"`sparse_gather_bytes` must be an integer >= 0, got sparse_gather_bytes={sparse_gather_bytes!r}."
            )
        self.names = list(sparse_modules) if sparse_modules is not None else None
        self.min_rows = sparse_min_rows
        self.gather_bytes = sparse_gather_bytes
        self.sync = sync
        self.max_staleness = max_staleness
        self.initializers: dict[int, RowInitializer] = {}
        self.embeddings: SparseEmbeddings | None = None
        self.client: SparseClient | None = None
        self.load_from: Path | None = None  # a checkpoint's sparse folder to load when connecting
        self.checkpoint_path: Path | None = None
        self.last_telemetry: SparseTelemetry | None = None

    @property
    def enabled(self) -> bool:
        """Whether any embedding may be sparse."""
        return self.names is not None or self.min_rows is not None

    @property
    def active(self) -> bool:
        """Whether the current fit has sparse tables."""
        return self.embeddings is not None and bool(self.embeddings.names)

    # -- building the module -----------------------------------------------------------------------------------------
    @contextmanager
    def building(self, model: nn.Module | None) -> Generator[None, None, None]:
        """Around ``configure_model`` of a fit: large embeddings on the meta device; the rest materialised after."""
        if not self.enabled:
            yield
            return
        with meta_embeddings(self.min_rows if self.names is None else None, self.initializers):
            yield
        if model is None:
            return
        chosen = choose_sparse_modules(model, self.names, self.min_rows)
        for name, module in model.named_modules():
            weight = module._parameters.get("weight") if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else None
            if weight is not None and weight.is_meta and name not in chosen:
                materialize(module, self.initializers.get(id(weight), RowInitializer()))

    def prepare(self, model: nn.Module, num_servers: int, rank: int) -> None:
        """``setup``, before the optimizer: take the chosen embeddings' weights out of the module."""
        modules = choose_sparse_modules(model, self.names, self.min_rows)
        self.embeddings = SparseEmbeddings(modules, self.initializers, num_servers, keep_values=rank == 0)
        if modules:
            log.info(
                "rank %d: %d tables on the servers (%s, %d rows)",
                rank,
                len(modules),
                ", ".join(modules),
                self.embeddings.num_rows,
            )

    @contextmanager
    def building_optimizer(self) -> Generator[None, None, None]:
        """Around ``setup_optimizers``: the tables' (meta) weights are in the module, so the groups hold them."""
        if self.embeddings is None:
            yield
            return
        with self.embeddings.weights_for_optimizer():
            yield

    def take_from_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``setup_optimizers``: the tables leave the optimizer; their groups name their row optimizers."""
        if self.embeddings is not None:
            self.embeddings.take_from_optimizer(optimizer)

    # -- the fit -----------------------------------------------------------------------------------------------------
    def connect(self, link: Link, world_size: int, num_servers: int, timeout: float, device: torch.device) -> None:
        """Start the tables on the servers (rank 0), load a checkpoint's rows, hook the modules."""
        if not self.active:
            return
        assert self.embeddings is not None
        self.client = SparseClient(
            link, self.embeddings.tables, world_size, num_servers, timeout, self.sync, self.max_staleness
        )
        self.last_telemetry = self.client.telemetry
        if self.load_from is not None:
            self.embeddings.initial = {}
        self.embeddings.connect(self.client, device)
        if self.load_from is not None and link.rank == 0:
            self.client.load(str(self.load_from))
        self.load_from = None

    def set_before_pull(self, settle: Callable[[], None]) -> None:
        """Run ``settle`` (the dense replies still owed) before every pull: replies then arrive in order."""
        if self.embeddings is not None:
            self.embeddings.before_pull = settle

    def push(self, optimizer: torch.optim.Optimizer) -> None:
        """End of an optimizer step's closure: push the step's row gradients with the groups' current ``lr``."""
        if self.client is None or self.embeddings is None:
            return
        self.embeddings.update_learning_rates(optimizer)
        self.client.push()

    def small(self) -> bool:
        """Whether every table fits ``sparse_gather_bytes``."""
        assert self.embeddings is not None
        return sum(spec.num_rows * spec.row_nbytes for spec in self.embeddings.specs) <= self.gather_bytes

    def finish(self, gather: bool) -> None:
        """End of the fit: give the modules their weights back (the servers' values when ``gather`` and small)."""
        if self.embeddings is None:
            return
        values: list[tuple[int, torch.Tensor | None]] = []
        if gather and self.client is not None and self.small():
            values = [(index, self.client.gather(index)) for index in range(len(self.embeddings.names))]
        self.embeddings.restore(values)
        self.embeddings = None
        self.client = None

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def save(self, checkpoint: dict[str, Any], filepath: str | Path, rank: int) -> None:
        """All ranks call it; rank 0 has the servers write their rows, then adds the tables (small ones whole)."""
        if self.client is None or self.embeddings is None:
            return
        directory = sparse_directory(filepath)
        names = list(self.embeddings.names)
        checkpoint[CHECKPOINT_KEY] = {"directory": directory.name, "tables": names}
        if rank != 0:
            return
        self.client.save(str(directory))
        if self.small():
            state = checkpoint.setdefault("state_dict", {})
            for name in names:
                state[f"{name}.weight"] = load_full_table(directory, name)

    def remove(self, filepath: str | Path) -> None:
        """Rank 0: a checkpoint is removed (``ModelCheckpoint(save_top_k=...)``): remove its rows too."""
        directory = sparse_directory(filepath)
        if directory.is_dir():
            shutil.rmtree(directory)

    def load_state(self, module: nn.Module, checkpoint: Mapping[str, Any], strict: bool) -> bool:
        """Load a checkpoint with sparse tables into ``module`` but the tables (the servers load their rows).

        Returns ``False`` for a checkpoint without sparse tables (load it as usual).
        """
        if CHECKPOINT_KEY not in checkpoint:
            return False
        missing, unexpected = module.load_state_dict(self.strip(checkpoint), strict=False)
        tables = {f"{name}.weight" for name in checkpoint[CHECKPOINT_KEY]["tables"]}
        if strict and (set(missing) - tables or unexpected):
            raise RuntimeError(
                f"Error loading the checkpoint's state_dict: missing keys {sorted(set(missing) - tables)}, "
                f"unexpected keys {sorted(unexpected)}."
            )
        return True

    def strip(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint's ``state_dict`` without the sparse tables, remembering where their rows are."""
        state = dict(checkpoint["state_dict"])
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None or self.checkpoint_path is None:
            return state
        for name in entry["tables"]:
            state.pop(f"{name}.weight", None)
        folder = str(entry["directory"])
        if Path(folder).name != folder or folder in ("", ".", ".."):
            raise ValueError(
                f"The checkpoint {self.checkpoint_path} names its sparse tables' folder {folder!r}; expected a folder "
                "beside the checkpoint file (`<checkpoint>.sparse`). Refusing a path that leads elsewhere."
            )
        self.load_from = self.checkpoint_path.parent / folder
        return state
