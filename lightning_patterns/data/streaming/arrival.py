"""A shard read while it arrives: its pieces land in the order batches need them, each verified on landing.

A shard with a block table (see :mod:`~lightning_patterns.data.shards.blocks`) need not be complete to be
read: once its head is verified, every block can be verified alone. :func:`progressive_pieces` cuts the body
into range requests in the order the rows are read (the first rows of every field first), and a
:class:`ShardArrival` records which blocks have landed and been verified, so a
:class:`~lightning_patterns.data.shards.ShardReader` opened on the buffer waits (through its ``ready`` hook)
only for the blocks of the rows it decodes. The first batch of a shard then waits for its own rows, not for
the whole shard: about a shard's transfer time less.

A shard read this way can still be kept by an epoch cache: :attr:`ShardArrival.complete` resolves, once no
request writes to the buffer any more, to the buffer itself when every block landed and verified (the head
is verified before the arrival begins, so the whole file is), or to the error that stopped it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from lightning_patterns.data.remote import Deadline
from lightning_patterns.data.remote.checksum import checksum_mismatch
from lightning_patterns.data.shards.blocks import BlockTable
from lightning_patterns.data.shards.manifest import ShardInfo
from lightning_patterns.data.shards.reader import ShardHeader
from lightning_patterns.exceptions import ChecksumMismatchError

__all__ = ["ShardArrival", "progressive_pieces"]


def progressive_pieces(header: ShardHeader, table: BlockTable, landed: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """The range requests that bring the body after byte ``landed``, whole blocks each, in the order rows need them.

    Variable-length fields come first (a reader checks them whole when it opens); then pieces of every
    fixed-size column by the position of their first row in it, so the first rows of every field arrive
    before the later rows of any. Each block is in one piece; a piece has at most ``chunk_bytes``.
    """
    landed_blocks = set(table.blocks_of(table.start, landed))
    n = header.num_samples
    regions: list[tuple[int, int, bool]] = []  # (start, stop, needed when the reader opens)
    for extent in header.columns.values():
        if extent.index_offset is not None:
            regions.append((extent.index_offset, extent.index_offset + 8 * (n + 1), True))
            regions.append((extent.offset, extent.offset + extent.nbytes, True))
        else:
            regions.append((extent.offset, extent.offset + extent.nbytes, False))

    def need(region: tuple[int, int, bool], at: int) -> float:
        """How urgently the region needs byte ``at``: -1 at open, else the byte's position in it (0 to 1)."""
        start, stop, at_open = region
        return -1.0 if at_open else max(0, at - start) / max(stop - start, 1)

    # A block two columns share (the end of one, the start of the next) comes with the column that needs it first:
    # the first rows of a column must not wait for the last piece of the column before it.
    owner: dict[int, tuple[float, int]] = {}
    for index, region in enumerate(regions):
        for block in table.blocks_of(region[0], region[1]):
            if block not in landed_blocks:
                owner[block] = min(owner.get(block, (2.0, index)), (need(region, table.bounds(block)[0]), index))
    ranked: list[tuple[float, int, int]] = []
    for index, region in enumerate(regions):
        blocks = [block for block in table.blocks_of(region[0], region[1]) if owner.get(block, (0.0, -1))[1] == index]
        for first, last in _pieces(blocks, table, chunk_bytes):
            ranked.append((need(region, first), first, last))
    # Blocks no field covers (padding) come last: no read needs them, but a cache keeps the whole file.
    rest = [block for block in range(table.count) if block not in owner and block not in landed_blocks]
    ranked.extend((2.0, first, last) for first, last in _pieces(rest, table, chunk_bytes))
    return [(first, last) for _, first, last in sorted(ranked)]


