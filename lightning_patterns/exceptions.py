"""Errors raised by lightning_patterns.

Each derives from the builtin a caller would already catch (``ValueError`` for bad input,
``FileNotFoundError`` for missing remote files, ``OSError`` for I/O that failed), so code written
against plain Python keeps working.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatchError",
    "ClassCoverageError",
    "DeadlineExceededError",
    "DestinationNotEmptyError",
    "ManifestError",
    "ObjectTooLargeError",
    "PeerFailedError",
    "PeerLostError",
    "RemoteUnreachableError",
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


class RemoteUnreachableError(ConnectionRefusedError):
    """Nothing listens at the remote's host and port: the connection was refused, also when asked again."""


class PeerLostError(RuntimeError):
    """A process of a distributed job stopped answering within the configured timeout."""


class DeadlineExceededError(TimeoutError):
    """A read did not finish by its deadline, or whoever waited for it stopped waiting (never retried)."""


class ObjectTooLargeError(ValueError):
    """A remote object is larger than the reader was told to accept (a manifest over its byte cap)."""


class DestinationNotEmptyError(FileExistsError):
    """A dataset would be written into a folder that holds other files but no manifest (pass ``force=True``)."""


class PeerFailedError(PeerLostError):
    """A process of a distributed job failed: the message names its rank and, where known, its error."""


class ClassCoverageError(ValueError):
    """Class-balanced batches cannot be planned: some rank or worker would get too few samples of some classes."""
