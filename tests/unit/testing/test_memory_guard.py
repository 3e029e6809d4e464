"""The memory guard stops a job whose process group outgrows its cap, children included, and says why."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import time

import pytest

from lightning_patterns.testing.memory_guard import (
    available_memory_bytes,
    group_cpu_seconds,
    run_with_memory_guard,
    total_memory_bytes,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory guard reads /proc (Linux)")

# A parent that starts a child (as a DDP rank 0 starts rank 1); both then grow by 8 MB every 10 ms.
_GROWING = textwrap.dedent(
    """
    import subprocess, sys, time
    if sys.argv[1:] == ["parent"]:
        child = subprocess.Popen([sys.executable, __file__, "child"])
        print(child.pid, flush=True)
    held = []
    for _ in range(500):
        held.append(b"x" * (8 << 20))
        time.sleep(0.01)
    """
)


def test_a_group_over_its_cap_is_killed_children_included(tmp_path: os.PathLike[str]) -> None:
    script = os.path.join(tmp_path, "grow.py")
    with open(script, "w") as file:
        file.write(_GROWING)
    cap = 200 << 20
    run = run_with_memory_guard(
        [sys.executable, script, "parent"], max_rss_bytes=cap, min_available_bytes=1, timeout=60, poll_s=0.05
    )
    assert run.stopped is not None
    assert re.fullmatch(r"its processes held \d+\.\d\d GiB, over the cap of 0\.20 GiB", run.stopped), run.stopped
    assert run.returncode == -9
    assert cap < run.peak_rss_bytes < 4 * cap  # stopped within a poll or two of passing the cap
    assert run.seconds < 30
    child = int(run.stdout.split()[0])
    assert _dead_soon(child)  # the parent's child died with the group


def _dead_soon(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (killed, not yet reaped by init) within a second."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def test_a_job_within_its_limits_runs_and_a_machine_under_its_floor_stops_one() -> None:
    ok = run_with_memory_guard(
        [sys.executable, "-c", "print('done')"], max_rss_bytes=1 << 40, min_available_bytes=1, timeout=60
    )
    assert (ok.returncode, ok.stdout, ok.stopped) == (0, "done\n", None)
    assert 0 < group_cpu_seconds(os.getpgrp()) < time.process_time() + 3600  # ours (pytest's group) included
    floor = total_memory_bytes() + 1  # more than the machine has: the guard must stop the job at its first look
    assert available_memory_bytes() < floor
    starved = run_with_memory_guard(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        max_rss_bytes=1 << 40,
        min_available_bytes=floor,
        timeout=60,
    )
    assert starved.stopped is not None
    assert starved.stopped.startswith("the machine's available memory fell to ")
    assert starved.seconds < 30
    with pytest.raises(ValueError, match=re.escape("needs a positive `max_rss_bytes`, got max_rss_bytes=0")):
        run_with_memory_guard(["true"], max_rss_bytes=0, min_available_bytes=1, timeout=1)
