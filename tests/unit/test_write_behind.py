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
- **The ring cannot overflow** (on :class:`WriteBehind` itself, over either twin of the file
  writer with a small depth): buffers past the depth wait even before any writer or landing
  exists, and a waiter wakes when a holder submits or gives back; eight copies at once into a
  ring two deep (those holding a buffer meet before submitting) all land; a submit the writer
  refuses returns False with nothing marked done nor pending; a landing whose owner raises does
  not strand the next; ``close`` wakes the copies waiting for room (they get None); the budget
  holds from the first buffer and a copy bigger than the budget goes alone. And on the rig,
  twelve guest threads writing at once right after ``drive-backup`` into a ring two deep: every
  write succeeds, the snapshot holds, cancel ends the job and the target holds the old data.
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
from fleece.block.write_behind import Landing, WriteBehind
from fleece.errors import GenericError
from fleece.filewriter import FileWriter
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
    # clusters holding data (0, 1 MiB, 32 MiB): a cluster reading as zeroes is copied as a
    # zero cluster, which holds no old data in memory
    rig.device.pwrite(0, b"\x01" * CLUSTER)
    rig.device.pwrite(16 * CLUSTER, b"\x02" * CLUSTER)
    writer, done = in_thread(lambda: rig.device.pwrite(512 * CLUSTER, b"\x03" * CLUSTER))
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


# -- the ring and the budget, on WriteBehind itself (either twin of the file writer) ----------
LEN = 4096


class Writer:
    """The selected twin of the file writer, with a chosen depth; it refuses the next
    ``refuse`` submits as a full ring does, and records the most writes ever outstanding."""

    def __init__(self, depth: int) -> None:
        self._real = FileWriter(depth)
        self.refuse = 0
        self.most = 0

    @property
    def depth(self) -> int:
        return self._real.depth

    def outstanding(self) -> int:
        return self._real.outstanding()

    def submit(self, fd: int, offset: int, data: memoryview) -> int:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("the file writer is full: reap finished writes first")
        ticket = self._real.submit(fd, offset, data)  # raises when it really is full
        self.most = max(self.most, self._real.outstanding())
        return ticket

    def written(self) -> int:
        return self._real.written()

    def wait(self, ticket: int) -> None:
        self._real.wait(ticket)

    def reap(self) -> list[tuple[int, int]]:
        return self._real.reap()

    def close(self) -> None:
        self._real.close()


class Ring:
    """A :class:`WriteBehind` over a :class:`Writer` of ``depth`` into a scratch file; records
    what it reports."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, depth: int,
                 budget: int = 1 << 30) -> None:
        self.depth = depth
        self.refuse = 0  # how many submits the next writer made refuses
        self.writers: list[Writer] = []
        monkeypatch.setattr(write_behind, "FileWriter", self._make)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.landed: list[int] = []
        self.failed: list[tuple[int, OSError]] = []
        self.marked: list[int] = []
        self.finished: list[tuple[int, bool]] = []
        self.raise_when_landed: set[int] = set()  # landings whose owner fails when told
        self.behind = WriteBehind(budget, self._landed,
                                  lambda landing, exc: self.failed.append((landing.first, exc)))

    def _landed(self, landing: Landing) -> None:
        self.landed.append(landing.first)
        if landing.first in self.raise_when_landed:
            raise RuntimeError("the owner failed")

    def _make(self, depth: int = 64) -> Writer:
        self.writers.append(Writer(self.depth))
        self.writers[-1].refuse, self.refuse = self.refuse, 0
        return self.writers[-1]

    def landing(self, index: int, buf: bytearray, length: int = LEN) -> Landing:
        """Landing ``index``: cluster ``index``, its data (``index`` repeated) at ``index *
        length`` of the file."""
        buf[:length] = bytes([index]) * length
        direct = DirectWrite(self.fd, index * length, length,
                             [lambda written: self.finished.append((index, written))])
        return Landing(index, 1, buf, length, direct)

    def submit(self, index: int, buf: bytearray, length: int = LEN) -> bool:
        return self.behind.submit(self.landing(index, buf, length),
                                  lambda: self.marked.append(index))

    def close(self) -> None:
        closer, done = in_thread(self.behind.close)
        closer.join(5)
        assert done == [None], "close did not finish"

    def content(self, count: int, length: int = LEN) -> bytes:
        return os.pread(self.fd, count * length, 0)


@pytest.fixture
def ring_dir(tmp_path: Path) -> Path:
    return tmp_path / "target.bin"


def test_buffers_past_the_depth_wait_even_before_any_writer_exists(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the depth was only checked once a writer existed and a landing was pending,
    so more copies than the ring is deep held buffers at once and the later submits overflowed
    it."""
    ring = Ring(ring_dir, monkeypatch, depth=2)
    first, second = ring.behind.buffer(LEN), ring.behind.buffer(LEN)
    assert first is not None and second is not None
    waiter, got = in_thread(lambda: ring.behind.buffer(LEN))
    waiter.join(BLOCKED)
    assert waiter.is_alive(), "a third buffer was handed out with a ring two deep"
    ring.behind.give_back(first, LEN)
    waiter.join(5)
    assert len(got) == 1 and isinstance(got[0], bytearray)
    assert ring.submit(1, second) and ring.submit(2, got[0])
    ring.close()
    assert ring.landed == [1, 2] and ring.failed == []
    assert ring.content(3) == bytes(LEN) + b"\x01" * LEN + b"\x02" * LEN


