"""The ``lightning-patterns`` command.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands, so every constructor argument of
the model, the DataModule and the Trainer is a key in the recipe YAML and can be overridden on the
command line (``--trainer.max_epochs=3``). ``--recipe NAME`` stands for ``--config recipes/NAME.yaml``.
``recipes`` lists the recipes; further tool subcommands are dispatched from ``_TOOLS``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from lightning_utilities.core.rank_zero import rank_zero_only

from lightning_patterns import _lightning
from lightning_patterns.recipes import UnknownRecipeError, describe_recipe, find_recipe, list_recipes

if TYPE_CHECKING:
    from pytorch_lightning.cli import LightningCLI as _LightningCLI
else:
    _LightningCLI = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["LightningPatternsCLI", "main"]

__getattr__ = _lightning.class_getter(["LightningPatternsCLI"])


def _echo(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _LightningPatternsCLI(_LightningCLI):
    """LightningCLI over any LightningModule and LightningDataModule, with a summary after ``fit``."""

    _lp_tree: ClassVar[_lightning.Tree]

    def __init__(self, args: Sequence[str] | None = None) -> None:
        super().__init__(
            model_class=self._lp_tree.pl.LightningModule,
            datamodule_class=self._lp_tree.pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # A misspelt key must fail with its name, never silently match a longer one.
            parser_kwargs={"allow_abbrev": False},
            args=list(args) if args is not None else None,
        )

    def after_fit(self) -> None:
        """Print the final validation metrics, once, from rank zero."""
        self._print_metrics("fit")

    def after_validate(self) -> None:
        """Print the validation metrics."""
        self._print_metrics("validate")

    def after_test(self) -> None:
        """Print the test metrics."""
        self._print_metrics("test")

    @rank_zero_only
    def _print_metrics(self, stage: str) -> None:
        metrics = {name: float(value) for name, value in self.trainer.callback_metrics.items() if value.numel() == 1}
        if "val_acc" in metrics:
            _echo(f"validation accuracy: {metrics['val_acc']:.4f}")
        if "test_acc" in metrics:
            _echo(f"test accuracy: {metrics['test_acc']:.4f}")
        shown = ", ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))
        _echo(f"{stage} finished: {shown}")


def _expand_recipe(argv: list[str]) -> list[str]:
    """Replace ``--recipe NAME`` (or ``--recipe=NAME``) with ``--config <file of NAME>``."""
    expanded: list[str] = []
    position = 0
    while position < len(argv):
        arg = argv[position]
        if arg == "--recipe" or arg.startswith("--recipe="):
            if arg == "--recipe":
                if position + 1 >= len(argv):
                    raise UnknownRecipeError("`--recipe` needs a name, for example `--recipe fashion_mnist`.")
                name = argv[position + 1]
                position += 2
            else:
                name = arg.split("=", 1)[1]
                position += 1
            expanded += ["--config", str(find_recipe(name))]
            continue
        expanded.append(arg)
        position += 1
    return expanded


def _print_recipes(argv: list[str]) -> int:
    recipes = list_recipes()
    if not recipes:
        _echo("No recipes found.")
        return 1
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        _echo(f"{name:<{width}}  {describe_recipe(path)}")
    return 0


def _shards(argv: list[str]) -> int:
    from lightning_patterns.data.shards.cli import run_shards_command

    return run_shards_command(argv)


def _cache(argv: list[str]) -> int:
    from lightning_patterns.data.caching.cli import run_cache_command

    return run_cache_command(argv)


_TOOLS: dict[str, Callable[[list[str]], int]] = {"recipes": _print_recipes, "shards": _shards, "cache": _cache}


def register_tool(name: str, run: Callable[[list[str]], int]) -> None:
    """Add a non-training subcommand (``lightning-patterns NAME ...``)."""
    _TOOLS[name] = run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-patterns`` and ``python -m lightning_patterns``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _TOOLS:
        return _TOOLS[args[0]](args[1:])
    try:
        args = _expand_recipe(args)
    except UnknownRecipeError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    _lightning.built_class("LightningPatternsCLI")(args=args)
    return 0


if TYPE_CHECKING:  # type checkers see the body; at run time `__getattr__` builds the class
    LightningPatternsCLI = _LightningPatternsCLI
