"""Fetching shards as parallel range requests that fill the link in order: the shard needed first goes first.

A :class:`PriorityPool` runs range requests on a few threads, always taking the most urgent one queued. A
:class:`ShardFetcher` cuts each shard into chunks and queues them with the shard's place in the worker's
schedule as their priority, so every thread works on the first shard the consumer needs until all of its
chunks are under way, and only then on the next (sequential priority, then look-ahead). The link is never
split between the shard in use and the ones after it, so the first batch arrives after about one shard's
transfer time, and the link stays busy after that.

Every chunk is written straight into the memory the shard is read from (a cache's shared region, or an
anonymous map that is given back to the system when the shard is dropped), and verified as it arrives:
against the block table for shards that have one (see :mod:`~lightning_patterns.data.shards.blocks`), or,
for older shards, against the manifest's whole-file checksum once all chunks are in.
"""

from __future__ import annotations

import concurrent.futures
import functools
import heapq
import itertools
import logging
import mmap
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from lightning_patterns.data.remote import Deadline, RemoteReader
from lightning_patterns.data.remote.checksum import checksum_mismatch
from lightning_patterns.data.shards.blocks import BlockTable
from lightning_patterns.data.shards.manifest import Manifest, ShardInfo, missing_shard_error, shard_url
from lightning_patterns.data.shards.partial import ShardHead, fetch_head, fetch_rows
from lightning_patterns.data.shards.reader import ShardFormatError, ShardHeader, ShardReader, parse_header
from lightning_patterns.data.streaming.arrival import ShardArrival, progressive_pieces
from lightning_patterns.exceptions import ChecksumMismatchError

