"""``DiskEpochCache``: shards on a local disk, shared by every rank and worker of a machine, reusable after a crash.

How it stays correct:

- **Atomic entries.** A shard is written to a temp file, fsync-ed and renamed to its entry name, so an
  entry is either absent or complete; readers never see a torn file, and need no lock to read.
- **Verified reads.** An entry is checked in full against the manifest's sha256 the first time a rank reads
  it (the result is shared by the rank's DataLoader workers), and on *every* read its stat signature
  (device, inode, size, mtime, ctime) is compared with the one recorded when it was verified or written:
  if any differs it is checked in full again before use. A write through the file system always moves the
  ctime, even one that puts the mtime back with ``utime``, so in-place corruption is caught on the next
  read without hashing every read. A corrupt or truncated entry is deleted, with a
  :class:`CacheEntryCorruptWarning`, and fetched again. Two cases this signature cannot see: a change that
  bypasses the file system (a failing disk, a write to the block device) and a write within the file
  system's timestamp granularity (a few milliseconds) of the verification itself; the full check at each
  run's first read catches both, and ``verify_every_read=True`` checks every read in full. The check is
  independent of the shard format.
- **Content-addressed.** Entries are named by the shard's checksum from the manifest (see
  :mod:`~lightning_patterns.data.caching.layout`), so a changed dataset never reads stale bytes.
- **One fetch per shard per machine.** A per-entry ``flock`` makes one process fetch a shard while the
  others wait for its entry (up to ``lock_timeout``, then an error naming the entry).
- **Bounded.** Adding, evicting and cleaning happen under one index lock; see
  :mod:`~lightning_patterns.data.caching.lru` for the policy. The cache never holds more than
  ``cache_limit`` bytes of entries, and stops adding entries when the disk's free space would fall below
  ``min_free_bytes``.
- **Crash-safe.** ``flock`` locks die with their process, and a temp file found while holding the index
  lock belongs to a writer that died (live writers only have one while holding it), so it is deleted. After
  ``kill -9`` the next run reuses every complete entry and fetches only the rest.

- **Off the reader's path.** Through :meth:`DiskEpochCache.get_or_fill` (what ``StreamingDataset`` uses) a
  fetched shard is handed to the reader at once and written to its entry by a background thread, holding the
  entry's lock until the entry is complete, so the first epoch does not wait for the disk; :meth:`flush`
  waits for those writes. Until its entry is written, a shard is read from the (verified) memory the
  background thread writes from, by any reader of that process: the next epoch does not wait for the disk
  either. :meth:`DiskEpochCache.get_or_fetch` stores before it returns.

Reads are fast: an entry is memory-mapped read-only, and a full verification happens once per entry per rank
(one ``fstat`` per read otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import multiprocessing
import os
import queue
import re
import secrets
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, ClassVar

from lightning_patterns.data.caching.base import EpochCache, ShardStream, check_cache_limit
from lightning_patterns.data.caching.layout import entry_digest, is_temp_name, manifest_key, store_root
from lightning_patterns.data.caching.locks import acquire_file_lock, file_lock
from lightning_patterns.data.caching.lru import CacheEntry, plan_admission
from lightning_patterns.data.shards.manifest import Manifest

__all__ = ["CacheEntryCorruptWarning", "DiskEpochCache"]

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^sha256:([0-9a-f]{64})$")
_CORRUPT = object()
_WRITE_CHUNK = 8 * 2**20
# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of a verified entry, then a tag mixing them.
_SIGNATURE = 6
# Shards waiting for the background writer; one more blocks the reader (the disk is slower than the network).
_PENDING_WRITES = 2


def _new_verified(num_shards: int) -> Any:
    return multiprocessing.RawArray("q", _SIGNATURE * num_shards)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _tag(signature: tuple[int, ...]) -> int:
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


class CacheEntryCorruptWarning(UserWarning):
    """A disk cache entry did not match the manifest's checksum; it was deleted and will be fetched again."""


