"""Running a job that may not fit in memory without taking the machine down: a watchdog on its process group.

A benchmark that asks "does DDP hold a 10M-row table in two workers?" must be able to answer "no" by trying.
Left alone, a job that outgrows the machine is stopped by the kernel's OOM killer, which may pick another
process (a peer's test run, the shell), or the machine swaps to a halt. :func:`run_with_memory_guard` starts the
command in its own process group (a new session, so the workers and servers it starts are in it too), and
every ``poll_s`` seconds sums the resident memory of the group's processes and reads the machine's available
memory. When the group passes ``max_rss_bytes``, or available memory falls under ``min_available_bytes``, it
kills the whole group (``SIGKILL``) and says why; that is then the job's result.

Linux only (``/proc``): the benchmarks that need it run on Linux.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GuardedRun",
    "available_memory_bytes",
    "group_cpu_seconds",
    "group_rss_bytes",
    "run_with_memory_guard",
    "total_memory_bytes",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field!r} line; the memory guard needs Linux 3.14 or later.")


def available_memory_bytes() -> int:
    """The machine's available memory (``MemAvailable``: free plus reclaimable), in bytes."""
    return _meminfo("MemAvailable")


def total_memory_bytes() -> int:
    """The machine's memory (``MemTotal``), in bytes."""
    return _meminfo("MemTotal")


def _group_stats(pgid: int) -> list[tuple[list[str], Path]]:
    """The ``/proc/PID/stat`` fields after the command name (``state`` first) of each process of group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            found.append((fields, entry))
    return found


def group_rss_bytes(pgid: int) -> int:
    """Resident memory summed over the processes of process group ``pgid`` (shared pages count once per process)."""
    total = 0
    for _, entry in _group_stats(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((entry / "statm").read_text().split()[1]) * _PAGE
    return total


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user and system) the live processes of process group ``pgid`` have used so far, summed.

    Less sensitive to other load on the machine than wall time: the benchmarks report it per step beside steps/s.
    """
    ticks = sum(int(fields[11]) + int(fields[12]) for fields, _ in _group_stats(pgid))
    return ticks / _TICKS


@dataclass(frozen=True)
class GuardedRun:
    """What :func:`run_with_memory_guard` saw.

    Attributes:
        returncode: the command's exit status (``-9`` when the guard killed it).
        stdout: its standard output.
        stderr: its standard error.
        seconds: wall time until it ended or was stopped.
        peak_rss_bytes: the largest resident memory of its process group at any poll.
        stopped: why the guard stopped it, or ``None`` when it ended by itself.
    """

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int
    stopped: str | None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, signal.SIGKILL)


def run_with_memory_guard(
    command: Sequence[str],
    *,
    max_rss_bytes: int,
    min_available_bytes: int,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_s: float = 0.1,
) -> GuardedRun:
    """Run ``command`` in a new process group; kill the group if it outgrows the memory limits or ``timeout``.

    Args:
        command: the program and its arguments.
        max_rss_bytes: the most resident memory the group's processes may hold together.
        min_available_bytes: the least available memory the machine must keep.
        timeout: seconds the command may run.
        env: its environment (default: this process's).
        cwd: its working directory.
        poll_s: seconds between two looks at its memory; the group can grow by what it allocates in that time
            beyond the limits, so leave that much margin.

    Returns:
        The exit status, output, wall time and peak memory; ``stopped`` says which limit the guard enforced.

    Raises:
        ValueError: a limit that is not positive.
    """
    for name, value in (("max_rss_bytes", max_rss_bytes), ("timeout", timeout), ("poll_s", poll_s)):
        if not value > 0:
            raise ValueError(f"run_with_memory_guard needs a positive `{name}`, got {name}={value!r}.")
    started = time.perf_counter()
    process = subprocess.Popen(
        list(command),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session and process group: the workers it starts are in the group
    )
    pgid = process.pid
    peak = 0
    stopped: str | None = None
    stdout, stderr = "", ""
    try:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            rss, available = group_rss_bytes(pgid), available_memory_bytes()
            peak = max(peak, rss)
            if rss > max_rss_bytes:
                stopped = f"its processes held {rss / 2**30:.2f} GiB, over the cap of {max_rss_bytes / 2**30:.2f} GiB"
            elif available < min_available_bytes:
                stopped = (
                    f"the machine's available memory fell to {available / 2**30:.2f} GiB, under the floor of "
                    f"{min_available_bytes / 2**30:.2f} GiB"
                )
            elif time.perf_counter() - started > timeout:
                stopped = f"it ran past its {timeout:.0f} s timeout"
            if stopped is not None:
                _kill_group(pgid)
                stdout, stderr = process.communicate()
                break
    finally:
        if process.poll() is None:
            _kill_group(pgid)
            process.wait()
        _kill_group(pgid)  # what the command started and left behind
    return GuardedRun(process.returncode, stdout, stderr, time.perf_counter() - started, peak, stopped)
