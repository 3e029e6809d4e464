"""Shared memory between the processes of one host: anonymous memory files, never a name in ``/dev/shm``.

A :class:`Region` is created with ``memfd_create`` (Linux): an anonymous file in memory, mapped into the creator
and wrapped as tensors without a copy. A process of the same host maps the same memory by opening
``/proc/<creator pid>/fd/<fd>`` while the creator lives. The region has no name anywhere in the filesystem, so
nothing can outlive its users: when the last process that maps it exits, however it exits (``kill -9``
included), the kernel frees it. There is nothing to clean up after a crash, and nothing to leak.

Which pairs of processes can share memory is decided at join time from a :class:`HostCard` per process
(hostname, boot id, PID namespace, PID, and a small probe region for servers): two processes share memory when
they run under the same kernel boot and PID namespace and one can actually map the other's probe.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["HostCard", "Region", "RegionError", "shared_memory_available"]

log = logging.getLogger(__name__)

#: Every region's name starts with this (it shows as ``/memfd:<name>`` in ``/proc/<pid>/maps``).
NAME_PREFIX = "lp-ps"
_PAGE = mmap.PAGESIZE


class RegionError(OSError):
    """A shared-memory region could not be created or mapped."""


def shared_memory_available() -> bool:
    """Whether this platform has anonymous memory files (Linux ``memfd_create``) and ``/proc``."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


