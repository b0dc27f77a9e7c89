"""The daemon's heap settings (:mod:`fleece.heap`): glibc only, and idle caches let go."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

from fleece import heap
from fleece.block import write_behind


class _Cache:
    def __init__(self) -> None:
        self.calls = 0

    def release_idle(self) -> None:
        self.calls += 1


def test_the_settings_apply_on_glibc() -> None:
    # In a child: the settings are process-wide and cannot be undone, and the fixed mmap
    # threshold would slow the tests that follow (big bytearrays growing by small steps).
    probe = ("from fleece import heap; assert heap.return_big_buffers(); "
             "assert heap.limit_arenas(heap.ARENAS); free = heap.heap_free_bytes(); "
             "assert free is None or free >= 0")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_the_trimmer_ticks_calls_the_caches_and_stops() -> None:
    cache = _Cache()
    heap.register_cache(cache)
    trimmer = heap.HeapTrimmer(interval=0.01, slack=0)
    assert trimmer.start()
    deadline = time.monotonic() + 10
    while (trimmer.trims < 2 or cache.calls < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    assert trimmer.trims >= 2 and cache.calls >= 2
    calls = cache.calls
    time.sleep(0.05)
    assert cache.calls == calls  # stopped


def test_a_registered_cache_is_held_weakly() -> None:
    cache = _Cache()
    heap.register_cache(cache)
    del cache
    gc.collect()
    heap.release_idle_caches()  # nothing left to call, nothing raised


def test_the_write_behind_keeps_spares_within_its_budget_and_drops_them_when_idle() -> None:
    behind = write_behind.WriteBehind(3 << 20, lambda landing: None,
                                      lambda landing, error: None)
    try:
        bufs = [behind.buffer(1 << 20) for _ in range(3)]
        for buf in bufs:
            assert buf is not None
            behind.give_back(buf, 1 << 20)
        behind._keep_spare(bytearray(1 << 20))  # a fourth would pass the budget
        assert sum(len(b) for b in behind._spare) == 3 << 20
        behind.release_idle()  # buffers were asked for since the last tick: kept
        assert len(behind._spare) == 3
        behind.release_idle()  # none since: let go
        assert behind._spare == []
    finally:
        behind.close()


def test_the_shared_pool_lets_go_of_buffers_nobody_took() -> None:
    pool = write_behind._BufferPool(4 << 20)
    pool.give([bytearray(1 << 20)])
    assert pool.take() is not None
    pool.give([bytearray(1 << 20)])
    pool.release_idle()  # taken since the last tick
    pool.release_idle()
    assert pool.take() is None
