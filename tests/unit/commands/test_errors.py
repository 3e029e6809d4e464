"""Which errors are the user's (one paragraph, exit status 2 or 1) and which are bugs (a traceback)."""

from __future__ import annotations

import pytest
from lightning_fabric.utilities.exceptions import MisconfigurationException

from lightning_patterns.commands.errors import UsageError, is_user_error, run_reporting_errors
from lightning_patterns.data.caching import make_cache
from lightning_patterns.exceptions import ManifestError


def _raise(error: BaseException) -> int:
    raise error


def _our_validation_error() -> int:
    make_cache("nvme", cache_dir=None, cache_limit=None)  # raises our own ValueError, naming the valid caches
    return 0


@pytest.mark.parametrize(
    ("run", "status", "message"),
    [
        (lambda: _raise(UsageError("bad --x\n  (indented detail)")), 2, "prog: error: bad --x (indented detail)\n"),
        (lambda: _raise(ManifestError("No dataset manifest at 'u'.")), 1, "prog: error: No dataset manifest at 'u'."),
        (lambda: _raise(ConnectionRefusedError("not reachable at 127.0.0.1:9")), 1, "not reachable at 127.0.0.1:9"),
        (lambda: _raise(MisconfigurationException("`Trainer(devices=0)`")), 1, "prog: error: `Trainer(devices=0)`"),
        (_our_validation_error, 1, "'nvme'"),
    ],
)
def test_user_errors_are_one_paragraph(
    run: object, status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_reporting_errors(run, prog="prog") == status  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert ("--traceback" in err) == (status == 1)


def test_bugs_keep_their_traceback() -> None:
    assert not is_user_error(ValueError("from a library"))  # not raised by our code
    with pytest.raises(ValueError, match="invalid literal"):
        run_reporting_errors(lambda: int("x"), prog="prog")
    with pytest.raises(KeyError):
        run_reporting_errors(lambda: {}["missing"], prog="prog")  # type: ignore[index]


def test_traceback_flag_and_environment_re_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ManifestError):
        run_reporting_errors(lambda: _raise(ManifestError("m")), prog="prog", traceback=True)
    monkeypatch.setenv("LIGHTNING_PATTERNS_DEBUG", "1")
    with pytest.raises(UsageError):
        run_reporting_errors(lambda: _raise(UsageError("u")), prog="prog")
    monkeypatch.setenv("LIGHTNING_PATTERNS_DEBUG", "0")
    assert run_reporting_errors(lambda: _raise(UsageError("u")), prog="prog") == 2