class Region:
    """Memory shared by the processes of one host, viewed as tensors.

    Create one with :meth:`create`, describe it to a peer with :meth:`describe`, map it there with :meth:`open`.

    Args:
        fd: the memory file's descriptor in this process (closed by :meth:`release`).
        nbytes: usable bytes (the mapping is rounded up to whole pages).
        pid: the creator's process id (where peers open it).
        creator_fd: the descriptor number in the creator.
        name: the region's name (for ``/proc/<pid>/maps`` and logs).
    """

    def __init__(self, fd: int, nbytes: int, pid: int, creator_fd: int, name: str) -> None:
        self.nbytes = nbytes
        self.pid = pid
        self.creator_fd = creator_fd
        self.name = name
        self._fd: int | None = fd
        self._map = mmap.mmap(fd, max(_round_up(nbytes), _PAGE))
        self._pinned = False

    @classmethod
    def create(cls, name: str, nbytes: int) -> Region:
        """A new region of ``nbytes`` zero bytes, named ``lp-ps-<pid>-<name>`` (unique on the host)."""
        if not shared_memory_available():
            raise RegionError("Shared memory needs Linux (memfd_create and /proc); use transport='tcp'.")
        full = f"{NAME_PREFIX}-{os.getpid()}-{name}"
        try:
            fd = os.memfd_create(full, os.MFD_CLOEXEC)
            os.ftruncate(fd, max(_round_up(nbytes), _PAGE))
        except OSError as error:
            raise RegionError(f"Could not create shared memory {full!r} of {nbytes} bytes: {error}") from error
        return cls(fd, nbytes, os.getpid(), fd, full)

    @classmethod
    def open(cls, description: dict[str, Any]) -> Region:
        """Map the region a peer described (:meth:`describe`); the peer must still hold it."""
        try:
            pid, fd, nbytes, name = (
                int(description["pid"]),
                int(description["fd"]),
                int(description["nbytes"]),
                str(description["name"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise RegionError(f"Not a shared-memory region description: {description!r} ({error!r}).") from None
        if not name.startswith(NAME_PREFIX) or nbytes < 0:
            raise RegionError(f"Not a parameter-server region: {description!r}.")
        path = f"/proc/{pid}/fd/{fd}"
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise RegionError(
                f"Could not map shared memory {name!r} of process {pid} through {path}: {error}. The processes must "
                "run on one host, in one PID namespace, as one user; otherwise use transport='tcp'."
            ) from error
        try:
            if os.fstat(own).st_size < nbytes:
                raise RegionError(f"{path} is smaller than the {nbytes} bytes announced for {name!r}.")
            # The descriptor number may have been reused for another file: check that it is the named region.
            link = os.readlink(path)
            if not link.startswith(f"/memfd:{name}"):
                raise RegionError(f"{path} is {link!r}, not the region {name!r}.")
            return cls(own, nbytes, pid, fd, name)
        except BaseException:
            os.close(own)
            raise

    def describe(self) -> dict[str, Any]:
        """What a peer needs to :meth:`open` the region (JSON-able)."""
        return {"pid": self.pid, "fd": self.creator_fd, "nbytes": self.nbytes, "name": self.name}

    def tensor(self, dtype: torch.dtype, numel: int, offset_bytes: int = 0) -> torch.Tensor:
        """A flat tensor of ``numel`` elements of ``dtype`` on this memory, starting ``offset_bytes`` in."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if offset_bytes < 0 or offset_bytes % itemsize or offset_bytes + numel * itemsize > self.nbytes:
            raise RegionError(
                f"{numel} × {dtype} at byte {offset_bytes} does not fit region {self.name!r} of {self.nbytes} bytes."
            )
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset_bytes)

    def pin(self) -> bool:
        """Page-lock the region for fast, asynchronous copies to and from CUDA devices; whether it worked."""
        if self._pinned or not torch.cuda.is_available():
            return self._pinned
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        # cudaHostRegisterPortable (1): pinned for every CUDA context of this process.
        error = torch.cuda.cudart().cudaHostRegister(address, len(self._map), 1)  # type: ignore[no-untyped-call]
        self._pinned = int(error) == 0
        if not self._pinned:
            log.warning("could not page-lock shared memory %s (CUDA error %s): copies will be slower", self.name, error)
        return self._pinned

    def release(self) -> None:
        """Close this process's descriptor and unpin; the mapping goes once no tensor views it any more."""
        if self._pinned:
            import ctypes

            address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
            self._pinned = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _round_up(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


@dataclass(frozen=True)
class HostCard:
    """Who a process is and where it runs, exchanged at join time to choose a transport for each pair.

    Attributes:
        hostname: the machine's name.
        boot_id: the kernel's boot id (two containers of one machine share it, two machines never do).
        pid_namespace: the PID namespace (``/proc/<pid>`` names a process only within it).
        pid: the process id.
        probe: a server's small probe region (:meth:`Region.describe`), which a worker tries to map; ``{}`` if
            none.
    """

    hostname: str
    boot_id: str
    pid_namespace: str
    pid: int
    probe: dict[str, Any]

    @classmethod
    def here(cls, probe: Region | None = None) -> HostCard:
        """This process's card."""
        return cls(
            hostname=socket.gethostname(),
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_namespace=_namespace("pid"),
            pid=os.getpid(),
            probe=probe.describe() if probe is not None else {},
        )

    def same_host(self, other: HostCard) -> bool:
        """Whether ``other`` runs on this host, in this PID namespace (so shared memory can be mapped)."""
        return bool(self.boot_id) and (self.hostname, self.boot_id, self.pid_namespace) == (
            other.hostname,
            other.boot_id,
            other.pid_namespace,
        )

    def can_map_probe_of(self, other: HostCard) -> bool:
        """Whether this process can map ``other``'s probe region (same host, and permitted)."""
        if not other.probe or not self.same_host(other) or not shared_memory_available():
            return False
        try:
            Region.open(other.probe).release()
        except RegionError as error:
            log.info("cannot share memory with process %d: %s", other.pid, error)
            return False
        return True

    def to_json(self) -> str:
        """The form stored in the rendezvous store."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> HostCard:
        """Parse :meth:`to_json`."""
        obj = json.loads(text)
        return cls(
            hostname=str(obj["hostname"]),
            boot_id=str(obj["boot_id"]),
            pid_namespace=str(obj["pid_namespace"]),
            pid=int(obj["pid"]),
            probe=dict(obj["probe"]),
        )
