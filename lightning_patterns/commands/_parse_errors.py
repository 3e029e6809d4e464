"""One sentence for a LightningCLI (jsonargparse) parse error, naming the offending key, with a "did you mean".

jsonargparse reports a bad key or value as a tree (every type of a ``Union`` it tried, every class it tried);
the user needs its one leaf: the key, what was given and what was expected.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence

from lightning_patterns.commands.errors import did_you_mean

__all__ = ["explain_parse_error"]

_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (\S+)")
_CONFIG_KEY = re.compile(r"^Subcommand '([^']+)' does not accept option '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a (<class '([^']+)'>|typing\.Literal\[(.*)\]|.+?)(?:\. Got value: (.*))?$")
_GIVEN = re.compile(r"Given value: (.*)$")
_NO_ATTRIBUTE = re.compile(r"module '([^']+)' has no attribute '([^']+)'")
_NO_VALUE = re.compile(r"^argument (\S+?)(?:/\S+)?: expected (?:one|at least one) argument")
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']+)' \(choose from (.*)\)")


def _parameters(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` (empty when it cannot be imported)."""
    module_name, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
        parameters = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _expected(lines: Sequence[str]) -> tuple[str, str | None]:
    """What the leaf expected (``int or None``, ``one of 'adam', 'sgd'``) and the value it got, if it says."""
    kinds: list[str] = []
    got = None
    for line in lines:
        match = _EXPECTED.search(line.strip().lstrip("- "))
        if match is None:
            continue
        class_name, literal, value = match.group(2), match.group(3), match.group(4)
        if literal is not None:
            kinds.append(f"one of {literal}")
        elif class_name is not None:
            kinds.append("None" if class_name == "NoneType" else class_name.rpartition(".")[2])
        else:
            kinds.append(match.group(1))
        got = got if value is None else value
    return " or ".join(dict.fromkeys(kinds)), got


def _leaf(lines: Sequence[str]) -> list[str]:
    """The lines under the innermost ``Parser key`` line: what that key expected (outer alternatives left out)."""
    starts = [i for i, line in enumerate(lines) if _PARSER_KEY.search(line)]
    if not starts:
        return list(lines)
    indent = len(lines[starts[-1]]) - len(lines[starts[-1]].lstrip())
    leaf = []
    for line in lines[starts[-1] + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        leaf.append(line)
    return leaf


def explain_parse_error(message: str, options: Sequence[str], prog: str) -> str:
    """Turn jsonargparse's error ``message`` into one sentence.

    Args:
        message: the parser's error message.
        options: every option the subcommand accepts (``--trainer.max_epochs``, ...), for suggestions.
        prog: the command as typed, for the pointer to ``--help``.

    Returns:
        The sentence: the offending key or value, what was expected and a suggestion when one is close.

    Examples:
        >>> explain_parse_error("unrecognized arguments: --trainer.max_epoch=3", ["--trainer.max_epochs"], "fit")
        'Unknown option `--trainer.max_epoch`. Did you mean `--trainer.max_epochs`? Run `fit --help` for the options.'
    """
    more = f" Run `{prog} --help` for the options."
    lines = message.splitlines()
    first = lines[0].strip() if lines else message
    if match := _UNRECOGNIZED.match(first):
        key = match.group(1).split("=")[0]
        return f"Unknown option `{key}`.{did_you_mean(key, options)}{more}"
    if match := _CONFIG_KEY.match(first):
        key = match.group(2)
        keys = [option.lstrip("-") for option in options]
        return f"Unknown key `{key}` in the config.{did_you_mean(key, keys)}{more}"
    if match := _NO_VALUE.match(first):
        option = match.group(1)
        example = " Name a recipe, for example `--recipe fashion_mnist`; `lightning-patterns recipes` lists them."
        return f"`{option}` needs a value.{example if option == '--recipe' else more}"
    if match := _INVALID_CHOICE.search(first):
        what = first.split(":")[0].removeprefix("argument ")
        return f"Unknown {what} {match.group(1)!r}: expected one of {match.group(2)}."
    keys = _PARSER_KEY.findall(message)
    for index, line in enumerate(lines):
        if match := _NOT_ACCEPTED.search(line):
            argument = match.group(1)
            classes = [m.group(1) for m in map(_CLASS_PATH.search, lines[:index]) if m]
            owner = classes[-1] if classes else ".".join(keys)
            suggestion = did_you_mean(argument, _parameters(owner)) if classes else ""
            where = f" (under `{'.'.join(keys)}`)" if keys else ""
            return f"`{owner.rpartition('.')[2]}` takes no argument `{argument}`{where}.{suggestion}{more}"
    for line in lines:
        if match := _NO_ATTRIBUTE.search(line):
            module_name, name = match.groups()
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                names: list[str] = []
            else:  # `__all__` first: modules that build their classes on first use list them there
                names = list(getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]))
            return f"No class `{name}` in `{module_name}` (for `{'.'.join(keys)}`).{did_you_mean(name, names)}{more}"
    if keys:
        expected, got = _expected(_leaf(lines))
        if got is None:
            given = [m.group(1) for m in map(_GIVEN.search, lines) if m]
            got = given[0] if given else None
        what = f"Invalid value {got!r} for `{'.'.join(keys)}`" if got is not None else f"Invalid `{'.'.join(keys)}`"
        leaf = [line.strip().lstrip("- ") for line in _leaf(lines) if line.strip()]
        detail = f"expected {expected}" if expected else (leaf[-1] if leaf else "")
        return f"{what}: {detail}.{more}"
    return f"{' '.join(line.strip() for line in lines if line.strip())}.{more}"
