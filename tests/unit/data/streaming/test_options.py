"""The dataset's option groups: `ReadAhead` and `ClassBalance`, each checked when made, with one clear error each."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_patterns.data.streaming.options import ClassBalance, ReadAhead


def test_defaults_are_the_datasets_defaults() -> None:
    # The read-ahead budget is in bytes; a number of shards is an optional second bound.
    assert ReadAhead() == ReadAhead(shards=None, max_bytes=32 * 2**20, threads=4, timeout=600.0)
    assert ClassBalance(3) == ClassBalance(min_per_class=3, label_field="label", num_classes=None, lookahead=4096)
    assert ReadAhead(shards=2, max_bytes=None).max_bytes is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ReadAhead(shards=-1), r"ReadAhead\(shards=-1\) must be an integer >= 0; use 0 to fetch only the"),
        (lambda: ReadAhead(max_bytes=0), r"ReadAhead\(max_bytes=0\) must be an integer >= 1; use None to bound by"),
        (
            lambda: ReadAhead(max_bytes=None),
            r"ReadAhead\(shards=None, max_bytes=None\) would fetch the whole dataset ahead; bound it in bytes",
        ),
        (lambda: ReadAhead(threads=0), r"ReadAhead\(threads=0\) must be an integer >= 1; e\.g\. threads=4"),
        (lambda: ReadAhead(threads=2.5), r"ReadAhead\(threads=2\.5\) must be an integer >= 1"),
        (lambda: ReadAhead(timeout=0), r"ReadAhead\(timeout=0\) must be > 0 seconds; raise it for very large shards"),
        (lambda: ReadAhead(timeout=-1.5), r"ReadAhead\(timeout=-1\.5\) must be > 0 seconds"),
        (lambda: ClassBalance(0), r"ClassBalance\(min_per_class=0\) must be an integer >= 1"),
        (lambda: ClassBalance(True), r"ClassBalance\(min_per_class=True\) must be an integer >= 1"),
        (lambda: ClassBalance(1, label_field=""), r"ClassBalance\(label_field=''\) must name the field holding the"),
        (lambda: ClassBalance(1, num_classes=0), r"ClassBalance\(num_classes=0\) must be an integer >= 1; use None"),
        (lambda: ClassBalance(1, lookahead=-1), r"ClassBalance\(lookahead=-1\) must be an integer >= 0"),
    ],
)
def test_invalid_options_name_the_value(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