def test_a_wait_for_room_ends_when_the_holder_submits(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room is held by a buffer not submitted yet, with no landing pending: the waiter must
    not sleep through the submit (nor wait for a landing that does not exist yet)."""
    ring = Ring(ring_dir, monkeypatch, depth=1)
    held = ring.behind.buffer(LEN)
    assert held is not None
    waiter, got = in_thread(lambda: ring.behind.buffer(LEN))
    waiter.join(BLOCKED)
    assert waiter.is_alive(), "a second buffer was handed out with a ring one deep"
    assert ring.submit(0, held)
    waiter.join(5)
    assert len(got) == 1 and isinstance(got[0], bytearray)
    assert ring.submit(1, got[0])
    ring.close()
    assert ring.landed == [0, 1]
    assert max(writer.most for writer in ring.writers) <= 1


def test_more_copies_than_the_ring_is_deep_all_land(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight copies at once into a ring two deep: each buffer() that would overflow it waits,
    so every submit is accepted and every landing lands. The copies that got a buffer meet
    before submitting (all eight did, before the fix), so the overflow is not left to timing."""
    ring = Ring(ring_dir, monkeypatch, depth=2)
    copies = 8
    arrived = threading.Condition()
    count = [0]

    def copy(index: int) -> bool:
        buf = ring.behind.buffer(LEN)
        assert buf is not None
        with arrived:
            count[0] += 1
            arrived.notify_all()
            arrived.wait_for(lambda: count[0] >= copies, timeout=BLOCKED)
        return ring.submit(index, buf)

    threads = [in_thread(lambda i=i: copy(i)) for i in range(copies)]  # type: ignore[misc]
    for thread, _ in threads:
        thread.join(10)
    assert [outcome for _, outcome in threads] == [[True]] * copies
    ring.close()
    assert sorted(ring.landed) == list(range(copies)) and ring.failed == []
    assert sorted(ring.marked) == list(range(copies))
    assert max(writer.most for writer in ring.writers) <= 2
    assert ring.content(copies) == b"".join(bytes([i]) * LEN for i in range(copies))


def test_a_refused_submit_marks_nothing_and_leaves_nothing_pending(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the landing was queued and its clusters marked copied before the writer
    refused it, so they counted as copied with no data ever written, and the landing (ticket
    -1) stayed pending for good (``AssertionError((-1, 64))`` at the next reap, close never
    returning)."""
    ring = Ring(ring_dir, monkeypatch, depth=4)
    ring.refuse = 1
    buf = ring.behind.buffer(LEN)
    assert buf is not None
    assert ring.submit(0, buf) is False  # the caller copies synchronously instead
    assert ring.marked == [] and not ring.behind.pending()
    assert ring.finished == []  # the reservation is still the caller's to finish
    ring.behind.give_back(buf, LEN)
    again = ring.behind.buffer(LEN)
    assert again is not None and ring.submit(1, again)
    ring.behind.reap()
    ring.close()
    assert ring.marked == [1] and ring.landed == [1] and ring.finished == [(1, True)]


def test_a_landing_whose_owner_raises_does_not_strand_the_next(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while finishing one landing unwinds that landing whole and still finishes
    the others the same reap collected; none stays pending behind it."""
    ring = Ring(ring_dir, monkeypatch, depth=4)
    ring.raise_when_landed.add(0)
    buffers = [ring.behind.buffer(LEN) for _ in range(2)]
    for index, buf in enumerate(buffers):
        assert buf is not None and ring.submit(index, buf)
    ring.writers[0].wait(1)
    with pytest.raises(RuntimeError, match="the owner failed"):
        ring.behind.reap()
    assert ring.landed == [0, 1] and not ring.behind.pending()
    assert ring.finished == [(0, True), (1, True)]
    ring.close()


def test_close_wakes_the_copies_waiting_for_room(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = Ring(ring_dir, monkeypatch, depth=1)
    held = ring.behind.buffer(LEN)
    assert held is not None
    waiter, got = in_thread(lambda: ring.behind.buffer(LEN))
    waiter.join(BLOCKED)
    assert waiter.is_alive(), "a second buffer was handed out with a ring one deep"
    ring.close()
    waiter.join(5)
    assert got == [None]  # closed: the copy is made synchronously
    assert ring.submit(0, held) is False and ring.marked == []
    ring.behind.give_back(held, LEN)


def test_the_budget_holds_from_the_first_buffer_and_a_big_copy_goes_alone(
    ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = Ring(ring_dir, monkeypatch, depth=8, budget=2 * LEN)
    big = ring.behind.buffer(3 * LEN)  # over the budget, but nothing else is held: no wait
    assert big is not None
    waiter, got = in_thread(lambda: ring.behind.buffer(LEN))
    waiter.join(BLOCKED)
    assert waiter.is_alive(), "a buffer was handed out over the budget"
    assert ring.submit(0, big, 3 * LEN)
    waiter.join(5)  # the big landing lands, and its bytes leave the budget
    assert len(got) == 1 and isinstance(got[0], bytearray)
    assert ring.submit(1, got[0])
    ring.close()
    assert ring.landed == [0, 1] and ring.failed == []


def test_more_guest_writers_than_the_ring_is_deep_right_after_drive_backup(
    rig: Fleecing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's case, deterministic: a ring two deep, twelve guest threads writing
    distinct clusters at once; the copies that got a buffer meet before submitting. Every
    guest write succeeds, the snapshot holds, and cancel ends the job."""
    writers: list[Writer] = []

    def make(depth: int = 64) -> Writer:
        writers.append(Writer(2))
        return writers[-1]

    monkeypatch.setattr(write_behind, "FileWriter", make)
    threads = 12
    arrived = threading.Condition()
    count = [0]
    original = WriteBehind.submit

    def submit(self: WriteBehind, landing: Landing, mark_done: Callable[[], None]) -> bool:
        with arrived:
            count[0] += 1
            arrived.notify_all()
            arrived.wait_for(lambda: count[0] >= threads, timeout=BLOCKED)
        return original(self, landing, mark_done)

    monkeypatch.setattr(WriteBehind, "submit", submit)
    offsets = [(2 + 4 * i) * CLUSTER for i in range(threads)]
    for offset in offsets:  # old data worth copying
        rig.device.pwrite(offset, b"\x77" * CLUSTER)
        rig.expected[offset:offset + CLUSTER] = b"\x77" * CLUSTER
    rig.snapshot(**{"x-perf": {"copy-ahead": 0}})
    guests = [in_thread(lambda o=o: rig.device.pwrite(o, b"\xee" * CLUSTER))  # type: ignore[misc]
              for o in offsets]
    for thread, _ in guests:
        thread.join(10)
    assert [outcome for _, outcome in guests] == [[None]] * threads
    assert max(writer.most for writer in writers) <= 2
    rig.check_snapshot()
    rig.storage.execute("block-job-cancel", {"device": "virtio0"})
    rig.log.wait("BLOCK_JOB_CANCELLED", device="virtio0")
    rig.close()
    image = read_image(rig.pit)
    for offset in offsets:  # the target's own clusters hold the old data
        assert image[offset:offset + CLUSTER] == b"\x77" * CLUSTER
