"""Shard paths from a manifest: only relative paths that stay inside the dataset root, however they are read.

A path is checked in every form some layer between the manifest and the bytes might give it: as written,
after each round of percent-decoding (an HTTP server decodes ``%2e%2e`` to ``..``, some twice), and after
Unicode NFKC normalisation (which turns fullwidth dots and slash, U+FF0E and U+FF0F, into ``../``). Each
form must be a ``/``-separated relative path with no empty, ``.`` or ``..`` component, no backslash, no
``:`` (so no URL scheme and no drive letter), no ``?`` or ``#`` (no query or fragment), and no control or
invisible formatting character. Symlinks are the other way out of a root; local reads refuse those that
lead outside it (see :class:`~lightning_patterns.data.remote.RemoteReader`).

The writer names its shard files ``shard-<generation>-<token>-[b<bucket>-]<index>.lps``
(:func:`shard_file_name`); garbage collection only ever considers files named so
(:func:`shard_file_generation`).
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from typing import Any

from lightning_patterns.exceptions import UnsafePathError

__all__ = ["shard_file_generation", "shard_file_name", "validate_shard_path"]

_SHARD_FILE = re.compile(r"^shard-(\d{5,})-[0-9a-f]{8}-(?:b\d{5,}-)?\d{5,}\.lps$")

# Percent-decoding rounds tried; a path still changing after them is refused as obfuscated.
_MAX_DECODES = 4


def _forms(path: str) -> tuple[list[str], bool]:
    """``path`` as written, decoded round by round, each also NFKC-normalised; and whether decoding settled."""
    decoded = [path]
    for _ in range(_MAX_DECODES):
        step = urllib.parse.unquote(decoded[-1])
        if step == decoded[-1]:
            break
        decoded.append(step)
    else:
        return decoded, False
    return decoded + [unicodedata.normalize("NFKC", form) for form in decoded], True


def _problem(form: str) -> str | None:
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in form):
        return "contains a control or invisible formatting character"
    if "\\" in form:
        return "contains a backslash"
    if ":" in form:
        return "contains ':' (a URL scheme or drive letter)"
    if "?" in form or "#" in form:
        return "contains '?' or '#' (a URL query or fragment)"
    if form.startswith("/"):
        return "is absolute"
    if any(part in ("", ".", "..") for part in form.split("/")):
        return "has an empty, '.' or '..' component"
    return None


def validate_shard_path(path: Any, url: str = "<manifest>") -> str:
    """Return ``path`` if it is a safe relative path inside the dataset root, else raise.

    See the module docstring for what safe means; every form of the path (percent-decoded, NFKC-normalised)
    must be safe, so ``%2e%2e/secret.lps`` is refused like ``../secret.lps``.

    Args:
        path: the path as the manifest records it.
        url: the manifest's URL, named in the error.

    Returns:
        ``path`` unchanged.

    Raises:
        UnsafePathError: naming the manifest ``url``, the path, and why it is refused.

    Example:
        >>> validate_shard_path("sub/shard-00001.lps")
        'sub/shard-00001.lps'
        >>> try:
        ...     validate_shard_path("%2e%2e/secret.lps")
        ... except UnsafePathError as err:
        ...     print("which reads as '../secret.lps' and has an empty, '.' or '..' component" in str(err))
        True
    """
    reason = None
    if not isinstance(path, str) or not path:
        reason = "is empty or not a string"
    else:
        forms, settled = _forms(path)
        if not settled:
            reason = f"is still percent-encoded after {_MAX_DECODES} rounds of decoding"
        for form in forms:
            if reason is not None:
                break
            problem = _problem(form)
            if problem is not None:
                reason = problem if form == path else f"reads as {form!r} and {problem}"
    if reason is not None:
        raise UnsafePathError(
            f"Manifest {url!r} lists shard path {path!r}, which {reason}: it could point outside the dataset root. "
            f"Shard paths must be relative, '/'-separated paths inside the root (like 'shard-00001-....lps'). "
            f"The manifest was edited or is not trustworthy; rewrite the dataset."
        )
    return str(path)


def shard_file_name(generation: int, token: str, bucket: int | None, index: int) -> str:
    """The name the writer gives the ``index``-th shard file it writes (of hash ``bucket``, if any).

    Example:
        >>> shard_file_name(3, "0a1b2c3d", None, 7), shard_file_name(3, "0a1b2c3d", 12, 7)
        ('shard-00003-0a1b2c3d-00007.lps', 'shard-00003-0a1b2c3d-b00012-00007.lps')
    """
    return f"shard-{generation:05d}-{token}-{'' if bucket is None else f'b{bucket:05d}-'}{index:05d}.lps"


def shard_file_generation(name: str) -> int | None:
    """The generation in a file name the writer gives shards (:func:`shard_file_name`), ``None`` for any other.

    Example:
        >>> shard_file_generation("shard-00003-0a1b2c3d-00007.lps"), shard_file_generation("notes.txt")
        (3, None)
    """
    match = _SHARD_FILE.match(name)
    return None if match is None else int(match.group(1))
