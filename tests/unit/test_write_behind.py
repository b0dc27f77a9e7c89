"""Write-behind copy-before-write (the backup job's default, ``x-perf.write-behind``).

The writer thread is replaced by the pure twin held behind a gate, so a copy's target write
stays pending for as long as a test wants. What is tested, on iotest 222's rig:

- **The guest goes on, readers wait**: with the target write pending, the guest write returns
  and the device reads the new data; a snapshot read of that cluster blocks until the gate
  opens and then returns the old data; a snapshot read elsewhere does not wait; the target's
  block status shows the cluster allocated once it landed.
- **The budget holds**: with a budget of two clusters, a third copy waits (and so does its
  guest write) until a pending one lands.
- **A late failure breaks the snapshot**: when the target write fails (twice: it is retried
  once) after the guest write went on, reads of the snapshot fail with ``EACCES`` instead of
  returning the guest's new data; under ``on-target-error=report`` the job sends
  ``BLOCK_JOB_ERROR`` and ends with the error; under ``ignore`` it keeps running, broken. A
  read already reading through to the source when the snapshot breaks fails too.
- **Cancel lands what is pending**: the target image holds the copied old data afterwards.
- **Nothing waits for a reap that may never come**: a drain of the target finishes the
  landings already written; a landing stays pending until its clusters are mapped (a reader in
  between waits instead of reading the guest's new data through the backing link).
- ``x-perf.write-behind: 0`` copies before the guest write (the target maps the cluster by the
  time the guest write returns); a bad value is a GenericError naming the member.

The point-in-time property under concurrency (``test_fleecing.py``) runs with write-behind on.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fleece.block.write_behind as write_behind
from fleece._pure.filewriter import FileWriter as PureFileWriter
from fleece.block.direct import DirectWrite
from fleece.block.drivers.qcow2 import Qcow2Driver
from fleece.errors import GenericError
from tests.unit.test_fleecing import CLUSTER, Fleecing, backup_job, read_image

pytestmark = pytest.mark.timeout(20)

BLOCKED = 0.3  # seconds a blocked call is watched before it counts as blocked


class Gate(threading.Event):
    """Closed: the write-behind writer threads do not start writing until it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[PureFileWriter] = []  # the writers made while it was installed


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    opened = Gate()

    class GatedWriter(PureFileWriter):
        def __init__(self, depth: int = 64) -> None:
            super().__init__(depth)
            opened.writers.append(self)

        def _main(self) -> None:
            opened.wait(10)
            super()._main()

    monkeypatch.setattr(write_behind, "FileWriter", GatedWriter)
    return opened


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Fleecing]:
    fleecing = Fleecing(tmp_path)
    yield fleecing
    fleecing.close()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; the list gets its result or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_guest_goes_on_and_snapshot_readers_wait_for_the_landing(
    rig: Fleecing, gate: Gate
) -> None:
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    cbw = backup_job(rig.storage, "virtio0").cbw
    pit0 = rig.storage.graph.get("pit0")
    rig.device.pwrite(0, b"\xab" * CLUSTER)  # returns although its copy is not written yet
    assert cbw.copies_pending
    assert rig.device.pread(0, CLUSTER) == b"\xab" * CLUSTER
    assert pit0.pread(32 << 20, CLUSTER) == b"\xdc" * CLUSTER  # elsewhere: no wait
    reader, got = in_thread(lambda: pit0.pread(0, CLUSTER))
    reader.join(BLOCKED)
    assert reader.is_alive(), "the snapshot read did not wait for the pending copy"
    gate.set()
    reader.join(5)
    assert got == [b"\x5d" * CLUSTER]
    assert not cbw.copies_pending
    status = pit0.block_status(0, CLUSTER)
    assert status.allocated
    rig.check_snapshot()


