"""The ``lightning-patterns`` command (also ``python -m lightning_patterns``): dispatch to the registered commands.

The commands live in :mod:`lightning_patterns.commands`, registered in ``COMMANDS`` (third parties add theirs
through the ``lightning_patterns.commands`` entry-point group). Errors a user can fix are printed as one paragraph
with exit status 2 (the command line) or 1 (at run time); ``--traceback`` or ``LIGHTNING_PATTERNS_DEBUG=1`` shows
the full traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_patterns.commands import COMMANDS
from lightning_patterns.commands.base import PROG, Command
from lightning_patterns.commands.errors import DEBUG_ENV, did_you_mean, report_error, run_reporting_errors

__all__ = ["main"]

# Built-in commands in the order a user meets them; plugins follow, sorted.
_ORDER = ("fit", "validate", "test", "predict", "recipes", "shards", "cache")


def _ordered_names() -> list[str]:
    return sorted(COMMANDS.names(), key=lambda name: (_ORDER.index(name) if name in _ORDER else len(_ORDER), name))


def _help() -> str:
    names = _ordered_names()
    width = max(len(name) for name in names)
    listed = "\n".join(f"  {name:<{width}}  {COMMANDS.get(name).help}" for name in names)
    return f"""usage: {PROG} [--traceback] COMMAND [ARGS ...]

Data-ingestion and distributed-training patterns for PyTorch Lightning.

commands:
{listed}

recipes:
  `{PROG} fit --recipe NAME` runs a recipe: a LightningCLI config (recipes/NAME.yaml) of a model,
  a DataModule and a Trainer. Options after it override its keys (--trainer.max_epochs=3); `recipes` lists
  them. A recipe keeps its checkpoints, logs and cache under lightning_logs/NAME/, and `validate --recipe NAME`
  scores its best checkpoint.

options:
  -h, --help   show this message; `{PROG} COMMAND --help` shows a command's options
  --traceback  on an error, show the full traceback instead of one paragraph (also {DEBUG_ENV}=1)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-patterns`` and ``python -m lightning_patterns``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in args
    args = [arg for arg in args if arg != "--traceback"]
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(_help())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        known = _ordered_names()
        report_error(
            PROG,
            f"unknown command {name!r}.{did_you_mean(name, known)} Commands: {', '.join(known)}. "
            f"Run `{PROG} --help` for what each does.",
        )
        return 2
    command = COMMANDS.get(name)()
    return run_reporting_errors(lambda: _exit_status(command, rest), prog=command.prog, traceback=traceback)


def _exit_status(command: Command, argv: list[str]) -> int:
    """Run ``command``; an argparse ``--help`` or usage error (``SystemExit``) becomes its exit status."""
    try:
        return command.run(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
