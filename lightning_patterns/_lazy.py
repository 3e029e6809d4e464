"""Lazy package exports: a name is imported when first used, so importing a package costs nothing.

DataLoader workers and the light commands (``recipes``, ``cache``, ``shards inspect``, ``--help``) import our
packages; they must not pay for torch or Lightning they never use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``exports``: public name → ``"module:attribute"``.

    ``"lightning:NAME"`` stands for the public Lightning-facing class ``NAME`` built for the package in use (see
    :mod:`lightning_patterns._lightning`).
    """

    def __getattr__(name: str) -> Any:
        try:
            target = exports[name]
        except KeyError:
            raise AttributeError(name) from None
        module_name, _, attribute = target.partition(":")
        if module_name == "lightning":
            from lightning_patterns._lightning import built_class

            return built_class(attribute)
        return getattr(importlib.import_module(module_name), attribute)

    return __getattr__
