"""A small name-to-implementation registry, shared by every pluggable family (sharders, caches, ...).

Each implementation declares its key as ``name: ClassVar[str]``. Registering a taken name raises unless
``override=True``; a failed lookup lists what exists. Third parties plug in through an entry-point group,
which the environment variable ``LIGHTNING_PATTERNS_NO_PLUGINS=1`` switches off.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

__all__ = ["Registry"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_PLUGINS_OFF_ENV = "LIGHTNING_PATTERNS_NO_PLUGINS"


class Registry(Generic[T]):
    """Maps snake_case names to implementations of one family.

    Args:
        family: what the registry holds, used in error messages (for example ``"sharder"``).
        entry_point_group: the ``importlib.metadata`` group third-party packages register under.
    """

    def __init__(self, family: str, entry_point_group: str | None = None) -> None:
        self.family = family
        self.entry_point_group = entry_point_group
        self._items: dict[str, T | str] = {}
        self._plugins_loaded = False

    def register(self, name: str, item: T | str, *, override: bool = False) -> None:
        """Register ``item`` (or an ``"module:attr"`` import string for optional backends) under ``name``."""
        if name in self._items and not override:
            raise ValueError(
                f"A {self.family} named {name!r} is already registered. "
                f"Pass `override=True` to replace it, or choose another name."
            )
        self._items[name] = item

    def get(self, name: str) -> T:
        """Return the implementation registered under ``name``."""
        self._load_plugins()
        try:
            item = self._items[name]
        except KeyError:
            raise KeyError(
                f"Unknown {self.family} {name!r}. Expected one of: {', '.join(sorted(self._items))}."
            ) from None
        if isinstance(item, str):
            module_name, _, attr = item.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ImportError(
                    f"The {self.family} {name!r} needs {module_name!r}, which is not installed: {err}"
                ) from err
            loaded: T = getattr(module, attr)
            self._items[name] = loaded
            return loaded
        return item

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_plugins(self) -> None:
        if self._plugins_loaded or self.entry_point_group is None:
            return
        self._plugins_loaded = True
        if os.environ.get(_PLUGINS_OFF_ENV, "") not in ("", "0"):
            return
        for entry_point in entry_points(group=self.entry_point_group):
            if entry_point.name not in self._items:
                log.debug("Registering %s %r from entry point %s", self.family, entry_point.name, entry_point.value)
                self._items[entry_point.name] = entry_point.value
