"""Unit tests of the remote-read counters."""

from __future__ import annotations

import pickle
import threading

from lightning_patterns.data.remote import FetchStats, FetchStatsSnapshot


def test_fetch_stats_are_thread_safe_and_picklable() -> None:
    stats = FetchStats()

    def work() -> None:
        for _ in range(1000):
            stats.record(bytes_read=2, requests=1, retries=1, seconds=0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.as_dict() == {"bytes_read": 8000, "requests": 4000, "retries": 4000, "seconds": 2000.0}
    before = stats.snapshot()
    stats.record(bytes_read=5)
    assert (stats.snapshot() - before) == FetchStatsSnapshot(bytes_read=5)
    clone = pickle.loads(pickle.dumps(stats))
    assert clone.snapshot() == stats.snapshot()
    clone.reset()
    assert clone.bytes_read == 0
    assert stats.bytes_read == 8005
    assert "bytes_read=8005" in repr(stats)
