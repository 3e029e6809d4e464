"""``EmbeddingCTR``: a click-through-rate model of embedding tables and a small MLP, and its validation AUC.

An ordinary LightningModule: it knows nothing of sharding, streaming or parameter servers. Its tables are
built in ``configure_model`` (Lightning calls it before training and when loading a checkpoint), the place
Lightning gives strategies to build large layers their own way; used outside a Trainer, the first forward
builds them.

A batch is a mapping with ``"ids"`` (``int64 [B, F]``: one column per table), ``"dense"`` (``float [B, D]``) and
``"label"`` (``[B]``, 1 for a click), as :mod:`lightning_patterns.data.click_through` writes them, or an
``(ids, dense, label)`` tuple. A field ``"probability"`` (the click probability of the model that generated the
data) is never read by the network; when present, validation also reports its AUC (``val_reference_auc``) on the
same samples, the ceiling a model of that data can reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_patterns import _lightning
from lightning_patterns.metrics import binary_auc

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule as _LightningModule
else:
    _LightningModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["EmbeddingCTR"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["EmbeddingCTR"])

_OPTIMIZERS = ("adagrad", "adam", "sgd")
# Optimizers that accept the sparse gradients of `nn.Embedding(sparse=True)`.
_SPARSE_CAPABLE = ("adagrad", "sgd")


class _EmbeddingCTR(_LightningModule):
    """Click probability from categorical ids and dense features (a small DLRM).

    One embedding table per categorical field; the dense features are projected to the embedding width; the
    network sees every vector and the dot product of every pair (the factorisation-machine interactions that
    an MLP alone learns poorly), and a hidden layer maps them to the click logit.

    Args:
        num_embeddings: rows of each table, one per column of the batch's ``"ids"`` (users, items, ...).
        embedding_dim: width of every table.
        num_dense: dense features per sample.
        hidden_dim: width of the hidden layer.
        lr: learning rate of the dense parameters.
        embedding_lr: learning rate of the tables (default: ``lr``); they are a param group of their own.
        optimizer: ``"adagrad"``, ``"adam"`` or ``"sgd"``, for both param groups.
        sparse_gradients: tables with sparse gradients (``nn.Embedding(sparse=True)``), so that a step costs the
            rows a batch touched, not the table. Default: on for Adagrad and SGD, which accept them; Adam does not.
        init_std: standard deviation of the tables' initial values (normal, mean 0).
    """

    def __init__(
        self,
        num_embeddings: Sequence[int] = (1_000, 10_000),
        embedding_dim: int = 16,
        num_dense: int = 4,
        hidden_dim: int = 64,
        lr: float = 0.05,
        embedding_lr: float | None = None,
        optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad",
        sparse_gradients: bool | None = None,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if isinstance(num_embeddings, (str, bytes)) or not num_embeddings or any(int(n) < 1 for n in num_embeddings):
            raise ValueError(
                f"`num_embeddings` must list the positive number of rows of each table, e.g. [1000, 10000], got "
                f"num_embeddings={num_embeddings!r}."
            )
        for name, value in (("embedding_dim", embedding_dim), ("num_dense", num_dense), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"`{name}` must be at least 1, got {name}={value!r}.")
        if lr <= 0 or (embedding_lr is not None and embedding_lr <= 0):
            raise ValueError(f"Learning rates must be positive, got lr={lr!r}, embedding_lr={embedding_lr!r}.")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {', '.join(_OPTIMIZERS)}, got optimizer={optimizer!r}.")
        if sparse_gradients and optimizer not in _SPARSE_CAPABLE:
            raise ValueError(
                f"EmbeddingCTR(optimizer={optimizer!r}) cannot take sparse gradients: torch's Adam needs dense ones. "
                f"Set sparse_gradients=False, or use optimizer='adagrad' or 'sgd'."
            )
        if init_std < 0:
            raise ValueError(f"`init_std` must be >= 0, got init_std={init_std!r}.")
        self.save_hyperparameters()
        self.num_embeddings = [int(n) for n in num_embeddings]
        self.embedding_dim = embedding_dim
        self.num_dense = num_dense
        self.lr = lr
        self.embedding_lr = embedding_lr if embedding_lr is not None else lr
        self.optimizer_name = optimizer
        self.sparse_gradients = optimizer in _SPARSE_CAPABLE if sparse_gradients is None else sparse_gradients
        self.init_std = init_std
        self.tables: nn.ModuleList | None = None
        self.dense_projection = nn.Linear(num_dense, embedding_dim)
        vectors = len(self.num_embeddings) + 1
        pairs = vectors * (vectors - 1) // 2
        self.top = nn.Sequential(
            nn.Linear(vectors * embedding_dim + pairs, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1)
        )
        self._data_checked = False
        self._outputs: dict[str, list[torch.Tensor]] = {}

    # -- the network -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the embedding tables (once): here rather than in ``__init__``, so a strategy may place them."""
        if self.tables is not None:
            return
        tables = nn.ModuleList(
            nn.Embedding(rows, self.embedding_dim, sparse=self.sparse_gradients) for rows in self.num_embeddings
        )
        for table in tables:
            assert isinstance(table, nn.Embedding)
            nn.init.normal_(table.weight, std=self.init_std)
        self.tables = tables

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Click logits ``[B]`` of ids ``[B, F]`` and dense features ``[B, D]``."""
        if self.tables is None:
            self.configure_model()
            assert self.tables is not None
            self.tables.to(self.dense_projection.weight.device)
        vectors = [self.dense_projection(dense)] + [table(ids[:, i]) for i, table in enumerate(self.tables)]
        stacked = torch.stack(vectors, dim=1)
        products = stacked @ stacked.transpose(1, 2)
        rows, columns = torch.triu_indices(len(vectors), len(vectors), offset=1, device=stacked.device)
        features = torch.cat([stacked.flatten(1), products[:, rows, columns]], dim=1)
        return self.top(features).squeeze(1)  # type: ignore[no-any-return]

    # -- data --------------------------------------------------------------------------------------------------------
    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if isinstance(batch, Mapping):
            return batch["ids"], batch["dense"].float(), batch.get("label"), batch.get("probability")
        ids, dense, label = batch[0], batch[1], batch[2] if len(batch) > 2 else None
        return ids, dense.float(), label, None

    def _check_data(self, ids: torch.Tensor, dense: torch.Tensor) -> None:
        """On the first batch: one id column per table, ids inside their tables, ``num_dense`` features."""
        if self._data_checked:
            return
        if ids.dim() != 2 or ids.shape[1] != len(self.num_embeddings):
            raise ValueError(
                f"EmbeddingCTR(num_embeddings={self.num_embeddings}) expects ids of shape [batch, "
                f"{len(self.num_embeddings)}] (one column per table), got {tuple(ids.shape)}. Give one table size "
                f"per id column: --model.init_args.num_embeddings='[...]'."
            )
        largest = ids.max(dim=0).values.tolist() if ids.numel() else [0] * ids.shape[1]
        if ids.numel() and (
            int(ids.min()) < 0 or any(m >= n for m, n in zip(largest, self.num_embeddings, strict=True))
        ):
            needed = [max(n, m + 1) for m, n in zip(largest, self.num_embeddings, strict=True)]
            raise ValueError(
                f"EmbeddingCTR(num_embeddings={self.num_embeddings}) got ids up to {largest} per column (smallest "
                f"{int(ids.min())}); ids must lie in [0, rows) of their table. Size the tables for the data: "
                f"--model.init_args.num_embeddings='{needed}'."
            )
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(
                f"EmbeddingCTR(num_dense={self.num_dense}) got dense features of shape {tuple(dense.shape)}. Set "
                f"--model.init_args.num_dense={dense.shape[-1]}."
            )
        self._data_checked = True

    # -- steps -------------------------------------------------------------------------------------------------------
    def _loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ids, dense, label, reference = self._unpack(batch)
        if label is None:
            raise ValueError(f"EmbeddingCTR needs a 'label' in every {stage} batch (1 for a click, 0 otherwise).")
        self._check_data(ids, dense)
        logits = self(ids, dense)
        loss = F.binary_cross_entropy_with_logits(logits, label.float())
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, sync_dist=True, batch_size=label.shape[0])
        return loss, logits, label, reference

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Binary cross-entropy of the click logits."""
        return self._loss(batch, "train")[0]

    def _collect(self, batch: Any, stage: str) -> torch.Tensor:
        loss, logits, label, reference = self._loss(batch, stage)
        outputs = self._outputs.setdefault(stage, [])
        row = [logits.detach().float(), label.detach().float()]
        if reference is not None:
            row.append(reference.detach().float())
        outputs.append(torch.stack(row, dim=1))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Loss; scores and labels are kept for the epoch's AUC."""
        return self._collect(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Loss; scores and labels are kept for the epoch's AUC."""
        return self._collect(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Click probabilities."""
        ids, dense, _, _ = self._unpack(batch)
        self._check_data(ids, dense)
        return torch.sigmoid(self(ids, dense))

    def _gathered(self, stage: str) -> torch.Tensor:
        """This epoch's ``[n, 2 or 3]`` rows of (logit, label[, reference probability]) of every rank."""
        rows = torch.cat(self._outputs.pop(stage, []) or [torch.empty(0, 2, device=self.device)])
        if self.trainer.world_size == 1:
            return rows
        # Ranks may hold different numbers of samples: gather the counts, pad to the largest, trim.
        gathered_counts = self.all_gather(torch.tensor(rows.shape[0], device=rows.device))
        assert isinstance(gathered_counts, torch.Tensor)
        counts = gathered_counts.reshape(-1).tolist()
        padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=rows.device)
        padded[: rows.shape[0]] = rows
        gathered_rows = self.all_gather(padded)
        assert isinstance(gathered_rows, torch.Tensor)
        gathered = gathered_rows.reshape(len(counts), max(counts), rows.shape[1])
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])

    def _log_auc(self, stage: str) -> None:
        rows = self._gathered(stage)
        labels = rows[:, 1]
        if rows.shape[0] == 0 or labels.min() == labels.max():
            return  # AUC is undefined without both classes (a sanity check's two batches, say)
        # Every rank computes the same value from the gathered scores: nothing to reduce.
        self.log(f"{stage}_auc", binary_auc(rows[:, 0], labels).float(), prog_bar=True)
        if rows.shape[1] > 2:
            self.log(f"{stage}_reference_auc", binary_auc(rows[:, 2], labels).float())

    def on_validation_epoch_start(self) -> None:
        """Start the epoch's scores afresh."""
        self._outputs.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        """AUC of the epoch's scores over every rank (and of the reference probability, when the data has it)."""
        self._log_auc("val")

    def on_test_epoch_start(self) -> None:
        """Start the epoch's scores afresh."""
        self._outputs.pop("test", None)

    def on_test_epoch_end(self) -> None:
        """AUC of the epoch's scores over every rank."""
        self._log_auc("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimizer, two param groups: the tables (``embedding_lr``) and the dense layers (``lr``)."""
        self.configure_model()
        assert self.tables is not None
        groups = [
            {"params": list(self.tables.parameters()), "lr": self.embedding_lr},
            {"params": [p for name, p in self.named_parameters() if not name.startswith("tables.")], "lr": self.lr},
        ]
        if self.sparse_gradients:
            # torch warns on every sparse step unless invariant checks are set explicitly; keep torch's default (off).
            torch.sparse.check_sparse_tensor_invariants.disable()  # type: ignore[no-untyped-call]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(groups)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(groups)
        return torch.optim.Adagrad(groups)


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    EmbeddingCTR = _EmbeddingCTR
