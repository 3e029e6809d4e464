"""Every ``lightning-patterns`` command, by registry name.

- ``fit``, ``validate``, ``test``, ``predict`` (:mod:`~lightning_patterns.commands.fit`): LightningCLI.
- ``recipes`` (:mod:`~lightning_patterns.commands.recipes`): the recipes, one line each.
- ``shards`` (:mod:`~lightning_patterns.commands.shards`): ``write`` and ``inspect`` sharded datasets.
- ``cache`` (:mod:`~lightning_patterns.commands.cache`): ``info`` and ``clear`` for every cache the project creates.
- ``ps`` (:mod:`~lightning_patterns.commands.ps`): ``plan``, the parameter server's cost model for a recipe or a
  cluster.

A command is a :class:`Command` subclass with a ``name`` and a one-line ``help``. Third parties add commands through
the ``lightning_patterns.commands`` entry-point group (``name = "package.module:CommandClass"``), or with
``COMMANDS.register(cls.name, cls)``. The command modules import only the standard library until they run.
"""

from __future__ import annotations

from lightning_patterns._registry import Registry
from lightning_patterns.commands.base import Command
from lightning_patterns.commands.cache import CacheCommand
from lightning_patterns.commands.fit import FitCommand, PredictCommand, TestCommand, ValidateCommand
from lightning_patterns.commands.ps import PsCommand
from lightning_patterns.commands.recipes import RecipesCommand
from lightning_patterns.commands.shards import ShardsCommand

__all__ = ["COMMANDS", "Command"]

COMMANDS: Registry[type[Command]] = Registry("command", entry_point_group="lightning_patterns.commands")
for _cls in (
    FitCommand,
    ValidateCommand,
    TestCommand,
    PredictCommand,
    RecipesCommand,
    ShardsCommand,
    CacheCommand,
    PsCommand,
):
    COMMANDS.register(_cls.name, _cls)
del _cls
