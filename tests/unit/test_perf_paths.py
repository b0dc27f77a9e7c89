"""The fast paths of issue #8: the futures-free I/O pool and non-blocking snapshot read locks."""

from __future__ import annotations

import threading
import time

import pytest

from fleece.block import nowait
from fleece.block.rangelock import ClusterRangeLocks
from fleece.nbd.pool import IOPool


def test_pool_runs_everything_before_shutdown_returns() -> None:
    pool = IOPool(3, "test-io")
    done: list[int] = []
    lock = threading.Lock()

    def job(i: int) -> None:
        time.sleep(0.001)
        with lock:
            done.append(i)

    for i in range(50):
        pool.submit(job, i)
    pool.shutdown(wait=True)
    assert sorted(done) == list(range(50))
    with pytest.raises(RuntimeError):
        pool.submit(job, 99)


def test_pool_survives_a_failing_job() -> None:
    pool = IOPool(1, "test-io")
    seen: list[str] = []

    def bad() -> None:
        raise ValueError("boom")

    pool.submit(bad)
    pool.submit(seen.append, "after")
    pool.shutdown(wait=True)
    assert seen == ["after"]


def test_try_shared_refuses_while_exclusive_held_or_waiting() -> None:
    locks = ClusterRangeLocks()
    with locks.locked(0, 4, exclusive=True):
        assert locks.try_shared(2, 3) is None
        held = locks.try_shared(4, 8)  # no overlap
        assert held is not None
        with held:
            assert len(locks) == 2
    assert len(locks) == 0
    # An exclusive request waiting behind a shared hold blocks new shared holds (writers first).
    first = locks.try_shared(0, 4)
    assert first is not None
    first.__enter__()
    waiter = threading.Thread(target=lambda: locks.locked(0, 4, exclusive=True).__enter__())
    waiter.daemon = True
    waiter.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with locks.mutex:
            if locks._waiting.conflicts(0, 4, True):
                break
        time.sleep(0.001)
    assert locks.try_shared(1, 2) is None
    first.__exit__(None, None, None)
    waiter.join(5)


def test_cbw_read_guard_does_not_wait_inside_nowait(tmp_path: object) -> None:
    from fleece.storage import Storage

    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "null-co", "node-name": "src",
                                         "size": 1 << 20})
        storage.execute("blockdev-add", {"driver": "null-co", "node-name": "tgt",
                                         "size": 1 << 20})
        from fleece.block.cbw import CopyBeforeWrite

        cbw = CopyBeforeWrite(storage.find_node("src"), storage.find_node("tgt"), 65536)
        with cbw.locks.locked(0, 1, exclusive=True):
            with nowait.nowait(), pytest.raises(nowait.WouldBlock), cbw.read_guard(0, 4096):
                pass
            with nowait.nowait(), cbw.read_guard(65536, 4096):
                pass
        with nowait.nowait(), cbw.read_guard(0, 4096):
            assert len(cbw.locks) == 1
        assert len(cbw.locks) == 0
