"""Where one DataLoader worker sits in a job: rank ``rank`` of ``world_size``, worker ``worker_id`` of ``num_workers``.

The plan (:mod:`lightning_patterns.data.sharding.assignment`) is a pure function of a :class:`Topology`, so
this is also where a rank, a world size or a worker index is checked, once, for everything that takes one.
Finding out the values at run time (the Trainer, ``torch.distributed``, ``RANK`` / ``WORLD_SIZE``) is the
streaming layer's job (:mod:`lightning_patterns.data.streaming.topology`).

Example:
    >>> Topology(world_size=4, rank=1, num_workers=2, worker_id=1)
    Topology(world_size=4, rank=1, num_workers=2, worker_id=1)
    >>> Topology(world_size=2, rank=2)
    Traceback (most recent call last):
    ...
    ValueError: Expected 0 <= rank < world_size, got rank=2 with world_size=2; pass the process's global rank.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topology", "check_rank"]


@dataclass(frozen=True)
class Topology:
    """One DataLoader worker of one rank.

    Args:
        world_size: Number of ranks, ``>= 1``.
        rank: This process's global rank, ``0 <= rank < world_size``.
        num_workers: The DataLoader's ``num_workers``, ``>= 0``; ``0`` means the main process alone.
        worker_id: This DataLoader worker, ``0 <= worker_id < max(num_workers, 1)`` (``0`` in the main process).

    Raises:
        ValueError: If any value is out of range; the message names it.
    """

    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    worker_id: int = 0

    def __post_init__(self) -> None:
        check_rank(self.rank, self.world_size)
        if self.num_workers < 0:
            raise ValueError(
                f"Expected num_workers >= 0, got num_workers={self.num_workers!r}; use 0 for the main process."
            )
        if not 0 <= self.worker_id < max(self.num_workers, 1):
            raise ValueError(
                f"Expected 0 <= worker_id < max(num_workers, 1), got worker_id={self.worker_id!r} with "
                f"num_workers={self.num_workers!r}; pass `torch.utils.data.get_worker_info().id` (0 in the main "
                "process)."
            )


def check_rank(rank: int, world_size: int, source: str = "") -> None:
    """Raise ``ValueError`` unless ``world_size >= 1`` and ``0 <= rank < world_size``.

    Args:
        rank: A global rank.
        world_size: The number of ranks.
        source: Where the values came from (``"the RANK and WORLD_SIZE environment variables"``), for the message.
    """
    where = f" (from {source})" if source else ""
    if world_size < 1:
        raise ValueError(
            f"Expected world_size >= 1, got world_size={world_size!r}{where}; pass the number of processes."
        )
    if not 0 <= rank < world_size:
        raise ValueError(
            f"Expected 0 <= rank < world_size, got rank={rank!r} with world_size={world_size!r}{where}; "
            "pass the process's global rank."
        )
