"""Optimizers that update the rows a step touched, and only those, with their sparse semantics stated.

A server applies one step to a table from the summed gradients of the unique rows the workers touched
(:mod:`.gradients`). Rows no batch touched get no gradient, and here they also get no update. What that means
for each optimizer, against the same optimizer on the dense table:

- :class:`RowSGD` (plain SGD): *exact*. Dense SGD leaves a row with a zero gradient unchanged too.
- :class:`RowAdagrad`: *exact*. A zero gradient adds nothing to the row's sum of squares and moves nothing;
  the learning-rate decay counts the table's steps, as torch's per-parameter ``step`` does.
- :class:`RowAdam` (Adam and AdamW): *lazy*, as ``torch.optim.SparseAdam``: the moments of a row decay only on
  the steps that touch it, and the bias correction uses the table's step count. Dense Adam would also decay
  the moments of untouched rows and keep moving them with their old momentum; lazy Adam leaves them as they
  are. Weight decay (L2 for Adam, decoupled for AdamW) applies to touched rows only. Without weight decay this
  equals ``torch.optim.SparseAdam`` on the same gradients.

Refused, with the reason, because the dense and row-wise results would differ silently: SGD with momentum or
weight decay and Adagrad with weight decay (each would move untouched rows densely; torch refuses them for
sparse gradients too), AMSGrad, ``maximize``, and every other optimizer. Each update is written in the operation
order of torch's implementation, so results agree with torch's to rounding (the tests allow 1e-6).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lightning_patterns._registry import Registry

__all__ = ["ROW_OPTIMIZERS", "RowAdagrad", "RowAdam", "RowOptimizer", "RowSGD", "row_optimizer_from_torch"]


@dataclass
class RowOptimizer(ABC):
    """An update of gathered rows from their gradients and per-row state.

    Subclasses are dataclasses of their hyperparameters, declare ``name`` and ``state_names`` (per-row state
    tensors, each shaped like the rows) and implement :meth:`update`.
    """

    name: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]] = ()

    def initial_state(self, name: str, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The state ``name`` of rows that were never updated (zeros unless a subclass says otherwise)."""
        return torch.zeros(rows, dim, dtype=dtype)

    @abstractmethod
    def update(self, rows: torch.Tensor, grads: torch.Tensor, state: dict[str, torch.Tensor], step: int) -> None:
        """Update ``rows`` and ``state`` in place.

        Args:
            rows: ``[n, dim]`` values of ``n`` distinct rows.
            grads: ``[n, dim]`` their gradients (summed over the batch's uses of each row and over workers).
            state: this optimizer's per-row state tensors, ``[n, dim]`` each.
            step: the table's step count including this step (1 on the first step), as torch's ``state["step"]``.
        """

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "hyperparameters": {...}}``, for checkpoint manifests and the wire."""
        return {"name": self.name, "hyperparameters": dataclasses.asdict(self)}

    @staticmethod
    def from_json(data: Any) -> RowOptimizer:
        """Inverse of :meth:`to_json`; ``ValueError`` naming what is wrong."""
        try:
            cls = ROW_OPTIMIZERS.get(str(data["name"]))
            hyperparameters = data["hyperparameters"]
            if "betas" in hyperparameters:
                hyperparameters = {**hyperparameters, "betas": tuple(hyperparameters["betas"])}
            return cls(**hyperparameters)
        except (KeyError, TypeError) as error:
            raise ValueError(f"Invalid row optimizer {data!r}: {error}") from None

    def with_hyperparameters(self, values: Mapping[str, Any]) -> RowOptimizer:
        """A copy with some hyperparameters changed (a learning-rate scheduler's new ``lr``, say)."""
        return dataclasses.replace(self, **values)


def _check_lr(name: str, lr: float) -> None:
    if not lr >= 0:
        raise ValueError(f"{name} needs lr >= 0, got lr={lr!r}.")


@dataclass
class RowSGD(RowOptimizer):
    """Plain SGD on the touched rows: ``row -= lr * grad``. Exact: dense SGD moves no row without a gradient.

    Args:
        lr: learning rate.
    """

    name: ClassVar[str] = "sgd"
    lr: float = 0.01

    def __post_init__(self) -> None:
        _check_lr("RowSGD", self.lr)

    def update(self, rows: torch.Tensor, grads: torch.Tensor, state: dict[str, torch.Tensor], step: int) -> None:
        """``row -= lr * grad`` (torch's ``param.add_(grad, alpha=-lr)``)."""
        rows.add_(grads, alpha=-self.lr)


@dataclass
class RowAdagrad(RowOptimizer):
    """Adagrad on the touched rows. Exact: a zero gradient changes neither a row nor its sum of squares.

    Args:
        lr: learning rate.
        lr_decay: the learning rate at step ``t`` is ``lr / (1 + (t - 1) * lr_decay)``, ``t`` the table's step.
        eps: added to the root of the sum of squares.
        initial_accumulator_value: the sum of squares of a new row.
    """

    name: ClassVar[str] = "adagrad"
    state_names: ClassVar[tuple[str, ...]] = ("sum",)
    lr: float = 0.01
    lr_decay: float = 0.0
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        _check_lr("RowAdagrad", self.lr)
        if not (self.lr_decay >= 0 and self.eps >= 0 and self.initial_accumulator_value >= 0):
            raise ValueError(
                f"RowAdagrad needs lr_decay, eps and initial_accumulator_value >= 0, got lr_decay={self.lr_decay!r}, "
                f"eps={self.eps!r}, initial_accumulator_value={self.initial_accumulator_value!r}."
            )

    def initial_state(self, name: str, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The sum of squares starts at ``initial_accumulator_value``."""
        return torch.full((rows, dim), self.initial_accumulator_value, dtype=dtype)

    def update(self, rows: torch.Tensor, grads: torch.Tensor, state: dict[str, torch.Tensor], step: int) -> None:
        """The dense Adagrad step of torch, on the gathered rows."""
        clr = self.lr / (1 + (step - 1) * self.lr_decay)
        square_sum = state["sum"]
        square_sum.addcmul_(grads, grads, value=1)
        rows.addcdiv_(grads, square_sum.sqrt().add_(self.eps), value=-clr)


@dataclass
class RowAdam(RowOptimizer):
    """Lazy Adam (``torch.optim.SparseAdam``'s update) on the touched rows; AdamW with ``decoupled=True``.

    Moments of a row decay only on the steps that touch it; the bias correction counts the table's steps.

    Args:
        lr: learning rate.
        betas: decay rates of the first and second moments.
        eps: added to the root of the second moment.
        weight_decay: L2 penalty added to the gradient (Adam), or decoupled decay of the row (AdamW); touched
            rows only.
        decoupled: AdamW's decoupled weight decay (``row *= 1 - lr * weight_decay`` before the step).
    """

    name: ClassVar[str] = "adam"
    state_names: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def __post_init__(self) -> None:
        _check_lr("RowAdam", self.lr)
        beta1, beta2 = self.betas
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"RowAdam needs betas in [0, 1), got betas={self.betas!r}.")
        if not (self.eps >= 0 and self.weight_decay >= 0):
            raise ValueError(
                f"RowAdam needs eps and weight_decay >= 0, got eps={self.eps!r}, weight_decay={self.weight_decay!r}."
            )

    def update(self, rows: torch.Tensor, grads: torch.Tensor, state: dict[str, torch.Tensor], step: int) -> None:
        """SparseAdam's update, in its operation order, with weight decay first when set."""
        beta1, beta2 = self.betas
        if self.weight_decay and self.decoupled:
            rows.mul_(1 - self.lr * self.weight_decay)
        elif self.weight_decay:
            grads = grads.add(rows, alpha=self.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg_update = grads.sub(exp_avg).mul_(1 - beta1)
        exp_avg_sq_update = grads.pow(2).sub_(exp_avg_sq).mul_(1 - beta2)
        numer = exp_avg_update.add_(exp_avg)
        exp_avg.copy_(numer)
        denom = exp_avg_sq_update.add_(exp_avg_sq)
        exp_avg_sq.copy_(denom)
        denom = denom.sqrt().add_(self.eps)
        step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        rows.add_(-step_size * numer.div(denom))


#: Row-wise optimizers by name.
ROW_OPTIMIZERS: Registry[type[RowOptimizer]] = Registry("row-wise optimizer")
for _cls in (RowSGD, RowAdagrad, RowAdam):
    ROW_OPTIMIZERS.register(_cls.name, _cls)

_SUPPORTED = "SGD (no momentum, no weight decay), Adagrad (no weight decay), Adam, AdamW or SparseAdam"


def _refuse(optimizer: str, what: str, fix: str) -> ValueError:
    return ValueError(
        f"The parameter server cannot update sparse rows with {optimizer}({what}): {fix} Sparse tables support "
        f"{_SUPPORTED}."
    )


def row_optimizer_from_torch(optimizer: type[torch.optim.Optimizer], group: Mapping[str, Any]) -> RowOptimizer:
    """The row-wise optimizer equivalent to torch's ``optimizer`` class with the hyperparameters of param ``group``.

    This is how the strategy takes the embeddings' optimizer from the module's own ``configure_optimizers``:
    the param group holding a sparse table names the class and its hyperparameters.

    Raises:
        ValueError: an optimizer or setting without a row-wise equivalent, naming the fix.

    >>> row_optimizer_from_torch(torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0, "eps": 1e-10,
    ...     "weight_decay": 0, "initial_accumulator_value": 0, "maximize": False})
    RowAdagrad(lr=0.1, lr_decay=0, eps=1e-10, initial_accumulator_value=0)
    """
    name = optimizer.__name__
    if group.get("maximize", False):
        raise _refuse(name, "maximize=True", "negate the loss instead.")
    if optimizer is torch.optim.SGD:
        if group.get("momentum", 0) or group.get("nesterov", False):
            raise _refuse(
                name,
                f"momentum={group.get('momentum')!r}",
                "momentum would keep moving untouched rows; use momentum=0.",
            )
        if group.get("weight_decay", 0):
            raise _refuse(
                name, f"weight_decay={group['weight_decay']!r}", "weight decay would shrink every row every step."
            )
        return RowSGD(lr=float(group["lr"]))
    if optimizer is torch.optim.Adagrad:
        if group.get("weight_decay", 0):
            raise _refuse(
                name, f"weight_decay={group['weight_decay']!r}", "weight decay would change every row every step."
            )
        return RowAdagrad(
            lr=float(group["lr"]),
            lr_decay=group.get("lr_decay", 0.0),
            eps=group.get("eps", 1e-10),
            initial_accumulator_value=group.get("initial_accumulator_value", 0.0),
        )
    if optimizer in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SparseAdam):
        if group.get("amsgrad", False):
            raise _refuse(name, "amsgrad=True", "use amsgrad=False (lazy AMSGrad is not defined here).")
        beta1, beta2 = group.get("betas", (0.9, 0.999))
        return RowAdam(
            lr=float(group["lr"]),
            betas=(float(beta1), float(beta2)),
            eps=group.get("eps", 1e-8),
            weight_decay=0.0 if optimizer is torch.optim.SparseAdam else group.get("weight_decay", 0.0),
            decoupled=optimizer is torch.optim.AdamW,
        )
    raise ValueError(
        f"The parameter server has no row-wise version of {name} for sparse tables. Return one of {_SUPPORTED} "
        f"from `configure_optimizers`, with the embeddings in a param group of their own, e.g. "
        f"`torch.optim.Adagrad([{{'params': embeddings, 'lr': 0.05}}, {{'params': dense, 'lr': 0.01}}])`."
    )
