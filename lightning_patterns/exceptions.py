"""Errors raised by lightning_patterns.

Each derives from the builtin a caller would already catch (``ValueError`` for bad input,
``FileNotFoundError`` for missing remote files, ``OSError`` for I/O that failed), so code written
against plain Python keeps working.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatchError",
    "ManifestError",
    "PeerFailedError",
    "PeerLostError",
    "SchemaMismatchError",
    "ShardNotFoundError",
    "UnsafePathError",
]


class ManifestError(ValueError):
    """A dataset manifest is missing, unreadable, or of a format version we cannot read."""


class SchemaMismatchError(ValueError):
    """Samples do not match the schema of the dataset they are written to."""


class UnsafePathError(ValueError):
    """A path from a manifest would escape the dataset root (``..``, an absolute path, another URL)."""


class ShardNotFoundError(FileNotFoundError):
    """A shard listed in the manifest does not exist at its URL."""


class ChecksumMismatchError(OSError):
    """A shard's bytes do not match the checksum its manifest records, even after fetching it again."""


class PeerLostError(RuntimeError):
    """A process of a distributed job stopped answering within the configured timeout."""


class PeerFailedError(PeerLostError):
    """A process of a distributed job failed: the message names its rank and, where known, its error."""
