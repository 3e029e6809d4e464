"""Byte counts for people: ``human_bytes`` writes them, ``parse_size`` reads them (``8MiB``, ``64MB``, ``1048576``).

One place for units, shared by the commands, the benchmarks and error messages; the standard library only, so
a command that prints sizes imports nothing heavy.
"""

from __future__ import annotations

import re

__all__ = ["human_bytes", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 2**10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 2**20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 2**30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Parse a byte count with an optional unit: ``1048576``, ``64MB`` (10⁶), ``32MiB`` (2²⁰), ``1.5GiB``.

    Units are case-insensitive: ``B``, ``K``/``KB``, ``KiB``, ``M``/``MB``, ``MiB``, ``G``/``GB``, ``GiB``,
    ``T``/``TB``, ``TiB``.

    Args:
        text: the size as typed.

    Returns:
        The number of bytes, at least 1.

    Raises:
        ValueError: ``text`` is not a size, or is below one byte.

    Examples:
        >>> parse_size("32MiB"), parse_size("64MB"), parse_size("1048576")
        (33554432, 64000000, 1048576)
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"Expected a byte count such as 1048576, 64MB or 32MiB, got {text!r}. "
            f"Units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB."
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"Expected a size of at least 1 byte, got {text!r}.")
    return value


def human_bytes(n: float) -> str:
    """A byte count for people: ``B`` below 1 KiB, else one decimal in ``KiB``, ``MiB``, ``GiB`` or ``TiB``.

    Examples:
        >>> human_bytes(512), human_bytes(3 * 2**29), human_bytes(5 * 2**40)
        ('512 B', '1.5 GiB', '5.0 TiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
