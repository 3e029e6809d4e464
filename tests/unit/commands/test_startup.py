"""The CLI starts light and runs quietly: the light commands import neither torch nor Lightning, plugins register
through the entry-point group, and a normal ``fit`` raises no warning of ours (warnings are errors there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lightning_patterns.data.shards.writer import write_dataset

HEAVY = ("torch", "pytorch_lightning", "lightning")

# Runs each command's main in this one process and reports which heavy packages are loaded after each.
_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    heavy = set(sys.argv[2].split(","))
    def loaded():
        return sorted({name.split(".")[0] for name in sys.modules} & heavy)
    import lightning_patterns
    report = {"package": loaded(), "runs": []}
    from lightning_patterns.cli import main
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
        run = {"argv": argv, "code": code, "heavy": loaded(), "out": out.getvalue(), "err": err.getvalue()}
        report["runs"].append(run)
    print(json.dumps(report))
    """
)

_PLUGIN = textwrap.dedent(
    """
    from lightning_patterns.commands.base import Command, echo

    class HelloCommand(Command):
        name = "hello"
        help = "greet (a command from another package)"

        def run(self, argv):
            echo("hello " + " ".join(argv))
            return 0
    """
)


def _install_plugin(site: Path) -> None:
    """A distribution on ``site`` that registers ``hello`` in the ``lightning_patterns.commands`` group."""
    (site / "lp_hello.py").write_text(_PLUGIN)
    info = site / "lp_hello-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lp-hello\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lightning_patterns.commands]\nhello = lp_hello:HelloCommand\n")


@pytest.mark.slow
def test_light_commands_import_neither_torch_nor_lightning_and_plugins_register(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    write_dataset([{"x": np.float32(i)} for i in range(40)], str(dataset), shard_bytes=1024, progress=False)
    _install_plugin(tmp_path)
    commands = [
        ["--help"],
        ["recipes"],
        ["recipes", "--help"],
        ["cache", "info"],
        ["cache", "clear", "--demo"],
        ["cache", "--help"],
        ["shards", "--help"],
        ["shards", "inspect", str(dataset), "--world-size", "2"],
        ["shards", "check", str(dataset), "--world-size", "1-8", "--workers", "0-2", "--max-examples", "10"],
        ["ps", "--help"],
        ["hello", "world"],
    ]
    env = {
        **os.environ,
        "LIGHTNING_PATTERNS_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(commands), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
        env=env,
    )
    report = json.loads(probe.stdout)
    runs = {" ".join(run["argv"]): run for run in report["runs"]}
    for name, run in runs.items():
        assert run["code"] == 0, (name, run["err"])
    assert "greet (a command from another package)" in runs["--help"]["out"]
    assert runs["hello world"]["out"] == "hello world\n"
    assert not report["package"], f"`import lightning_patterns` itself loads {report['package']}"
    heavy = {name: run["heavy"] for name, run in runs.items() if run["heavy"]}
    assert not heavy, f"these commands imported torch or Lightning (the first one is the culprit): {heavy}"


# The only warnings allowed: Lightning's own calls into APIs that torch and jsonargparse have deprecated.
_QUIET_FIT = textwrap.dedent(
    """
    import sys, warnings
    import jsonargparse._deprecated
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=jsonargparse._deprecated.JsonargparseDeprecationWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\\(treespec, LeafSpec\\)`", category=FutureWarning)
    from lightning_patterns.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_normal_fit_raises_no_warning_of_ours(tmp_path: Path) -> None:
    argv = [
        "fit",
        "--recipe",
        "fashion_mnist",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.embedded.train_samples=256",
        "--data.init_args.embedded.val_samples=64",
        "--data.init_args.batch_size=32",
    ]
    # The demo's server process inherits "error" too: a RuntimeWarning there (runpy's) stops it from starting.
    env = {
        **os.environ,
        "LIGHTNING_PATTERNS_CACHE": str(tmp_path / "cache"),
        "PYTHONWARNINGS": "error,ignore::DeprecationWarning",
    }
    # As on a second run: the recipe's checkpoint folder holds files already (Lightning warns about that).
    checkpoints = tmp_path / "lightning_logs" / "fashion_mnist" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"")
    fitted = subprocess.run(
        [sys.executable, "-c", _QUIET_FIT, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert "validation accuracy: " in fitted.stdout
    assert "Warning" not in fitted.stderr, fitted.stderr[-3000:]
