"""Lazy package exports: a name is imported when first used, so importing a package costs nothing.

DataLoader workers and the light commands (``recipes``, ``cache``, ``shards inspect``, ``--help``) import our
packages; they must not pay for torch or Lightning they never use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["instance_of_loaded", "lazy_exports"]


def lazy_exports(module: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """Module ``module``'s ``__getattr__`` for ``exports``: public name → ``"module:attribute"``.

    ``"lightning:NAME"`` stands for the public Lightning-facing class ``NAME`` built for the package in use (see
    :mod:`lightning_patterns._lightning`).
    """

    def __getattr__(name: str) -> Any:
        try:
            target = exports[name]
        except KeyError:
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
        module_name, _, attribute = target.partition(":")
        if module_name == "lightning":
            from lightning_patterns._lightning import built_class

            return built_class(attribute)
        return getattr(importlib.import_module(module_name), attribute)

    return __getattr__


def instance_of_loaded(value: object, module: str, name: str) -> bool:
    """``isinstance(value, module.name)`` without importing ``module``: if it is not loaded, nothing is an instance.

    For type checks on values that may be torch objects in code that must not import torch (schemas, hashing).
    """
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))
