"""Option groups of :class:`~lightning_patterns.data.streaming.StreamingDataset`: small frozen values, checked early.

Each group is one constructor argument of the dataset and of
:class:`~lightning_patterns.data.datamodule.ShardedStreamingDataModule`, so a recipe sets it as a nested block
(LightningCLI reads dataclass-typed arguments as nested YAML):

.. code-block:: yaml

    read_ahead:
      shards: 4
      threads: 8
    class_balance:
      min_per_class: 2
      label_field: label

The other groups are :class:`~lightning_patterns.data.streaming.RetryPolicy` (transient remote faults) and
:class:`~lightning_patterns.data.caching.CacheConfig` (the epoch cache).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClassBalance", "ReadAhead"]


@dataclass(frozen=True)
class ReadAhead:
    """How far ahead shards are fetched, by how many threads, and how long one may take.

    The budget is in bytes: shards are fetched ahead of the one in use while the bytes they take (a worker's
    part of a shard it shares with another worker counts as that part) stay within ``max_bytes``, and one shard
    ahead is always allowed, so a shard larger than the budget never stalls the stream. The threads fetch
    range requests most urgent first: every one of them works on the shard needed next until all of its
    requests are under way, so the link is filled in the order the shards are used.

    Args:
        shards: also fetch at most this many shards ahead of the one in use, ``>= 0`` (``0``: only the shard
            in use); ``None``: only ``max_bytes`` bounds it.
        max_bytes: bytes to fetch ahead at most, ``>= 1``; ``None``: only ``shards`` bounds it. The default, 32 MiB,
            is one shard of the writer's default size: enough to keep the link busy whenever batches are used
            faster than they arrive (each shard's requests go to the link before the next shard's).
        threads: background threads that send range requests (per DataLoader worker), ``>= 1``.
        timeout: seconds one read may take, retries included, before failing; ``> 0``: the manifest, each shard (its
            download is cancelled then, so no thread outlives it), and the wait for a shard in use.

    Raises:
        ValueError: a value out of range, or neither bound given; the message names it and says what is expected.

    Example:
        >>> ReadAhead(max_bytes=128 * 2**20, threads=8)
        ReadAhead(shards=None, max_bytes=134217728, threads=8, timeout=600.0)
    """

    shards: int | None = None
    max_bytes: int | None = 32 * 2**20
    threads: int = 4
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.shards is not None:
            _check_int("ReadAhead", "shards", self.shards, 0, "use 0 to fetch only the shard in use")
        if self.max_bytes is not None:
            _check_int("ReadAhead", "max_bytes", self.max_bytes, 1, "use None to bound by `shards` alone")
        if self.shards is None and self.max_bytes is None:
            raise ValueError(
                "ReadAhead(shards=None, max_bytes=None) would fetch the whole dataset ahead; bound it in bytes (e.g. "
                "max_bytes=64 * 2**20) or in shards (e.g. shards=2)."
            )
        _check_int("ReadAhead", "threads", self.threads, 1, "e.g. threads=4")
        if not self.timeout > 0:
            raise ValueError(
                f"ReadAhead(timeout={self.timeout!r}) must be > 0 seconds; raise it for very large shards on a slow "
                "link, e.g. timeout=1800."
            )


@dataclass(frozen=True)
class ClassBalance:
    """Class-balanced batches: every batch holds at least ``min_per_class`` samples of each class.

    Each sample is still yielded once per epoch; a batch may fall short only in a documented tail (a class
    running out near the end of a worker's samples, see :class:`~lightning_patterns.data.batching.ClassBalancer`).
    The dataset needs ``batch_size`` set.

    Args:
        min_per_class: samples of each class per batch, ``>= 1``.
        label_field: the field holding integer class labels ``0 .. num_classes - 1``.
        num_classes: number of classes, ``>= 1`` (default: read from the label column of every shard).
        lookahead: samples beyond a batch that balancing may draw from, ``>= 0``.

    Raises:
        ValueError: a value out of range; the message names it and says what is expected.

    Example:
        >>> ClassBalance(2, num_classes=10)
        ClassBalance(min_per_class=2, label_field='label', num_classes=10, lookahead=4096)
    """

    min_per_class: int
    label_field: str = "label"
    num_classes: int | None = None
    lookahead: int = 4096

    def __post_init__(self) -> None:
        _check_int("ClassBalance", "min_per_class", self.min_per_class, 1, "e.g. min_per_class=1")
        if not isinstance(self.label_field, str) or not self.label_field:
            raise ValueError(
                f"ClassBalance(label_field={self.label_field!r}) must name the field holding the class labels, "
                "e.g. label_field='label'."
            )
        if self.num_classes is not None:
            _check_int("ClassBalance", "num_classes", self.num_classes, 1, "use None to count them from the labels")
        _check_int("ClassBalance", "lookahead", self.lookahead, 0, "e.g. lookahead=4096")


def _check_int(owner: str, name: str, value: object, least: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{owner}({name}={value!r}) must be an integer >= {least}; {hint}.")
