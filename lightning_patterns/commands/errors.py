"""How ``lightning-patterns`` reports a failure: one paragraph (what, expected, fix), not a traceback.

A user error is a wrong command line or config (:class:`UsageError`, exit status 2) or a failure at run time the
user can act on (exit status 1): any error class of lightning_patterns, an ``OSError`` (a missing file, a server
that does not answer), Lightning's ``MisconfigurationException``, and the ``ValueError``/``TypeError`` our own
code raises to refuse an argument. Anything else is a bug and keeps its traceback. ``--traceback`` or
``LIGHTNING_PATTERNS_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["DEBUG_ENV", "UsageError", "did_you_mean", "is_user_error", "report_error", "run_reporting_errors"]

DEBUG_ENV = "LIGHTNING_PATTERNS_DEBUG"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class UsageError(ValueError):
    """The command line, or a config it names, is wrong: reported as one paragraph with exit status 2."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` Did you mean `X`?`` for the candidate closest to ``word``, or ``""`` when none is close.

    Examples:
        >>> did_you_mean("--trainer.max_epoch", ["--trainer.max_epochs", "--trainer.min_epochs"])
        ' Did you mean `--trainer.max_epochs`?'
        >>> did_you_mean("xyz", ["fit", "test"])
        ''
    """
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def _raised_by_us(traceback: TracebackType | None) -> bool:
    """Whether the innermost frame of ``traceback`` is lightning_patterns code (a deliberate ``raise``)."""
    last = None
    while traceback is not None:
        last, traceback = traceback, traceback.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (reported in one paragraph) rather than a bug (a traceback)."""
    kind = type(error)
    if isinstance(error, (UsageError, OSError)) or kind.__module__.split(".")[0] == "lightning_patterns":
        return True
    if any(cls.__name__ == "MisconfigurationException" for cls in kind.__mro__):
        return True
    return isinstance(error, (ValueError, TypeError)) and _raised_by_us(error.__traceback__)


def _one_paragraph(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    # Keep the sentence, drop the layout: indented continuation lines become one line.
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def report_error(prog: str, message: str, *, hint: str = "") -> None:
    """Write ``prog: error: message`` (and an optional hint) to stderr, as one paragraph."""
    sys.stderr.write(f"{prog}: error: {message}\n" + (f"{hint}\n" if hint else ""))
    sys.stderr.flush()


def run_reporting_errors(run: Callable[[], int], *, prog: str, traceback: bool = False) -> int:
    """Run a command and turn a user error into one paragraph on stderr and an exit status.

    Args:
        run: the command; returns its exit status.
        prog: the command as typed (``"lightning-patterns fit"``), the prefix of the message.
        traceback: re-raise every error with its traceback (``--traceback``); also on when ``$LIGHTNING_PATTERNS_DEBUG``
            is set to anything but ``0``.

    Returns:
        The command's exit status, ``2`` after a :class:`UsageError`, ``1`` after another user error.
    """
    traceback = traceback or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return run()
    except Exception as error:
        if traceback or not is_user_error(error):
            raise
        usage = isinstance(error, UsageError)
        hint = "" if usage else f"(Run again with --traceback, or {DEBUG_ENV}=1, for the full traceback.)"
        report_error(prog, _one_paragraph(error), hint=hint)
        return 2 if usage else 1
