"""The top level of ``lightning-patterns``: the help lists every command, every command honours ``--help``."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_patterns.cli import main
from lightning_patterns.commands import COMMANDS, Command


def test_help_lists_every_command_and_explains_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "recipes", "shards", "cache"):
        line = next(line for line in out.splitlines() if line.startswith(f"  {name} "))
        assert COMMANDS.get(name).help in line
    assert "--recipe NAME" in out
    assert "--traceback" in out
    assert main([]) == 2  # no command: the same help, as a usage error


def test_registry_holds_commands_by_their_declared_names() -> None:
    assert set(COMMANDS.names()) >= {"fit", "validate", "test", "predict", "recipes", "shards", "cache"}
    for name in COMMANDS.names():
        command = COMMANDS.get(name)
        assert issubclass(command, Command)
        assert command.name == name
        assert command.help
        assert "\n" not in command.help


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fitt", "--recipe", "fashion_mnist"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fitt'. Did you mean `fit`?" in err
    assert "usage:" not in err


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["recipes", "--help"], "List the recipes"),
        (["shards", "--help"], "{write,inspect,check,gc}"),
        (["shards", "write", "--help"], "--shard-bytes"),
        (["shards", "inspect", "--help"], "--world-size"),
        (["cache", "--help"], "{info,clear}"),
        (["cache", "info", "--help"], "--demo"),
        (["cache", "clear", "--help"], "--recipes"),
        (["fit", "--help"], "--recipe NAME"),
        (["validate", "--help"], "--ckpt_path"),
        (["test", "--help"], "--recipe NAME"),
        (["predict", "--help"], "--recipe NAME"),
    ],
)
def test_every_command_honours_help(argv: list[str], shown: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    assert shown in out


def test_argparse_commands_name_only_the_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "inspect", str(tmp_path), "--num-worker", "2"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --num-worker 2. Did you mean `--num-workers`?" in err
    assert "usage:" not in err
    assert main(["cache", "info", "--cache-dri", str(tmp_path)]) == 2
    assert "Did you mean `--cache-dir`?" in capsys.readouterr().err
    assert main(["cache", "inf"]) == 2
    assert "Did you mean `info`?" in capsys.readouterr().err


def test_only_the_top_level_imports_the_commands() -> None:
    """The layers below (data, demo, testing, strategies) never import a command: commands sit on top."""
    package = Path(__file__).resolve().parents[3] / "lightning_patterns"
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.parent != package / "commands"
        # `_lightning` names the LightningCLI body (a string) to build it per Lightning package; it imports nothing.
        and path not in (package / "cli.py", package / "__main__.py", package / "_lightning.py")
        and "lightning_patterns.commands" in path.read_text()
    ]
    assert not offenders
