"""``lightning-patterns fit|validate|test|predict``: LightningCLI over any LightningModule and LightningDataModule.

Every constructor argument of the model, the DataModule and the Trainer is a key of the config YAML and can be
overridden on the command line (``--trainer.max_epochs=3``). ``--recipe NAME`` loads the recipe's YAML where it
stands, as ``--config FILE`` would; ``validate``/``test``/``predict --recipe NAME`` load the recipe's best
checkpoint unless ``--ckpt_path`` is given. A parse error names the key (with a "did you mean"); a value a
constructor refuses is a usage error too (exit status 2). Lightning is imported by :func:`_cli_class` only, when
one of these commands runs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from lightning_utilities.core.rank_zero import rank_zero_only

from lightning_patterns import _lightning
from lightning_patterns.commands.base import PROG, Command, echo, option_strings
from lightning_patterns.commands.errors import UsageError, is_user_error
from lightning_patterns.recipes import UnknownRecipeError, best_checkpoint, find_recipe

if TYPE_CHECKING:
    from pytorch_lightning.cli import LightningArgumentParser
    from pytorch_lightning.cli import LightningCLI as _LightningCLI
else:
    _LightningCLI = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["FitCommand", "PredictCommand", "TestCommand", "ValidateCommand", "run_lightning_cli"]

_RECIPE_HELP = (
    "Run a recipe by name (see `lightning-patterns recipes`): loads recipes/NAME.yaml here, as --config would; "
    "later options override it. validate/test/predict also load the recipe's best checkpoint "
    "(lightning_logs/NAME/checkpoints/best.ckpt) unless --ckpt_path is given."
)
_EVALUATING = ("validate", "test", "predict")


class _ActionRecipe(argparse.Action):
    """``--recipe NAME``: apply the recipe's YAML where the option stands and remember the name."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: str | None = None
    ) -> None:
        from jsonargparse import ActionConfigFile  # type: ignore[attr-defined]  # re-exported without __all__

        ActionConfigFile.apply_config(parser, namespace, "config", str(find_recipe(str(values))))
        setattr(namespace, self.dest, values)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _note(text: str) -> None:
    """A remark before the run starts, on stderr, from the first process of a machine only."""
    import os

    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        sys.stderr.write(f"{PROG}: {text}\n")
        sys.stderr.flush()


def _cli_class() -> type[_LightningCLI]:
    """The LightningCLI subclass of the command, built for the Lightning package in use."""
    return cast("type[_LightningCLI]", _lightning.built_class("LightningPatternsCLI"))


