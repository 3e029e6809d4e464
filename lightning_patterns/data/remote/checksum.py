"""Checksums of fetched bytes: one parser, one comparison, one message for a mismatch."""

from __future__ import annotations

import hashlib

from lightning_patterns.data.remote.retry import redact_url
from lightning_patterns.exceptions import ChecksumMismatchError

__all__ = ["checksum_mismatch", "parse_checksum"]


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"<algorithm>:<hex digest>"`` into a lower-case algorithm hashlib knows and the digest.

    Args:
        checksum: e.g. ``"sha256:9f86d0..."``.

    Returns:
        ``(algorithm, digest)``.

    Raises:
        ValueError: ``checksum`` is malformed or names an algorithm hashlib does not have.
    """
    algorithm, sep, digest = checksum.partition(":") if isinstance(checksum, str) else ("", "", "")
    algorithm = algorithm.lower()
    if not sep or not digest or algorithm not in hashlib.algorithms_available:
        raise ValueError(
            f"checksum={checksum!r} is not of the form '<algorithm>:<hex digest>' with an algorithm hashlib knows; "
            "pass e.g. checksum='sha256:' + hashlib.sha256(data).hexdigest()."
        )
    return algorithm, digest.lower()


def checksum_mismatch(
    data: bytes | bytearray | memoryview,
    checksum: str,
    url: str,
    *,
    expected_size: int | None = None,
    fetches: int = 1,
    detail: str | None = None,
) -> ChecksumMismatchError | None:
    """The error for ``data`` read from ``url`` if it does not match ``checksum``, else ``None``.

    Args:
        data: The bytes fetched.
        checksum: ``"<algorithm>:<hex digest>"`` they should have, as the manifest records it.
        url: Where they were read from (named in the message, credentials redacted).
        expected_size: The size the manifest records, named in the message when ``data`` has another.
        fetches: How many fetches in a row gave a mismatch, named in the message.
        detail: What else is known about the mismatch (e.g. which block of a shard differs), added to the message.

    Returns:
        A :class:`~lightning_patterns.exceptions.ChecksumMismatchError` naming the URL, both checksums and what
        to do, or ``None`` when the bytes match.
    """
    algorithm, digest = parse_checksum(checksum)
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual == digest:
        return None
    size = f"{len(data)} bytes" + (
        f", the manifest records {expected_size}" if expected_size is not None and expected_size != len(data) else ""
    )
    repeated = f" on {fetches} fetches in a row" if fetches > 1 else ""
    more = f"; {detail}" if detail else ""
    return ChecksumMismatchError(
        f"Checksum mismatch for {redact_url(url)}: expected {algorithm}:{digest} got {algorithm}:{actual} ({size})"
        f"{repeated}{more}. The remote object is corrupt or the manifest is stale: write the shard again, or "
        "regenerate the manifest from the data you trust."
    )
