"""Finding the recipe configs: ``lightning-patterns fit --recipe NAME`` and ``lightning-patterns recipes``.

A recipe is a LightningCLI YAML file in the repository's ``recipes/`` folder; its first comment line is
its one-line description. ``LIGHTNING_PATTERNS_RECIPES`` points at another folder.

A recipe keeps what it makes under ``lightning_logs/<recipe>/`` (:func:`recipe_root`, relative to the working
folder): its logs, its disk cache (``cache/``) and its checkpoints (``checkpoints/last.ckpt`` and
``checkpoints/best.ckpt``), which ``validate``/``test``/``predict --recipe NAME`` load by default.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "LOGS_DIR",
    "RECIPES_ENV",
    "UnknownRecipeError",
    "best_checkpoint",
    "describe_recipe",
    "find_recipe",
    "list_recipes",
    "recipe_root",
    "recipes_dir",
]

RECIPES_ENV = "LIGHTNING_PATTERNS_RECIPES"
LOGS_DIR = "lightning_logs"


class UnknownRecipeError(ValueError):
    """No recipe has the requested name."""


def recipes_dir() -> Path:
    """The folder recipes are read from: ``$LIGHTNING_PATTERNS_RECIPES``, else the repository's ``recipes/``."""
    if os.environ.get(RECIPES_ENV):
        return Path(os.environ[RECIPES_ENV])
    for candidate in (Path(__file__).resolve().parent.parent / "recipes", Path.cwd() / "recipes"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "recipes"


def list_recipes() -> dict[str, Path]:
    """Recipe names mapped to their files, sorted by name."""
    folder = recipes_dir()
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def describe_recipe(path: Path) -> str:
    """The recipe's one-line description: its first comment line."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return ""


def find_recipe(name: str) -> Path:
    """The file of the recipe called ``name``."""
    recipes = list_recipes()
    if name not in recipes:
        valid = ", ".join(recipes) or f"(none: no recipes found in {recipes_dir()})"
        raise UnknownRecipeError(
            f"Unknown recipe {name!r}. Valid recipes: {valid}. Run `lightning-patterns recipes` to list them "
            f"with a description, or pass a file with `--config PATH`."
        )
    return recipes[name]


def recipe_root(name: str) -> Path:
    """Where the recipe called ``name`` keeps its logs, cache and checkpoints: ``lightning_logs/<name>``."""
    return Path(LOGS_DIR) / name


def best_checkpoint(name: str) -> Path:
    """The checkpoint of the recipe's best validation score, written by its ``ModelCheckpoint`` during ``fit``."""
    return recipe_root(name) / "checkpoints" / "best.ckpt"