class DiskEpochCache(EpochCache):
    """Keeps shards as files in ``cache_dir``, for later epochs and later runs.

    Every process on a machine may point at the same ``cache_dir``: each shard is fetched once. The limit
    counts every entry in the folder, of any dataset; entries of the dataset being read are never evicted
    for its own shards (a dataset larger than the cache keeps a fixed part cached, instead of evicting each
    shard just before the next epoch needs it).

    Args:
        cache_dir: the folder to keep entries in (the cache uses a subfolder of its own).
        cache_limit: bytes of entries the folder may hold; ``None`` for no limit but the free space.
        min_free_bytes: stop adding entries when the file system's free space would fall below this.
        lock_timeout: seconds to wait for another process that is fetching the same shard.
        verify_every_read: check every read of an entry in full against its sha256, instead of the first read
            of each rank and any read after the entry's stat signature changed (see the module docstring).

    Raises:
        ValueError: an argument is out of range.
    """

    name: ClassVar[str] = "disk"

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        cache_limit: int | None = None,
        min_free_bytes: int = 2**30,
        lock_timeout: float = 600.0,
        verify_every_read: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
            raise ValueError(
                f"`cache_dir` must be a folder path, got cache_dir={cache_dir!r}. Pass a local folder, e.g. "
                "cache_dir='/local/ssd/lightning_patterns'."
            )
        if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int) or min_free_bytes < 0:
            raise ValueError(
                f"`min_free_bytes` must be a number of bytes >= 0, got min_free_bytes={min_free_bytes!r}; "
                "0 turns the free-space watermark off."
            )
        if not lock_timeout > 0:
            raise ValueError(f"`lock_timeout` must be a positive number of seconds, got lock_timeout={lock_timeout!r}.")
        self.cache_dir = os.fspath(cache_dir)
        self.cache_limit = check_cache_limit(cache_limit)
        self.min_free_bytes = min_free_bytes
        self.lock_timeout = float(lock_timeout)
        self.verify_every_read = bool(verify_every_read)
        self.root = store_root(self.cache_dir)
        self._manifest: Manifest | None = None
        self._digests: list[str] = []
        self._protected: frozenset[str] = frozenset()
        # Per shard: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, tag) of the entry file last verified,
        # shared by the rank's workers. No lock (a SemLock cannot go to "spawn" workers once made in a "fork"
        # context): the tag mixes the other five, so a torn read or write never looks like a verified signature.
        self._verified: Any = None
        self._warned_full = False
        self._writer: _BackgroundWriter | None = None

    @classmethod
    def from_options(cls, *, cache_dir: str | None, cache_limit: int | None) -> DiskEpochCache:
        """Build the cache from the dataset's ``cache_dir`` (required) and ``cache_limit``."""
        if cache_dir is None:
            raise ValueError(
                "cache='disk' needs a folder to keep shards in, but `cache_dir` is None. Pass one, e.g. "
                "`StreamingDataset(url, cache='disk', cache_dir='/local/ssd/lightning_patterns')`, or use "
                "cache='memory'."
            )
        return cls(cache_dir, cache_limit=cache_limit)

    # ------------------------------------------------------------------ binding and pickling

    def bind(self, manifest: Manifest) -> None:
        """Create the cache folders, record the dataset, and share verification results with later workers."""
        digests = []
        for index, shard in enumerate(manifest.shards):
            match = _SHA256.match(shard.checksum)
            if match is None:
                raise ValueError(
                    f"The disk cache names entries by their sha256, but shard {index} ({shard.path!r}) has checksum "
                    f"{shard.checksum!r}. Rewrite the dataset with this version of lightning_patterns, or use "
                    "cache='memory'."
                )
            digests.append(match.group(1))
        try:
            for folder in ("entries", "locks", "datasets"):
                (self.root / folder).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"The disk cache cannot create its folder in cache_dir={self.cache_dir!r} ({err}). Pass a writable "
                "local folder as `cache_dir`."
            ) from err
        self._record_dataset(manifest)
        self._manifest = manifest
        self._digests = digests
        self._protected = frozenset(digests)
        self._verified = _new_verified(len(digests))

    def _record_dataset(self, manifest: Manifest) -> None:
        text = manifest.to_json()
        path = self.root / "datasets" / f"{manifest_key(text)}.json"
        if path.exists():
            with contextlib.suppress(OSError):
                os.utime(path)  # `cache info` lists recently read datasets first
            return
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            temp.write_text(text)
            os.replace(temp, path)
        except OSError as err:
            log.warning("Could not record the dataset in the disk cache at %s: %s", self.root, err)
            with contextlib.suppress(OSError):
                temp.unlink()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_counts_lock", "_verified"):
            del state[name]
        state["_writer"] = None
        # A worker started with "spawn" shares the rank's verification results; other copies start afresh.
        spawning = get_spawning_popen() is not None and self._verified is not None
        state["_shared"] = self._verified if spawning else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        shared = state.pop("_shared")
        self.__dict__.update(state)
        self._reset_after_pickle()
        if shared is not None:
            self._verified = shared
        else:
            self._verified = _new_verified(len(self._digests)) if self._manifest is not None else None

    # ------------------------------------------------------------------ reading

    def _entry_path(self, digest: str) -> Path:
        return self.root / "entries" / f"{digest}.lps"

    def _unlocked_hit(self, shard: int) -> tuple[str, Any]:
        """The entry's digest, and the entry if it is stored and verifies (counted as a hit), without the lock."""
        if self._manifest is None:
            raise RuntimeError(
                "DiskEpochCache.get_or_fetch() before bind(manifest): bind the cache to a dataset first."
            )
        digest = self._digests[shard]
        found = self._open_verified(shard, locked=False)
        if found is not None and found is not _CORRUPT:
            self._count(hit=True)
            return digest, found
        return digest, None

    def _hit_or_lock(self, shard: int) -> tuple[Any, int | None]:
        """``(shard, None)`` on a hit (counted), else ``(None, fd)`` holding the entry's lock: ``os.close(fd)`` it.

        A hit is the memory this process's background writer still holds, or a verified entry; a miss is checked
        again under the lock, since another process may have stored the entry while this one waited.
        """
        held = self._held(shard)
        if held is not None:
            return held, None
        digest, found = self._unlocked_hit(shard)
        if found is not None:
            return found, None
        lock = acquire_file_lock(
            str(self._lock_path(digest)),
            timeout=self.lock_timeout,
            what=f"disk cache entry {digest[:16]}… (shard {shard})",
        )
        try:
            found = self._open_verified(shard, locked=True)
        except BaseException:
            os.close(lock)
            raise
        if found is not None:
            os.close(lock)
            self._count(hit=True)
            return found, None
        return None, lock

    def get_or_fetch(self, shard: int, fetch: Callable[[], bytes | memoryview]) -> Any:
        """The shard's entry, memory-mapped read-only; on a miss ``fetch()`` it (once per machine) and store it.

        Raises:
            RuntimeError: :meth:`bind` was not called.
            CacheLockTimeoutError: another process held the entry's lock for longer than ``lock_timeout``.
        """
        found, lock = self._hit_or_lock(shard)
        if lock is None:
            return found
        try:
            data = fetch()
            self._count(hit=False)
            self._store(shard, data)
        finally:
            os.close(lock)  # closing the descriptor releases the lock
        return data

    def get_or_fill(self, shard: int, fill: Callable[[memoryview | None], bytes | memoryview]) -> Any:
        """Like :meth:`get_or_fetch`, but a fetched shard is stored in the background and returned at once.

        The entry's lock is held until the entry is written (by the background thread), so another process
        that needs the shard meanwhile waits for the entry instead of fetching it again; a reader in this
        process gets the fetched (verified) memory the entry is being written from, at once.

        Raises:
            RuntimeError: :meth:`bind` was not called.
            CacheLockTimeoutError: another process held the entry's lock for longer than ``lock_timeout``.
        """
        found, lock = self._hit_or_lock(shard)
        if lock is None:
            return found
        handed_over = False
        try:
            data = fill(None)
            self._count(hit=False)
            self._background().put(shard, data, lock)
            handed_over = True
            return data
        finally:
            if not handed_over:
                os.close(lock)

    def get_or_stream(self, shard: int, stream: ShardStream) -> Any:
        """Like :meth:`get_or_fill`, but a missing shard is read while it arrives, and stored once it is verified.

        ``stream`` fetches into memory of its own; once its ``complete`` future resolves to the whole verified
        shard, the shard goes to the background writer (the thread that resolved it waits while
        ``_PENDING_WRITES`` shards already wait to be written). The entry's lock is held from the miss until
        the entry is written, or until the stream failed (then nothing is stored).

        Raises:
            RuntimeError: :meth:`bind` was not called.
            CacheLockTimeoutError: another process held the entry's lock for longer than ``lock_timeout``.
        """
        found, lock = self._hit_or_lock(shard)
        if lock is None:
            return found
        complete: Future[memoryview] = Future()

        def finished(done: Future[memoryview]) -> None:
            if done.cancelled() or done.exception() is not None:
                os.close(lock)  # nothing verified to keep
                return
            try:
                self._background().put(shard, done.result().toreadonly(), lock)
            except BaseException:
                os.close(lock)
                raise

        # From here the lock is released by `finished` alone: `stream` resolves `complete` even when it raises.
        complete.add_done_callback(finished)
        self._count(hit=False)
        return stream(None, complete)

    def flush(self) -> None:
        """Wait until every shard handed to the background writer is stored (or failed to be, which only logs)."""
        writer = self._writer
        if writer is not None and writer.pid == os.getpid():
            writer.join()

    def _held(self, shard: int) -> Any:
        """The shard's verified bytes if this process's background writer still holds them (counted as a hit).

        Reading them instead of waiting for the entry keeps the disk off the next epoch's path too: an epoch
        that begins while the last shards of the one before are still being written reads them from memory.
        """
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            return None
        data = writer.held(shard)
        if data is not None:
            self._count(hit=True)
        return data

    def _background(self) -> _BackgroundWriter:
        with self._counts_lock:  # (any lock of this process) two loader threads must not make two writers
            writer = self._writer
            if writer is None or writer.pid != os.getpid():  # none yet, or forked: the parent's thread is not here
                writer = self._writer = _BackgroundWriter(self._store)
        return writer

    def _open_verified(self, shard: int, *, locked: bool) -> Any:
        """The entry's mapped bytes; ``None`` if missing; ``_CORRUPT`` if bad and not ``locked`` (else deleted)."""
        assert self._manifest is not None
        digest = self._digests[shard]
        size = self._manifest.shards[shard].num_bytes
        path = self._entry_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            signature = _signature(st)
            if st.st_size != size:
                problem = f"it has {st.st_size} bytes, the manifest says {size}"
                region = None
            else:
                region = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
                problem = ""
        finally:
            os.close(fd)
        view: Any = memoryview(region) if region is not None else b""
        if not problem and (self.verify_every_read or not self._is_verified(shard, signature)):
            actual = hashlib.sha256(view).hexdigest()
            if actual == digest:
                self._mark_verified(shard, signature)
            else:
                problem = f"its sha256 is {actual}"
        if problem:
            if isinstance(view, memoryview):
                view.release()
            if region is not None:
                region.close()
            if not locked:
                return _CORRUPT
            warnings.warn(
                f"Disk cache entry {path} for shard {shard} ({self._manifest.shards[shard].path!r}) is corrupt or "
                f"truncated ({problem}; expected sha256 {digest}). Deleted it; fetching the shard again.",
                CacheEntryCorruptWarning,
                stacklevel=3,
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        self._mark_used(digest)
        return view

    def _lock_path(self, digest: str) -> Path:
        return self.root / "locks" / f"{digest}.lock"

    def _mark_used(self, digest: str) -> None:
        """Record that the entry was just read, on its lock file: touching the entry would move its ctime."""
        lock = self._lock_path(digest)
        try:
            os.utime(lock)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                lock.touch()
        except OSError:
            pass

    def _is_verified(self, shard: int, signature: tuple[int, ...]) -> bool:
        base = _SIGNATURE * shard
        return list(self._verified[base : base + _SIGNATURE]) == [*signature, _tag(signature)]

    def _mark_verified(self, shard: int, signature: tuple[int, ...]) -> None:
        base = _SIGNATURE * shard
        self._verified[base : base + _SIGNATURE] = [*signature, _tag(signature)]

    # ------------------------------------------------------------------ writing

    def _store(self, shard: int, data: bytes | memoryview) -> None:
        """Add ``data`` as the shard's entry if the policy admits it; failures only log (training goes on)."""
        digest = self._digests[shard]
        entries_dir = self.root / "entries"
        try:
            with file_lock(
                str(self.root / "index.lock"), timeout=self.lock_timeout, what=f"the cache index {self.root}"
            ):
                entries = self._scan(entries_dir)
                free = shutil.disk_usage(entries_dir).free
                admission = plan_admission(
                    entries,
                    len(data),
                    cache_limit=self.cache_limit,
                    free_bytes=free,
                    min_free_bytes=self.min_free_bytes,
                )
                if not admission.admit:
                    self._note_not_stored(shard, admission.reason, free)
                    return
                for name in admission.evict:
                    log.debug("Evicting %s from the disk cache at %s", name, self.root)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entries_dir / name)
                self._write_entry(shard, digest, data)
        except OSError as err:
            log.warning(
                "Could not store shard %s in the disk cache at %s (%s); it will be fetched again.",
                shard,
                self.root,
                err,
            )

    def _write_entry(self, shard: int, digest: str, data: bytes | memoryview) -> None:
        entries_dir = self.root / "entries"
        temp = entries_dir / f"{digest}.lps.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written : written + _WRITE_CHUNK])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, self._entry_path(digest))
            # After the rename, which moves the ctime on most file systems: these bytes were verified when fetched.
            st = os.stat(self._entry_path(digest))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._mark_verified(shard, _signature(st))
        with contextlib.suppress(OSError):
            dir_fd = os.open(entries_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename durable too
            finally:
                os.close(dir_fd)

    def _scan(self, entries_dir: Path) -> list[CacheEntry]:
        """The complete entries, deleting temp files (called holding the index lock: their writers are dead)."""
        entries = []
        with os.scandir(entries_dir) as it:
            for item in it:
                digest = entry_digest(item.name)
                try:
                    if digest is not None:
                        st = item.stat(follow_symlinks=False)
                        used = max(st.st_atime_ns, self._last_marked_used(digest))
                        entries.append(CacheEntry(item.name, st.st_size, used, digest in self._protected))
                    elif is_temp_name(item.name):
                        log.info("Deleting %s, left half-written by a process that died", item.path)
                        os.unlink(item.path)
                except FileNotFoundError:
                    continue
        return entries

    def _last_marked_used(self, digest: str) -> int:
        try:
            return os.stat(self._lock_path(digest)).st_mtime_ns
        except OSError:
            return 0

    def _note_not_stored(self, shard: int, reason: str, free: int) -> None:
        if self._warned_full:
            return
        self._warned_full = True
        if reason == "low_disk":
            log.warning(
                "The disk cache at %s stops adding shards: %s bytes free, and min_free_bytes=%s.",
                self.root,
                free,
                self.min_free_bytes,
            )
        else:
            log.info(
                "The disk cache at %s is full (cache_limit=%s, %s): shard %s and others are read from the remote.",
                self.root,
                self.cache_limit,
                reason,
                shard,
            )

    def __repr__(self) -> str:
        return f"DiskEpochCache(cache_dir={self.cache_dir!r}, cache_limit={self.cache_limit!r})"


class _BackgroundWriter:
    """One thread that stores shards handed to it, then releases each entry's lock; it ends when idle.

    At most :data:`_PENDING_WRITES` shards wait (each holds its buffer), so memory stays bounded when the disk is
    slower than the network: the next hand-over waits instead. The thread is not a daemon: a process that
    ends normally finishes its writes first (one killed leaves temp files, which the next writer removes).
    """

    def __init__(self, store: Callable[[int, Any], None]) -> None:
        self.pid = os.getpid()
        self._store = store
        self._jobs: queue.Queue[tuple[int, Any, int]] = queue.Queue(maxsize=_PENDING_WRITES)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Shards handed over and not yet stored, by shard: readers of this process read them from here.
        self._holding: dict[int, Any] = {}

    def held(self, shard: int) -> Any:
        """The bytes of ``shard`` while they wait for (or are in) their write, else ``None``."""
        with self._lock:
            return self._holding.get(shard)

    def put(self, shard: int, data: Any, lock: int) -> None:
        """Store ``data`` as the entry of ``shard`` in the background, then close the entry's lock ``lock``."""
        with self._lock:
            self._holding[shard] = data
        self._jobs.put((shard, data, lock))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lightning-patterns-cache-write")
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                shard, data, lock = self._jobs.get(timeout=1.0)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                self._store(shard, data)
            except Exception:  # never let one shard's failure stop the others' writes
                log.exception("Could not store shard %s in the disk cache", shard)
            finally:
                # Dropped only once the entry is complete (or failed): a reader then finds the entry instead.
                with self._lock:
                    self._holding.pop(shard, None)
                os.close(lock)
                self._jobs.task_done()

    def join(self) -> None:
        """Wait for every shard handed over so far."""
        self._jobs.join()