def test_a_landing_stays_pending_until_its_clusters_are_mapped(
    rig: Fleecing, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a landing was taken off the pending list before the target mapped its
    clusters, and a snapshot read in between took the lock-free path, found the target
    cluster unmapped and read the guest's new data through the backing link."""
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    pit0 = rig.storage.graph.get("pit0")
    rig.device.pwrite(0, b"\xab" * CLUSTER)
    gate.set()
    (writer,) = gate.writers
    writer.wait(0)  # the data is in the target file; its L2 entry is not written yet
    mapping, go_on = threading.Event(), threading.Event()
    original = DirectWrite.finish

    def slow_finish(self: DirectWrite, written: bool) -> None:
        mapping.set()  # the landing is being reaped, its clusters not mapped yet
        go_on.wait(5)
        original(self, written)

    monkeypatch.setattr(DirectWrite, "finish", slow_finish)
    reaper, _ = in_thread(lambda: rig.device.pwrite(40 * CLUSTER, b"\x01" * CLUSTER))
    assert mapping.wait(5), "the guest's next write did not reap the landing"
    reader, got = in_thread(lambda: pit0.pread(0, CLUSTER))
    reader.join(BLOCKED)
    go_on.set()
    reader.join(5)
    reaper.join(5)
    assert got == [b"\x5d" * CLUSTER]
    rig.check_snapshot()


def test_a_drain_of_the_target_finishes_written_landings(rig: Fleecing, gate: Gate) -> None:
    """A landing counts as in flight on the target until it is reaped, and a drain (a reopen
    of the target's file does one) must not wait for a guest write that may never come."""
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    pit0 = rig.storage.graph.get("pit0")
    rig.device.pwrite(0, b"\xab" * CLUSTER)
    gate.set()
    drainer, done = in_thread(pit0.drain)
    drainer.join(5)
    assert done == [None], "the drain waited for a reap nobody was going to do"
    assert not backup_job(rig.storage, "virtio0").cbw.copies_pending
    rig.check_snapshot()


def test_the_budget_bounds_the_old_data_held(rig: Fleecing, gate: Gate) -> None:
    rig.snapshot(**{"x-perf": {"copy-ahead": 0, "write-behind": 2 * CLUSTER}})
    rig.device.pwrite(0, b"\x01" * CLUSTER)
    rig.device.pwrite(10 * CLUSTER, b"\x02" * CLUSTER)
    writer, done = in_thread(lambda: rig.device.pwrite(20 * CLUSTER, b"\x03" * CLUSTER))
    writer.join(BLOCKED)
    assert writer.is_alive(), "a third copy went over the budget"
    gate.set()
    writer.join(5)
    assert done == [None]
    rig.check_snapshot()


def _failing_target_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct writes into qcow2 targets get a read-only descriptor: they fail with EBADF."""
    original = Qcow2Driver.begin_direct_write

    def begin(self: Qcow2Driver, offset: int, length: int) -> DirectWrite | None:
        direct = original(self, offset, length)
        if direct is not None:
            read_only = os.open(self.filename(), os.O_RDONLY)
            direct.fd = read_only
            direct.finishers.append(lambda _written: os.close(read_only))
        return direct

    monkeypatch.setattr(Qcow2Driver, "begin_direct_write", begin)


def test_a_late_failure_breaks_the_snapshot_and_fails_the_job(
    rig: Fleecing, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_target_writes(monkeypatch)
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    rig.device.pwrite(0, b"\xab" * CLUSTER)  # the guest write is not failed: it went on
    pit0 = rig.storage.graph.get("pit0")
    with pytest.raises(OSError) as info:
        pit0.pread(0, CLUSTER)
    assert info.value.errno == errno.EACCES
    assert "broken" in str(info.value)
    error = rig.log.wait("BLOCK_JOB_ERROR", device="virtio0")
    assert error == {"device": "virtio0", "operation": "write", "action": "report"}
    completed = rig.log.wait("BLOCK_JOB_COMPLETED", device="virtio0")
    assert "Bad file descriptor" in completed["error"]
    assert rig.device.pread(0, CLUSTER) == b"\xab" * CLUSTER


def test_under_ignore_the_job_goes_on_with_the_snapshot_broken(
    rig: Fleecing, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_target_writes(monkeypatch)
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}, "on-target-error": "ignore"})
    rig.device.pwrite(0, b"\xab" * CLUSTER)
    with pytest.raises(OSError):
        rig.storage.graph.get("pit0").pread(0, 4096)
    rig.log.wait("BLOCK_JOB_ERROR", device="virtio0", action="ignore")
    (info,) = rig.storage.execute("query-block-jobs")
    assert info["fleecing"]["broken"] is True
    assert "Bad file descriptor" in info["fleecing"]["broken-reason"]
    assert "virtio0" in rig.storage.jobs


def test_a_read_in_flight_when_the_snapshot_breaks_fails(
    rig: Fleecing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot read of clusters not copied yet reads through to the source; if the snapshot
    breaks while it does, the guest may already have written there, so the read must fail."""
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    cbw = backup_job(rig.storage, "virtio0").cbw
    pit0 = rig.storage.graph.get("pit0")
    reading, go_on = threading.Event(), threading.Event()
    original = Qcow2Driver.preadv

    def slow_preadv(self: Qcow2Driver, offset: int, buf: memoryview) -> None:
        if self.node is pit0:
            reading.set()
            go_on.wait(5)
        original(self, offset, buf)

    monkeypatch.setattr(Qcow2Driver, "preadv", slow_preadv)
    reader, got = in_thread(lambda: pit0.pread(0, CLUSTER))
    assert reading.wait(5)
    cbw.break_snapshot("broken by the test")
    go_on.set()
    reader.join(5)
    assert len(got) == 1 and isinstance(got[0], OSError)
    assert got[0].errno == errno.EACCES
    assert "broken by the test" in str(got[0])


def test_cancel_lands_the_pending_copies(rig: Fleecing, gate: Gate) -> None:
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    rig.device.pwrite(1 << 20, b"\xee" * CLUSTER)
    threading.Timer(BLOCKED, gate.set).start()
    rig.storage.execute("block-job-cancel", {"device": "virtio0"})
    rig.log.wait("BLOCK_JOB_CANCELLED", device="virtio0")
    rig.close()
    got = read_image(rig.pit, 2 << 20)  # the target's own cluster, not its backing's new data
    assert got[1 << 20:(1 << 20) + CLUSTER] == b"\xd5" * CLUSTER


def test_write_behind_off_copies_before_the_guest_write(rig: Fleecing) -> None:
    rig.snapshot(**{"x-perf": {"copy-ahead": 0, "write-behind": 0}})
    cbw = backup_job(rig.storage, "virtio0").cbw
    rig.device.pwrite(0, b"\xab" * CLUSTER)
    assert not cbw.copies_pending
    assert rig.storage.graph.get("pit0").block_status(0, CLUSTER).allocated
    rig.check_snapshot()


def test_a_bad_write_behind_value_is_refused(rig: Fleecing) -> None:
    with pytest.raises(GenericError, match=r"'x-perf\.write-behind' expects a non-negative"):
        rig.snapshot(**{"x-perf": {"write-behind": -1}})
    assert rig.storage.jobs == {}
