"""What a ``lightning-patterns`` subcommand is: a name, a one-line help and ``run(argv)``.

A command module imports only the standard library at the top; what a command needs (torch, Lightning, fsspec)
is imported inside ``run``, so ``lightning-patterns --help`` and the light commands stay fast.
"""

from __future__ import annotations

import argparse
import sys
from abc import ABC, abstractmethod
from typing import ClassVar, NoReturn

from lightning_patterns.commands.errors import did_you_mean

__all__ = ["Command", "CommandParser", "PROG", "echo", "option_strings"]

PROG = "lightning-patterns"


def echo(text: str = "") -> None:
    """Write one line of a command's output to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Command(ABC):
    """A subcommand: ``lightning-patterns NAME ARGS...``.

    Subclasses declare ``name`` (the registry key, snake_case) and ``help`` (one line for the top-level
    ``--help``) and implement :meth:`run`. Register one with ``COMMANDS.register(cls.name, cls)`` from
    :mod:`lightning_patterns.commands`, or from another package through the ``lightning_patterns.commands``
    entry-point group.
    """

    name: ClassVar[str]
    help: ClassVar[str]

    @property
    def prog(self) -> str:
        """The command as typed, e.g. ``lightning-patterns shards``."""
        return f"{PROG} {self.name}"

    @abstractmethod
    def run(self, argv: list[str]) -> int:
        """Run with the arguments after the command's name; return the exit status.

        Raise :class:`~lightning_patterns.commands.errors.UsageError` for a wrong command line (exit status 2);
        other user errors (an ``OSError``, the package's own errors) are reported in one paragraph too.
        """


class CommandParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors name only the offending argument, with a "did you mean", not the usage.

    Abbreviations are off: a misspelt option must fail with its name, never silently match a longer one.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` with a suggestion and a pointer to ``--help``; exit with status 2."""
        suggestion = ""
        if message.startswith("unrecognized arguments: "):
            word = message.removeprefix("unrecognized arguments: ").split()[0].split("=")[0]
            suggestion = did_you_mean(word, option_strings(self))
        elif "invalid choice: " in message:
            word = message.split("invalid choice: ")[1].split(" (choose")[0].strip("'\"")
            choices = [choice for action in self._actions for choice in (action.choices or ())]
            suggestion = did_you_mean(word, [str(choice) for choice in choices])
        message = message.rstrip(".")
        self.exit(2, f"{self.prog}: error: {message}.{suggestion} Run `{self.prog} --help` for the options.\n")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option of ``parser`` and of its subcommands (argparse reports a subcommand's stray option at the top)."""
    options = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options += option_strings(subparser)
    return options
