"""``lightning-patterns recipes``: the recipes, one line each (run one with ``fit --recipe NAME``)."""

from __future__ import annotations

from lightning_patterns.commands.base import PROG, Command, CommandParser, echo
from lightning_patterns.recipes import RECIPES_ENV, best_checkpoint, describe_recipe, list_recipes, recipes_dir

__all__ = ["RecipesCommand"]


class RecipesCommand(Command):
    """List the recipes with their one-line descriptions, and whether each has a trained checkpoint."""

    name = "recipes"
    help = "list the recipes (LightningCLI configs run with `fit --recipe NAME`)"

    def run(self, argv: list[str]) -> int:
        """Print one line per recipe; exit status 1 when there are none."""
        CommandParser(
            prog=self.prog,
            description=f"List the recipes: the LightningCLI configs in {recipes_dir()} (set ${RECIPES_ENV} for "
            f"another folder). Run one with `{PROG} fit --recipe NAME`; `validate --recipe NAME` then scores its "
            "best checkpoint (marked * below).",
        ).parse_args(argv)
        recipes = list_recipes()
        if not recipes:
            echo(f"No recipes found in {recipes_dir()}.")
            return 1
        width = max(len(name) for name in recipes)
        for name, path in recipes.items():
            trained = "*" if best_checkpoint(name).is_file() else " "
            echo(f"{name:<{width}} {trained} {describe_recipe(path)}")
        return 0
