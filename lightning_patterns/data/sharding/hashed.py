"""``"hash"``: a stable hash of a key field (or of the sample index) picks one of ``num_shards`` buckets.

The hash is BLAKE2b with an 8-byte digest, read as a little-endian unsigned int, over this canonical
encoding of the key, so the same key lands in the same bucket on every machine, Python version and run
(Python's own ``hash()`` is salted per process and never used):

- ``str``: its UTF-8 bytes;
- ``bytes``, ``bytearray``, ``memoryview``: the bytes as they are;
- ``int``, ``bool``, numpy integer/bool scalars, 0-d integer/bool arrays and tensors: the decimal string of
  the integer (``True`` is ``"1"``), as ASCII;
- ``float``, numpy floating scalars, 0-d floating arrays and tensors: ``repr(float(x))`` as ASCII
  (``float32`` values are widened first, so ``np.float32(0.1)`` is ``"0.10000000149011612"``).

Note that ``"7"`` and ``7`` encode alike and so share a bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from lightning_patterns._lazy import instance_of_loaded
from lightning_patterns.data.sharding.base import DEFAULT_SHARD_BYTES, Sharder

__all__ = ["HASH_NAME", "HashSharder", "bucket_of", "stable_hash"]

HASH_NAME = "blake2b-64"


def _canonical_bytes(key: Any) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, (bool, int, np.integer, np.bool_)):
        return str(int(key)).encode("ascii")
    if isinstance(key, (float, np.floating)):
        return repr(float(key)).encode("ascii")
    if (isinstance(key, np.ndarray) or instance_of_loaded(key, "torch", "Tensor")) and key.ndim == 0:
        # .item() gives the Python bool/int/float (or complex, refused below) of the same value.
        item = key.item()
        if isinstance(item, (bool, int, float)):
            return _canonical_bytes(item)
    raise TypeError(
        f"Cannot hash a key of type {type(key).__name__}"
        f"{f' with shape {tuple(key.shape)}' if hasattr(key, 'shape') else ''}. Expected str, bytes, int, bool, "
        f"float, or a numpy/torch scalar (0-d) of an integer, bool or floating dtype; use such a field as `hash_key`."
    )


def stable_hash(key: Any) -> int:
    """A 64-bit hash of ``key`` that is the same on every machine, Python version and run.

    See the module docstring for the canonical encoding.

    Examples:
        >>> stable_hash("a") == stable_hash(b"a")
        True
        >>> import torch
        >>> stable_hash(3) == stable_hash(np.int16(3)) == stable_hash(torch.tensor(3))
        True
    """
    return int.from_bytes(hashlib.blake2b(_canonical_bytes(key), digest_size=8).digest(), "little")


def bucket_of(key: Any, num_shards: int) -> int:
    """The bucket in ``range(num_shards)`` that ``key`` belongs to: ``stable_hash(key) % num_shards``."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"`num_shards` must be a positive int; got num_shards={num_shards!r}.")
    return stable_hash(key) % num_shards


class HashSharder(Sharder):
    """Buckets samples by :func:`stable_hash` of ``sample[key]``, or of the sample index when ``key`` is None.

    Each bucket is cut into shard files of about ``shard_bytes``, so a bucket may span several files.

    Args:
        num_shards: number of buckets.
        key: field whose value is hashed; ``None`` hashes the sample's index in the dataset.
        shard_bytes: target size of one shard file in bytes.
    """

    name: ClassVar[str] = "hash"

    def __init__(self, num_shards: int, key: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        super().__init__(shard_bytes)
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(
                f"sharding='hash' needs `num_shards` >= 1 buckets; got num_shards={num_shards!r}. "
                f"Pass for example num_shards=16."
            )
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"`hash_key` must be a field name (non-empty str) or None; got hash_key={key!r}.")
        self.num_shards = num_shards
        self.key = key

    @property
    def num_buckets(self) -> int:
        """``num_shards``."""
        return self.num_shards

    def bucket(self, sample: Mapping[str, Any], index: int) -> int:
        """``stable_hash(sample[key]) % num_shards`` (or of ``index`` without a key)."""
        if self.key is None:
            return stable_hash(index) % self.num_shards
        try:
            value = sample[self.key]
        except KeyError:
            raise ValueError(
                f"hash_key={self.key!r} is not a field of sample {index} (fields: {sorted(sample)}). "
                f"Pass one of those as `hash_key`, or hash_key=None to hash by sample index."
            ) from None
        return stable_hash(value) % self.num_shards

    def check_schema(self, fields: list[str]) -> None:
        """The key field must exist."""
        if self.key is not None and self.key not in fields:
            raise ValueError(
                f"hash_key={self.key!r} is not a field of the samples (fields: {fields}). "
                f"Pass one of those as `hash_key`, or hash_key=None to hash by sample index."
            )

    def to_json(self) -> dict[str, Any]:
        """``{"rule": "hash", "num_shards": S, "key": field or None, "hash": "blake2b-64"}``."""
        return {"rule": self.name, "num_shards": self.num_shards, "key": self.key, "hash": HASH_NAME}

    @classmethod
    def from_arguments(cls, *, shard_bytes: int | None, num_shards: int | None, hash_key: str | None) -> HashSharder:
        """Build from writer arguments; ``num_shards`` is required."""
        if num_shards is None:
            raise ValueError(
                "sharding='hash' needs `num_shards` (the number of buckets); pass for example num_shards=16."
            )
        return cls(num_shards, hash_key, DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, shard_bytes: int | None = None) -> HashSharder:
        """Rebuild from the manifest entry; the target shard size is a write-time choice."""
        if data.get("hash", HASH_NAME) != HASH_NAME:
            raise ValueError(
                f"The dataset was hashed with {data.get('hash')!r}, but this version only knows {HASH_NAME!r}; "
                f"upgrade lightning_patterns to append to it."
            )
        num_shards, key = data.get("num_shards"), data.get("key")
        if not isinstance(num_shards, int) or not (key is None or isinstance(key, str)):
            raise ValueError(f"The manifest's hash sharding entry {dict(data)!r} is malformed.")
        return cls(num_shards, key, DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes)
