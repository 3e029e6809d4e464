"""``lightning-patterns fit|validate|test|predict``: recipes, one-paragraph errors, checkpoints, the closing line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_patterns.cli import main
from lightning_patterns.commands.errors import UsageError
from lightning_patterns.recipes import UnknownRecipeError, best_checkpoint, find_recipe

SHORT_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]
# The default recipe streams its embedded dataset: make it small.
SMALL_DATA = [
    "--data.init_args.embedded.train_samples=256",
    "--data.init_args.embedded.val_samples=64",
    "--data.init_args.batch_size=32",
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes write lightning_logs/<recipe>/ in the working folder, and demo shards in the user cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_PATTERNS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIGHTNING_PATTERNS_DEBUG", raising=False)


def _paragraph(err: str) -> str:
    """stderr minus Lightning's own lines, checked to be one short paragraph without a traceback or usage."""
    ours = [line for line in err.splitlines() if line.startswith("lightning-patterns") or line.startswith("(Run")]
    assert ours, err
    assert len(ours) <= 2, err
    assert "Traceback" not in err
    assert "usage:" not in err
    return " ".join(ours)


def test_unknown_recipe_lists_valid_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe", "no_such_recipe"]) == 2
    err = _paragraph(capsys.readouterr().err)
    assert "Unknown recipe 'no_such_recipe'" in err
    assert "fashion_mnist" in err


def test_find_recipe_raises_with_valid_names() -> None:
    with pytest.raises(UnknownRecipeError, match=r"Valid recipes: .*fashion_mnist"):
        find_recipe("nope")


def test_recipe_flag_without_a_name_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe"]) == 2
    err = _paragraph(capsys.readouterr().err)
    assert "`--recipe` needs a value" in err
    assert "lightning-patterns recipes" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # A misspelt key: only that key, with the closest valid one.
        (["--trainer.max_epoch=3"], ["Unknown option `--trainer.max_epoch`", "Did you mean `--trainer.max_epochs`?"]),
        (["--trainer.max_epochs=three"], ["Invalid value 'three' for `trainer.max_epochs`", "expected int or None"]),
        (
            ["--data.init_args.bach_size=3"],
            ["`ShardedStreamingDataModule` takes no argument `bach_size`", "Did you mean `batch_size`?"],
        ),
        (
            ["--data.init_args.embedded.train_sample=3"],
            ["`EmbeddedFashionMNIST` takes no argument `train_sample`", "Did you mean `train_samples`?"],
        ),
        (["--model.optimizer=rms"], ["Invalid value 'rms' for `model.optimizer`", "expected one of 'adam', 'sgd'."]),
        (
            ["--model=lightning_patterns.models.MLPClasifier"],
            ["No class `MLPClasifier`", "Did you mean `MLPClassifier`?"],
        ),
        # Values the constructors refuse: their own sentence, exit status 2 too.
        (["--data.batch_size=-5"], ["`batch_size` must be at least 1, got batch_size=-5."]),
        (["--trainer.devices=0"], ["`Trainer(devices='0')` value is not a valid input"]),
        (["--model.init_args.input_shape=[0, 28]"], ["`input_shape` must be the positive sizes of one image"]),
    ],
)
def test_usage_errors_are_one_paragraph_with_status_2(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", "--recipe", "fashion_mnist", *argv]) == 2
    err = _paragraph(capsys.readouterr().err)
    assert err.startswith("lightning-patterns fit: error: ")
    for text in expected:
        assert text in err


def test_wrong_key_in_a_config_file_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(find_recipe("fashion_mnist").read_text() + "\nnot_a_key: 1\ntrainer:\n  max_epoch: 3\n")
    assert main(["fit", "--config", str(config)]) == 2
    err = _paragraph(capsys.readouterr().err)
    assert "Unknown key `" in err
    assert "not_a_key" in err or "trainer.max_epoch" in err


def test_traceback_flag_and_debug_variable_show_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"batch_size=-5") as raised:
        main(["fit", "--traceback", "--recipe", "fashion_mnist", "--data.batch_size=-5"])
    assert isinstance(raised.value.__cause__, ValueError)  # the chain down to the constructor's own error
    monkeypatch.setenv("LIGHTNING_PATTERNS_DEBUG", "1")
    with pytest.raises(UsageError, match=r"Unknown option `--trainer.max_epoch`"):
        main(["fit", "--recipe", "fashion_mnist", "--trainer.max_epoch=3"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_runtime_errors_name_the_url_with_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    streamed = ["--data.init_args.embedded=null", *SHORT_RUN]
    missing = tmp_path / "no_such_dataset"
    assert main(["fit", "--recipe", "fashion_mnist", *streamed, f"--data.init_args.train_url={missing}"]) == 1
    err = _paragraph(capsys.readouterr().err)
    assert str(missing) in err
    assert "manifest" in err.lower()
    assert "--traceback" in err

    port = _closed_port()
    url = f"http://127.0.0.1:{port}/dataset"
    assert main(["fit", "--recipe", "fashion_mnist", *streamed, f"--data.init_args.train_url={url}"]) == 1
    err = _paragraph(capsys.readouterr().err)
    assert f"127.0.0.1:{port}" in err
    assert "reachable" in err


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"\b{name}=([0-9.]+)", text).group(1))  # type: ignore[union-attr]