class _LightningPatternsCLI(_LightningCLI):
    """LightningCLI over any LightningModule and LightningDataModule, with ``--recipe`` and a closing summary.

    Built for each Lightning package as ``LightningPatternsCLI`` (see :mod:`lightning_patterns._lightning`).
    """

    _lp_tree: ClassVar[_lightning.Tree]

    def __init__(self, args: Sequence[str], run: bool = True, prog: str = PROG) -> None:
        self._prog = prog  # what parse errors name: `lightning-patterns fit`, or the command that builds us
        super().__init__(
            model_class=self._lp_tree.pl.LightningModule,
            datamodule_class=self._lp_tree.pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": prog},
            args=list(args),
            run=run,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that raise on errors (reported in one sentence) and never expand abbreviations."""
        # A misspelt key must fail with its name, never silently match a longer one.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--recipe NAME`` next to ``--config``."""
        parser.add_argument("--recipe", action=_ActionRecipe, metavar="NAME", help=_RECIPE_HELP)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` only (never ``sys.argv``); a parse error becomes one sentence naming the key."""
        subcommand = args[0] if args and self._prog == PROG else ""
        try:
            self.config = parser.parse_args(args)
        except UnknownRecipeError as error:
            raise UsageError(str(error)) from None
        except argparse.ArgumentError as error:
            from lightning_patterns.commands._parse_errors import explain_parse_error

            message = explain_parse_error(str(error), option_strings(parser), f"{self._prog} {subcommand}".strip())
            raise UsageError(message) from None
        self._use_recipe_checkpoint()

    def _use_recipe_checkpoint(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand not in _EVALUATING:
            return
        section = self.config[subcommand]
        recipe = section.get("recipe")
        if recipe is None or section.get("ckpt_path") is not None:
            return
        best = best_checkpoint(recipe)
        if best.is_file():
            section["ckpt_path"] = str(best)
            _note(
                f"{subcommand} loads the best checkpoint of recipe {recipe!r}: {best} (--ckpt_path PATH for another)."
            )
        else:
            _note(
                f"recipe {recipe!r} has no checkpoint at {best}, so {subcommand} runs an untrained model. Train "
                f"it first with `{PROG} fit --recipe {recipe}`, or pass --ckpt_path PATH."
            )

    def instantiate_classes(self) -> None:
        """Build the model, DataModule and Trainer; a value their constructors refuse is a usage error."""
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = _root_cause(error)
            if not (is_user_error(cause) or isinstance(cause, (ValueError, TypeError))):
                raise
            raise UsageError(str(cause)) from error

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
        metrics: dict[str, int | float] = {
            name: float(value) for name, value in self.trainer.callback_metrics.items() if value.numel() == 1
        }
        # Callbacks that keep exact values of what they logged (counts as integers) override the logged floats.
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            exact = getattr(callback, "last_logged", None)
            if isinstance(exact, dict):
                metrics.update(exact)
        if "val_acc" in metrics:
            echo(f"validation accuracy: {metrics['val_acc']:.4f}")
        if "test_acc" in metrics:
            echo(f"test accuracy: {metrics['test_acc']:.4f}")
        for split, name in (("val", "validation"), ("test", "test")):
            if f"{split}_auc" in metrics:
                reference = metrics.get(f"{split}_reference_auc")
                beside = "" if reference is None else f" (the generating model's: {reference:.4f})"
                echo(f"{name} AUC: {metrics[f'{split}_auc']:.4f}{beside}")
        shown = ", ".join(
            f"{name}={value}" if isinstance(value, int) else f"{name}={value:.4f}"
            for name, value in sorted(metrics.items())
        )
        echo(f"{stage} finished: {shown}")


def run_lightning_cli(argv: Sequence[str]) -> int:
    """Run LightningCLI with ``argv`` (``["fit", "--recipe", "fashion_mnist", ...]``); returns ``0`` when it ran.

    Raises:
        UsageError: a wrong key, value, recipe name or constructor argument.
        SystemExit: ``--help`` and ``--print_config``, with status 0, after printing.
    """
    with warnings.catch_warnings():
        # A recipe writes its checkpoints to the same folder on every run, on purpose.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        _cli_class()(args=list(argv))  # --help and --print_config end in SystemExit(0)
    return 0


class _LightningCommand(Command):
    """A LightningCLI subcommand: the Trainer method of the same name."""

    def run(self, argv: list[str]) -> int:
        """Run ``Trainer.<name>`` through LightningCLI."""
        return run_lightning_cli([self.name, *argv])


class FitCommand(_LightningCommand):
    """``lightning-patterns fit``."""

    name = "fit"
    help = "train a model (LightningCLI: --recipe NAME or --config FILE, then --key=value overrides)"


class ValidateCommand(_LightningCommand):
    """``lightning-patterns validate``."""

    name = "validate"
    help = "score a model on the validation data (with --recipe: its best checkpoint)"


class TestCommand(_LightningCommand):
    """``lightning-patterns test``."""

    name = "test"
    help = "score a model on the test data (with --recipe: its best checkpoint)"


class PredictCommand(_LightningCommand):
    """``lightning-patterns predict``."""

    name = "predict"
    help = "predict with a model (with --recipe: its best checkpoint)"
