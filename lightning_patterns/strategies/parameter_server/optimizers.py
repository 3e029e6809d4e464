"""Optimizers the servers may run on chunks of parameters, and the hyperparameters that follow the workers' copy.

With ``update_on="server"`` each server runs the module's optimizer on its chunks (slices of parameters). That
equals one optimizer on whole parameters only when the update of every element depends on nothing but that
element's gradient and state and on per-parameter scalars (the step count). Each class in
:data:`ELEMENTWISE_OPTIMIZERS` was checked to be such an *element-wise* optimizer:

- ``SGD`` (momentum, dampening, Nesterov, weight decay), ``Adam`` and ``AdamW`` (AMSGrad too), ``Adamax``,
  ``NAdam`` (its ``mu_product`` depends on the step only), ``RAdam`` (its rectification depends on the step
  only), ``RMSprop`` (centered too), ``Adagrad``, ``Adadelta``, ``ASGD`` (``eta`` and ``mu`` depend on the step
  only) and ``Rprop``.

Not element-wise, hence refused with ``update_on="server"``: ``Adafactor`` (factored second moments over rows
and columns, update clipping by a tensor's RMS), ``LBFGS`` (a direction over all parameters at once),
``SparseAdam`` (sparse gradients), and anything else, including subclasses of the classes above (a subclass
may change ``step``). ``update_on="worker"`` runs every optimizer exactly.

The servers look the optimizer up by its registry name; nothing else about it crosses the wire but JSON
hyperparameters. Hyperparameters a scheduler changes (``lr``, ``momentum``, ``betas``, ``weight_decay``, any
number or tuple of numbers in a param group) travel as a ``float64`` vector laid out by
:class:`HyperparameterLayout`, whenever they change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_patterns._registry import Registry

__all__ = ["ELEMENTWISE_OPTIMIZERS", "HyperparameterLayout", "describe_param_groups", "elementwise_name"]

#: Optimizer classes the servers may run on chunks, by name. No entry points: only these run on a server.
ELEMENTWISE_OPTIMIZERS: Registry[type[Optimizer]] = Registry("element-wise optimizer")
for _cls in (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
):
    ELEMENTWISE_OPTIMIZERS.register(_cls.__name__.lower(), _cls)


def elementwise_name(optimizer: Optimizer) -> str:
    """The registry name of ``optimizer``'s class; raises ``ValueError`` naming the fix when it is not element-wise."""
    cls = type(optimizer)
    for name in ELEMENTWISE_OPTIMIZERS.names():
        if ELEMENTWISE_OPTIMIZERS.get(name) is cls:
            return name
    allowed = ", ".join(ELEMENTWISE_OPTIMIZERS.get(n).__name__ for n in ELEMENTWISE_OPTIMIZERS.names())
    raise ValueError(
        f"`ParameterServerStrategy(update_on='server')` runs the optimizer on chunks of parameters, which equals one "
        f"optimizer on whole parameters only for element-wise optimizers ({allowed}); {cls.__module__}."
        f"{cls.__qualname__} is not one of them. Use `ParameterServerStrategy(update_on='worker')`: the servers "
        "then only average gradients and every worker runs your optimizer exactly as under DDP."
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, where)
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; with `update_on='server'` hyperparameters travel to the servers as "
        "JSON, so they must be numbers, strings, booleans, None or lists of them (for example a float `lr`, not "
        "a tensor). Use `update_on='worker'` to keep it."
    )


def describe_param_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (everything but ``params``), checked to be JSON."""
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        described = {key: value for key, value in group.items() if key != "params"}
        for key, value in described.items():
            _check_json(value, f"Param group {index}'s {key!r}")
        groups.append(described)
    return groups


class HyperparameterLayout:
    """Where each numeric hyperparameter of each param group sits in a ``float64`` vector.

    Numbers (``lr``, ``weight_decay``, ...) take one slot, tuples or lists of numbers (``betas``) one slot per
    item; booleans, strings and ``None`` are sent once, with the optimizer's description.

    Args:
        groups: the param groups' hyperparameters, as :func:`describe_param_groups` gives them.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        #: (group, key, length, kind): kind is "int", "float", "tuple" or "list"
        self.slots: list[tuple[int, str, int, str]] = []
        for index, group in enumerate(groups):
            for key in sorted(group):
                value = group[key]
                if _is_number(value):
                    self.slots.append((index, key, 1, type(value).__name__))
                elif isinstance(value, (tuple, list)) and value and all(_is_number(v) for v in value):
                    self.slots.append((index, key, len(value), type(value).__name__))
        self.numel = sum(length for _, _, length, _ in self.slots)

    def to_json(self) -> list[list[Any]]:
        """The layout, for the servers."""
        return [list(slot) for slot in self.slots]

    @classmethod
    def from_json(cls, slots: Any) -> HyperparameterLayout:
        """The layout the worker described."""
        layout = cls([])
        layout.slots = [(int(g), str(k), int(n), str(kind)) for g, k, n, kind in slots]
        layout.numel = sum(n for _, _, n, _ in layout.slots)
        return layout

    def vector(self, param_groups: list[dict[str, Any]]) -> torch.Tensor:
        """The current values in ``param_groups``, as a ``float64`` vector."""
        values: list[float] = []
        for group, key, length, _ in self.slots:
            value = param_groups[group][key]
            items = value if isinstance(value, (tuple, list)) else (value,)
            if len(items) != length or not all(_is_number(v) for v in items):
                raise ValueError(
                    f"Param group {group}'s {key!r} changed from {length} number(s) to {value!r}; with "
                    "`update_on='server'` a hyperparameter may change value but not shape or type."
                )
            values.extend(float(v) for v in items)
        return torch.tensor(values, dtype=torch.float64)

    def apply(self, vector: torch.Tensor, param_groups: list[dict[str, Any]]) -> None:
        """Set the hyperparameters of ``param_groups`` from ``vector`` (keeping each one's Python type)."""
        values = vector.tolist()
        offset = 0
        for group, key, length, kind in self.slots:
            items = values[offset : offset + length]
            offset += length
            if kind == "int":
                param_groups[group][key] = int(items[0]) if float(items[0]).is_integer() else items[0]
            elif kind == "float":
                param_groups[group][key] = items[0]
            else:
                param_groups[group][key] = tuple(items) if kind == "tuple" else list(items)

    def difference(self, a: torch.Tensor, b: torch.Tensor) -> str | None:
        """The first hyperparameter whose value differs between vectors ``a`` and ``b`` (``None``: all equal)."""
        offset = 0
        for group, key, length, _ in self.slots:
            left, right = a[offset : offset + length].tolist(), b[offset : offset + length].tolist()
            offset += length
            same = all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(left, right, strict=True))
            if not same:
                shown = (left[0], right[0]) if length == 1 else (tuple(left), tuple(right))
                return f"param group {group}'s {key!r} ({shown[0]} against {shown[1]})"
        return None