def _pieces(blocks: list[int], table: BlockTable, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of runs of consecutive ``blocks``, cut to at most ``chunk_bytes`` (at least one block)."""
    pieces: list[tuple[int, int]] = []
    for block in blocks:
        start, stop = table.bounds(block)
        if pieces and pieces[-1][1] == start and stop - pieces[-1][0] <= chunk_bytes:
            pieces[-1] = (pieces[-1][0], stop)
        else:
            pieces.append((start, stop))
    return pieces


class ShardArrival:
    """Which blocks of a shard's buffer have landed and been verified; readers wait for the ones they need.

    Args:
        info: the shard's manifest entry.
        url: its URL, named in errors.
        buffer: the memory the shard arrives in.
        table: its block table's layout.
        digests: its block table.
        pieces: how many pieces are still to land.
        deadline: how long a reader may wait (the load's deadline).
        on_wait: told the seconds each wait took (time spent waiting for data); set it once the reader is open,
            so that only the consumer's waits are counted (the waits of opening are the load's).
        complete: resolved once the last piece is done (see :attr:`complete`); a new future if ``None``.

    Attributes:
        complete: resolves, after the last piece landed or failed (no request writes to ``buffer`` any more),
            to ``buffer`` if every block landed and was verified, else to the error that stopped the arrival.
    """

    def __init__(
        self,
        info: ShardInfo,
        url: str,
        buffer: memoryview,
        table: BlockTable,
        digests: memoryview,
        *,
        pieces: int,
        deadline: Deadline,
        on_wait: Callable[[float], None] | None = None,
        complete: Future[memoryview] | None = None,
    ) -> None:
        self.info = info
        self.url = url
        self.buffer = buffer
        self.table = table
        self.digests = digests
        self._verified = bytearray(table.count)
        self._pending = pieces
        self._failed: list[tuple[int, str, str]] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._deadline = deadline
        self.on_wait = on_wait
        self.complete: Future[memoryview] = Future() if complete is None else complete

    def mark(self, start: int, stop: int) -> None:
        """Blocks ``[start, stop)`` (whole ones) landed and were verified, or the check was not asked for."""
        with self._cond:
            for block in self.table.blocks_of(start, stop):
                self._verified[block] = 1
            self._cond.notify_all()

    def mismatch(self, block: int, expected: str, actual: str) -> None:
        """``block`` did not match the table even when fetched again: an error once every piece has landed."""
        with self._cond:
            self._failed.append((block, expected, actual))

    def piece_done(self) -> None:
        """One more piece landed (verified or not); after the last, mismatches become the error readers see."""
        with self._cond:
            self._pending -= 1
            if self._pending > 0:
                return
            if self._failed and self._error is None:
                block, expected, actual = min(self._failed)
                detail = self.table.describe_mismatch(block, expected, actual)
                info = self.info
                self._error = checksum_mismatch(
                    self.buffer, info.checksum, self.url, expected_size=info.num_bytes, fetches=2, detail=detail
                ) or ChecksumMismatchError(f"Shard {self.url!r}: {detail}.")
            self._cond.notify_all()
            error = self._error
            whole = all(self._verified)
        # Outside the lock: the callbacks (a cache keeping the shard) may take time.
        if error is None and not whole:
            error = RuntimeError(f"Shard {self.url!r}: its last request finished with blocks missing.")
        if error is not None:
            self.complete.set_exception(error)
        else:
            self.complete.set_result(self.buffer)

    def abandon(self, pieces: int, error: BaseException) -> None:
        """``pieces`` pieces will never be requested (opening failed with ``error``): count them done."""
        self.fail(error)
        for _ in range(pieces):
            self.piece_done()

    def fail(self, error: BaseException) -> None:
        """The shard will not arrive whole: readers waiting, and those to come, raise ``error``."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def ready(self, start: int, stop: int) -> None:
        """Return once bytes ``[start, stop)`` of the body are verified; raise why they never will be."""
        blocks = self.table.blocks_of(max(start, self.table.start), stop)
        verified = self._verified
        if all(verified[block] for block in blocks):
            return
        started = time.perf_counter()
        try:
            with self._cond:
                while not all(verified[block] for block in blocks):
                    if self._error is not None:
                        raise self._error
                    if self._deadline.expired():
                        raise self._deadline.error(self.url)
                    remaining = self._deadline.remaining()
                    self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
        finally:
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - started)

    def track(self, future: Any) -> None:
        """Fail the arrival if ``future`` (a piece's request) is cancelled before it runs (the pool shut down)."""

        def check(done: Any) -> None:
            if done.cancelled():  # it never ran, so it never counts itself done
                self.fail(self._deadline.error(self.url))
                self.piece_done()

        future.add_done_callback(check)