__all__ = ["PriorityPool", "ShardFetcher"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Priority = tuple[int, ...]
# Bytes of the body asked for with the head: the first rows of the first field, so the first batch waits little.
_FIRST_BODY_BYTES = 2**20


class PriorityPool:
    """A few threads that run queued calls most urgent first (the smallest priority tuple; ties in order).

    Threads start on the first call and stop at :meth:`shutdown`; calls queued then never run (their futures
    are cancelled).

    Args:
        threads: how many calls run at once, ``>= 1``.
        name: prefix of the threads' names.
    """

    def __init__(self, threads: int, name: str = "lightning-patterns-read-fetch") -> None:
        self._threads = threads
        self._name = name
        self._queue: list[tuple[Priority, int, Future[Any], Callable[[], Any]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._closed = False

    @property
    def pending(self) -> int:
        """Calls queued and not started yet."""
        with self._cond:
            return len(self._queue)

    def submit(self, priority: Priority, fn: Callable[[], _T]) -> Future[_T]:
        """Queue ``fn``; it runs before every queued call of a larger ``priority``."""
        future: Future[_T] = Future()
        with self._cond:
            if self._closed:
                _cancel(future)
                return future
            heapq.heappush(self._queue, (priority, next(self._order), future, fn))
            if len(self._workers) < self._threads:
                worker = threading.Thread(target=self._work, name=f"{self._name}-{len(self._workers)}", daemon=True)
                self._workers.append(worker)
                worker.start()
            else:
                self._cond.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, _, future, fn = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Cancel every queued call and let the threads end once their current call returns."""
        with self._cond:
            self._closed = True
            queued, self._queue = self._queue, []
            self._cond.notify_all()
        for _, _, future, _ in queued:
            _cancel(future)


def _cancel(future: Future[Any]) -> None:
    """Cancel a future that never ran, waking ``concurrent.futures.wait`` on it.

    ``Future.cancel()`` alone leaves the future in ``CANCELLED``, which ``wait()`` does not count as done: a loader
    waiting on it would wait forever (a process that cannot exit). Notifying the cancellation, as an executor does
    when it skips a cancelled call, moves it to ``CANCELLED_AND_NOTIFIED``.
    """
    if future.cancel():
        future.set_running_or_notify_cancel()


def anonymous_buffer(size: int) -> memoryview:
    """``size`` writable bytes from an anonymous map, given back to the system when the last view is dropped.

    Untouched pages take no memory; a ``bytearray`` this large may instead stay in the allocator's heap.
    """
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


class ShardFetcher:
    """Fetches the shards of one dataset in prioritised chunks through a :class:`PriorityPool`.

    Args:
        reader: reads the dataset (its ``url`` is the dataset root).
        manifest: the dataset's manifest.
        pool: runs the range requests.
        chunk_bytes: bytes per range request (rounded to whole blocks for shards with a block table).
        verify: check every byte against the manifest (block by block where the shard allows it).
    """

    def __init__(
        self, reader: RemoteReader, manifest: Manifest, pool: PriorityPool, *, chunk_bytes: int, verify: bool
    ) -> None:
        self.reader = reader
        self.manifest = manifest
        self.pool = pool
        self.chunk_bytes = chunk_bytes
        self.verify = verify

    def url_of(self, shard: int) -> str:
        """The URL of shard ``shard``."""
        return shard_url(self.reader.url, self.manifest.shards[shard].path)

    def _wait(self, futures: Sequence[Future[Any]], deadline: Deadline, url: str) -> None:
        """Wait for every future (raising the first error), or cancel them all at the deadline."""
        pending = set(futures)
        try:
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=deadline.remaining(), return_when=concurrent.futures.FIRST_EXCEPTION
                )
                for future in done:
                    if future.cancelled():
                        raise deadline.error(url)
                    error = future.exception()
                    if error is not None:
                        raise error
                if pending and deadline.expired():
                    raise deadline.error(url)
        finally:
            for future in pending:
                future.cancel()

    def _read_into(self, url: str, buffer: memoryview, deadline: Deadline, piece: tuple[int, int]) -> None:
        start, stop = piece
        self.reader.read_range_into(url, start, buffer[start:stop], deadline=deadline)

    def fetch_whole(self, shard: int, into: memoryview | None, priority: int, deadline: Deadline) -> memoryview:
        """All bytes of ``shard``, fetched into ``into`` (or a new anonymous buffer) and verified.

        Args:
            shard: index into the manifest's shards.
            into: writable memory of the shard's size to receive it (a cache's region), or ``None``.
            priority: the shard's place in the schedule: lower goes first.
            deadline: when to give up (cancelling the requests queued and in flight).

        Returns:
            The buffer, read-only (``into`` itself when given).

        Raises:
            ShardNotFoundError: the shard file does not exist.
            ChecksumMismatchError: a block (or, without a block table, the file) differs from the manifest on two
                fetches in a row.
            DeadlineExceededError: the deadline passed or was cancelled.
        """
        info = self.manifest.shards[shard]
        url = self.url_of(shard)
        buffer = anonymous_buffer(info.num_bytes) if into is None else into
        if len(buffer) != info.num_bytes:
            raise ValueError(f"into has {len(buffer)} bytes; shard {url!r} has {info.num_bytes}.")
        try:
            if info.has_blocks and self.verify:
                self._fetch_blocks(info, url, buffer, priority, deadline)
            else:
                self._fetch_plain(info, url, buffer, priority, deadline)
        except FileNotFoundError as err:
            raise missing_shard_error(self.reader, info) from err
        return buffer if into is not None else buffer.toreadonly()

    def _chunks(self, start: int, stop: int, step: int) -> list[tuple[int, int]]:
        return [(at, min(at + step, stop)) for at in range(start, stop, step)]

    def _fetch_plain(self, info: ShardInfo, url: str, buffer: memoryview, priority: int, deadline: Deadline) -> None:
        """A shard without a block table: chunks in parallel, then the whole-file checksum (fetched again once)."""
        for attempt in (1, 2):
            chunks = self._chunks(0, info.num_bytes, self.chunk_bytes)
            read = functools.partial(self._read_into, url, buffer, deadline)
            futures = [
                self.pool.submit((priority, k), functools.partial(read, chunk)) for k, chunk in enumerate(chunks)
            ]
            self._wait(futures, deadline, url)
            if not self.verify:
                return
            error = checksum_mismatch(buffer, info.checksum, url, expected_size=info.num_bytes, fetches=attempt)
            if error is None:
                return
            if attempt == 2:
                raise error
            log.warning("Checksum mismatch for %s; fetching it once more", url)
            self.reader.stats.record(retries=1)

    def _fetch_blocks(self, info: ShardInfo, url: str, buffer: memoryview, priority: int, deadline: Deadline) -> None:
        """A shard with a block table: chunks on block boundaries, each verified as it arrives.

        A head that differs from the manifest is fetched once more (with the whole shard) before it is an error.
        """
        for attempt in (1, 2):
            try:
                self._fetch_blocks_once(info, url, buffer, priority, deadline)
                return
            except _HeadMismatchError:
                if attempt == 2:
                    raise
                log.warning("The head of %s does not match the manifest; fetching the shard once more", url)
                self.reader.stats.record(retries=1)

    def _fetch_blocks_once(
        self, info: ShardInfo, url: str, buffer: memoryview, priority: int, deadline: Deadline
    ) -> None:
        assert info.head_bytes is not None
        # Chunk 0 carries the head, which every other chunk needs to be verified; it is fetched first. Chunks
        # are cut at the body's start plus multiples of the chunk size, so with a block size that divides it
        # (any power of two up to it) every chunk holds whole blocks and is verified on arrival; blocks cut by
        # a chunk edge are verified once all chunks are in.
        head_chunk = min(info.num_bytes, info.head_bytes + self.chunk_bytes)
        state = _BlockState(info, url, buffer)
        chunks = [(0, head_chunk), *self._chunks(head_chunk, info.num_bytes, self.chunk_bytes)]

        def run(chunk: tuple[int, int]) -> None:
            start, stop = chunk
            self.reader.read_range_into(url, start, buffer[start:stop], deadline=deadline)
            state.arrived(start, stop, is_head=start == 0)

        futures = [self.pool.submit((priority, k), functools.partial(run, chunk)) for k, chunk in enumerate(chunks)]
        self._wait(futures, deadline, url)
        state.finish()
        # A mismatch is fetched once more (those blocks only) before it is an error.
        for start, stop in state.failed:
            self.reader.stats.record(retries=1)
            log.warning("Block checksum mismatch for %s bytes [%s, %s); fetching them once more", url, start, stop)
            self.reader.read_range_into(url, start, buffer[start:stop], deadline=deadline)
            assert state.table is not None
            assert state.digests is not None
            found = state.table.mismatch(buffer[start:stop], start, state.digests)
            if found is not None:
                # Named as a whole-shard mismatch (both checksums of the file), with the block that differs.
                detail = state.table.describe_mismatch(*found)
                error = checksum_mismatch(
                    buffer, info.checksum, url, expected_size=info.num_bytes, fetches=2, detail=detail
                )
                raise error or ChecksumMismatchError(f"Shard {url!r}: {detail}.")

    def open_arriving(
        self,
        shard: int,
        priority: int,
        deadline: Deadline,
        on_wait: Callable[[float], None],
        into: memoryview | None = None,
        complete: Future[memoryview] | None = None,
    ) -> ShardReader:
        """Open ``shard`` as soon as its head (and first rows) landed; the rest arrives while it is read.

        The head comes in one request with the first bytes of the body, and is verified against the manifest
        (fetched once more on a mismatch); the rest is queued at once, in the order rows need it
        (:func:`~lightning_patterns.data.streaming.arrival.progressive_pieces`), each piece verified block by
        block as it lands. Reads of the returned reader wait for the blocks they need; a block that still
        differs after a second fetch fails them, naming the shard's checksums and the block.

        Args:
            shard: a shard with a block table (``has_blocks``).
            priority: the shard's place in the schedule: lower goes first.
            deadline: when to give up, for the requests and for readers waiting on them.
            on_wait: told the seconds each read waited for data.
            into: writable memory of the shard's size to receive it (a cache's region), or ``None``.
            complete: resolved exactly once, also when this raises, after the last request that writes to the
                buffer: to the buffer once every byte of it is verified, else to the error (see
                :attr:`~lightning_patterns.data.streaming.arrival.ShardArrival.complete`). A cache keeps the
                shard from there.

        Returns:
            The reader, over a read-only view of the arriving buffer.

        Raises:
            ShardNotFoundError: the shard file does not exist.
            ChecksumMismatchError: the head differs from the manifest on two fetches in a row.
            ShardFormatError: the header fails a check, or disagrees with the manifest.
            DeadlineExceededError: the deadline passed or was cancelled.
        """
        info = self.manifest.shards[shard]
        assert info.head_bytes is not None
        url = self.url_of(shard)
        buffer = anonymous_buffer(info.num_bytes) if into is None else into
        if len(buffer) != info.num_bytes:
            raise ValueError(f"into has {len(buffer)} bytes; shard {url!r} has {info.num_bytes}.")
        complete = Future() if complete is None else complete
        try:
            header = self._arriving_head(info, url, buffer, priority, deadline)
            table = header.blocks
            assert table is not None
            digests = buffer[table.table_offset : table.table_stop]
            first = min(info.num_bytes, info.head_bytes + _FIRST_BODY_BYTES)
            # The whole blocks of the first request are verified now; the one it cut is fetched again with the rest.
            landed = first
            if first < info.num_bytes:
                landed = table.start + (first - table.start) // table.block_bytes * table.block_bytes
            pieces = progressive_pieces(header, table, landed, self.chunk_bytes)
            # The first request counts as a piece: when no piece follows it, its mismatch must still fail readers.
            arrival = ShardArrival(
                info, url, buffer, table, digests, pieces=len(pieces) + 1, deadline=deadline, complete=complete
            )
        except BaseException as err:
            complete.set_exception(err)  # no request writes to the buffer any more
            raise
        queued = -1  # pieces requested so far, the first request included once it is done
        try:
            try:
                if self.verify:
                    self._land(arrival, table.start, landed, deadline)
                else:
                    arrival.mark(table.start, landed)
            finally:
                queued = 0
                arrival.piece_done()
            for k, piece in enumerate(pieces, start=1):
                arrival.track(self.pool.submit((priority, k), functools.partial(self._piece, arrival, piece, deadline)))
                queued = k
            reader = ShardReader(
                buffer.toreadonly(), self.manifest.schema, url=url, num_samples=info.num_samples, ready=arrival.ready
            )
        except BaseException as err:
            arrival.abandon(len(pieces) - max(queued, 0), err)
            raise
        arrival.on_wait = on_wait  # from now on the consumer reads: its waits are time waiting for data
        return reader

    def _arriving_head(
        self, info: ShardInfo, url: str, buffer: memoryview, priority: int, deadline: Deadline
    ) -> ShardHeader:
        """Fetch the head with the first rows into ``buffer``, verify it (fetched once more on a mismatch), parse it."""
        assert info.head_bytes is not None
        first = min(info.num_bytes, info.head_bytes + _FIRST_BODY_BYTES)
        head = buffer[: info.head_bytes]
        for attempt in (1, 2):
            request = functools.partial(self._read_into, url, buffer, deadline, (0, first))
            try:
                self._wait([self.pool.submit((priority, 0), request)], deadline, url)
            except FileNotFoundError as err:
                raise missing_shard_error(self.reader, info) from err
            error = checksum_mismatch(head, str(info.head_checksum), url + " (head)")
            if error is None:
                break
            if attempt == 2:
                raise error
            log.warning("The head of %s does not match the manifest; fetching it once more", url)
            self.reader.stats.record(retries=1)
        header = parse_header(head, info.num_bytes, url=url, num_samples=info.num_samples)
        if header.blocks is None or header.head_bytes != info.head_bytes:
            raise ShardFormatError(
                f"Shard {url!r}: its header puts the body at byte {header.head_bytes}, but the manifest records "
                f"head_bytes={info.head_bytes}. The shard and the manifest disagree: rewrite the dataset."
            )
        return header

    def _piece(self, arrival: ShardArrival, piece: tuple[int, int], deadline: Deadline) -> None:
        """Fetch one piece of an arriving shard and land it (a failure is the arrival's, for its readers)."""
        start, stop = piece
        try:
            self.reader.read_range_into(arrival.url, start, arrival.buffer[start:stop], deadline=deadline)
            if self.verify:
                self._land(arrival, start, stop, deadline)
            else:
                arrival.mark(start, stop)
        except FileNotFoundError as err:
            arrival.fail(missing_shard_error(self.reader, arrival.info))
            raise err
        except BaseException as err:
            arrival.fail(err)
            raise
        finally:
            arrival.piece_done()

    def _land(self, arrival: ShardArrival, start: int, stop: int, deadline: Deadline) -> None:
        """Verify the whole blocks ``[start, stop)`` and mark them; a differing block is fetched once more."""
        table, digests, buffer, url = arrival.table, arrival.digests, arrival.buffer, arrival.url
        if stop <= start or table.mismatch(buffer[start:stop], start, digests) is None:
            arrival.mark(start, stop)
            return
        for block in table.blocks_of(start, stop):
            first, last = table.bounds(block)
            if table.mismatch(buffer[first:last], first, digests) is None:
                arrival.mark(first, last)
                continue
            self.reader.stats.record(retries=1)
            log.warning("Block checksum mismatch for %s bytes [%s, %s); fetching them once more", url, first, last)
            self.reader.read_range_into(url, first, buffer[first:last], deadline=deadline)
            found = table.mismatch(buffer[first:last], first, digests)
            if found is None:
                arrival.mark(first, last)
            else:
                arrival.mismatch(*found)

    def head(self, shard: int, deadline: Deadline | None = None) -> ShardHead:
        """The verified head of ``shard`` (one small request)."""
        info = self.manifest.shards[shard]
        url = self.url_of(shard)
        return fetch_head(
            lambda start, stop: self.reader.read_range(info.path, start, stop, deadline=deadline),
            info,
            self.manifest.schema,
            url,
            verify=self.verify,
        )

    def fetch_rows(
        self, shard: int, rows: Sequence[tuple[int, int]], priority: int, deadline: Deadline, head: ShardHead | None
    ) -> ShardReader:
        """Only rows ``rows`` of ``shard`` (whole blocks of them), through its block table; see :func:`fetch_rows`."""
        url = self.url_of(shard)

        def fetch(ranges: list[tuple[int, int]], buffer: memoryview) -> None:
            pieces = [piece for start, stop in ranges for piece in self._chunks(start, stop, self.chunk_bytes)]
            read = functools.partial(self._read_into, url, buffer, deadline)
            futures = [
                self.pool.submit((priority, k), functools.partial(read, piece)) for k, piece in enumerate(pieces)
            ]
            self._wait(futures, deadline, url)

        try:
            return fetch_rows(head or self.head(shard, deadline), rows, fetch, verify=self.verify)
        except FileNotFoundError as err:
            raise missing_shard_error(self.reader, self.manifest.shards[shard]) from err


class _HeadMismatchError(ChecksumMismatchError):
    """A shard's head differs from the manifest's ``head_checksum``."""


class _BlockState:
    """Verification of a shard arriving in chunks: blocks are checked as soon as the head (and table) is in."""

    def __init__(self, info: ShardInfo, url: str, buffer: memoryview) -> None:
        self.info = info
        self.url = url
        self.buffer = buffer
        self.table: BlockTable | None = None
        self.digests: memoryview | None = None
        self.waiting: list[tuple[int, int]] = []
        self.failed: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def arrived(self, start: int, stop: int, *, is_head: bool) -> None:
        """Bytes ``[start, stop)`` arrived: verify them now, or once the head has been verified."""
        if is_head:
            self._open_head()
            with self._lock:
                pending, self.waiting = [*self.waiting, (start, stop)], []
            for piece in pending:
                self._check_part(*piece)
            return
        with self._lock:
            if self.table is None:
                self.waiting.append((start, stop))
                return
        self._check_part(start, stop)

    def _open_head(self) -> None:
        info = self.info
        assert info.head_bytes is not None
        head = self.buffer[: info.head_bytes]
        error = checksum_mismatch(head, str(info.head_checksum), self.url + " (head)")
        if error is not None:
            raise _HeadMismatchError(str(error))
        header = parse_header(head, info.num_bytes, url=self.url, num_samples=info.num_samples)
        if header.blocks is None or header.head_bytes != info.head_bytes:
            raise ShardFormatError(
                f"Shard {self.url!r}: its header puts the body at byte {header.head_bytes}, but the manifest records "
                f"head_bytes={info.head_bytes}. The shard and the manifest disagree: rewrite the dataset."
            )
        with self._lock:
            self.table = header.blocks
            self.digests = head[header.blocks.table_offset : header.blocks.table_stop]

    def _check_part(self, start: int, stop: int) -> None:
        """Verify the whole blocks inside ``[start, stop)``; blocks cut by a chunk edge wait for :meth:`finish`."""
        table = self.table
        assert table is not None
        blocks = table.blocks_of(max(start, table.start), stop)
        whole = [b for b in blocks if start <= table.bounds(b)[0] and table.bounds(b)[1] <= stop]
        if not whole:
            with self._lock:
                self.waiting.append((start, stop))
            return
        first, last = table.bounds(whole[0])[0], table.bounds(whole[-1])[1]
        self.check(first, last, record=True)
        with self._lock:
            if start < first or last < stop:
                # Pieces of blocks shared with the neighbouring chunks: checked once every chunk is in.
                self.waiting.extend(piece for piece in ((start, first), (last, stop)) if piece[1] > piece[0])

    def check(self, start: int, stop: int, *, record: bool = False) -> None:
        """Verify the whole blocks ``[start, stop)``; a mismatch is raised, or its blocks recorded to fetch again."""
        table, digests = self.table, self.digests
        assert table is not None
        assert digests is not None
        if not record:
            table.verify(self.buffer[start:stop], start, digests, self.url)
            return
        if table.mismatch(self.buffer[start:stop], start, digests) is None:
            return  # the common case: one pass over the range
        for block in table.blocks_of(start, stop):
            first, last = table.bounds(block)
            if table.mismatch(self.buffer[first:last], first, digests) is not None:
                with self._lock:
                    self.failed.append((first, last))

    def finish(self) -> None:
        """Verify the blocks that straddled chunk edges, now that every chunk is in."""
        table = self.table
        assert table is not None
        edges = {b for start, stop in self.waiting for b in table.blocks_of(max(start, table.start), stop)}
        for block in sorted(edges):
            self.check(*table.bounds(block), record=True)