def test_refused_connection_says_the_server_is_not_reachable(capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    streamed = ["--data.init_args.embedded=null", *SHORT_RUN, f"--data.init_args.train_url=http://127.0.0.1:{port}/d"]
    assert main(["fit", "--recipe", "fashion_mnist", *streamed]) == 1
    err = _paragraph(capsys.readouterr().err)
    assert f"not reachable at 127.0.0.1:{port}" in err
    assert "max_attempts" not in err  # more attempts do not help a refused connection


def test_fit_keeps_checkpoints_that_validate_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    best = best_checkpoint("fashion_mnist")
    # Before any fit: validate says there is no checkpoint, and how to make one.
    assert main(["validate", "--recipe", "fashion_mnist", *SHORT_RUN[2:], *SMALL_DATA]) == 0
    captured = capsys.readouterr()
    assert f"recipe 'fashion_mnist' has no checkpoint at {best}" in captured.err
    assert "lightning-patterns fit --recipe fashion_mnist" in captured.err
    untrained_loss = _metric(captured.out, "val_loss")

    # A large learning rate, so that two steps change the validation loss visibly.
    assert main(["fit", "--recipe", "fashion_mnist", *SHORT_RUN, *SMALL_DATA, "--model.init_args.lr=0.05"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / best).is_file()
    assert (tmp_path / best.parent / "last.ckpt").is_file()
    closing = out.split("fit finished: ")[1]
    # The closing line: counts as integers, from the same reduced counters as the table above it.
    assert re.search(r"data/retries=\d+,", closing)
    assert "data/samples=64," in closing  # limit_train_batches=2 of 32 samples
    row = next(line.split() for line in out.splitlines() if re.match(r"\s+0\s+[0-9,]+\s", line))
    assert f"data/remote_bytes={int(row[3].replace(',', ''))}," in closing
    fitted_loss = _metric(closing, "val_loss")
    assert fitted_loss != untrained_loss

    # One epoch: the best checkpoint holds the final weights, so validate scores exactly what fit did.
    assert main(["validate", "--recipe", "fashion_mnist", *SHORT_RUN[2:], *SMALL_DATA]) == 0
    captured = capsys.readouterr()
    assert f"loads the best checkpoint of recipe 'fashion_mnist': {best}" in captured.err
    assert _metric(captured.out, "val_loss") == fitted_loss


@pytest.mark.slow
def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lightning-patterns"
    listed = subprocess.run([str(script), "recipes"], capture_output=True, text=True, timeout=120, check=True)
    assert "fashion_mnist" in listed.stdout
    fitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_patterns",
            "validate",
            "--recipe",
            "fashion_mnist",
            *SHORT_RUN[2:],
            *SMALL_DATA,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "LIGHTNING_PATTERNS_CACHE": str(tmp_path / "cache")},
    )
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert "validation accuracy: " in fitted.stdout
