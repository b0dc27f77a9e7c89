"""Regression tests for the snapshot defects issue #13's review reproduced (1, 2, 4 and 5).

Each test stops one request inside a driver at the moment the review found dangerous, lets
another thread act, and checks the outcome is one that some single instant explains. The
pauses are bounded: where the fixed code makes the other thread wait for the paused request
(the drained sections, the snapshot's hold), the test lets the paused request go after
``GRACE`` seconds and then checks which order things really happened in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.driver import BlockStatus, Driver
from fleece.block.qcow2 import create
from fleece.storage import Storage

CLUSTER = 64 * 1024
SIZE = 4 * 1024 * 1024
#: how long a test lets the other thread run before it lets the paused request go
GRACE = 0.5
WAIT = 20.0


class Pause:
    """Stops the first call of ``driver.<method>`` for which ``when`` holds, in whatever thread
    makes it, until :meth:`release`. ``entered`` is set once a call stopped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, driver: Driver, method: str,
                 when: Callable[..., bool]) -> None:
        self.entered = threading.Event()
        self._go = threading.Event()
        self._armed = True
        self._lock = threading.Lock()
        original = getattr(driver, method)

        def paused(*args: Any) -> Any:
            with self._lock:
                stop = self._armed and when(*args)
                if stop:
                    self._armed = False
            if stop:
                self.entered.set()
                self._go.wait(WAIT)
            return original(*args)

        monkeypatch.setattr(driver, method, paused)

    def release(self) -> None:
        self._go.set()


class Run:
    """``fn`` in a thread; records when it finished and what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self.result: Any = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    def join(self) -> None:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "thread hung"

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


@pytest.fixture
def storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    """A 4 MiB qcow2 disk ``disk0`` full of 0x11 except cluster 8 (0x88), on ``virtio0``.

    The native data plane stays off: these tests stop requests inside the drivers' Python
    methods, which a native read or write of a mapped range never enters (test_dataplane.py
    has the plane's own defect tests)."""
    monkeypatch.setenv("FLEECE_NO_DATAPLANE", "1")
    image = str(tmp_path / "disk.qcow2")
    create(image, SIZE)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                         "discard": "unmap",
                                         "file": {"driver": "file", "filename": image}})
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                       "drive": "disk0"})
        device = storage.device("virtio0")
        device.pwrite(0, b"\x11" * SIZE)
        device.pwrite(8 * CLUSTER, b"\x88" * CLUSTER)
        yield storage


def fleece(storage: Storage, tmp_path: Path, **extra: Any) -> None:
    storage.execute("drive-backup", {"device": "virtio0", "job-id": "job0", "sync": "none",
                                     "format": "qcow2", "target-id": "pit0",
                                     "target": str(tmp_path / "pit.qcow2"), **extra})


def in_thread(name: str) -> Callable[..., bool]:
    return lambda *args: threading.current_thread().name == name


# -- defect 1: block status over the snapshot ----------------------------------------------------
def status_during_guest_zeroing(storage: Storage, monkeypatch: pytest.MonkeyPatch,
                                query: Callable[[], BlockStatus]) -> BlockStatus:
    """Run ``query`` in a thread, stop it when it asks the source (disk0) for its status, and
    meanwhile let the guest zero cluster 8 (copied first, then zeroed in the source)."""
    disk0 = storage.graph.get("disk0")
    pause = Pause(monkeypatch, disk0.driver, "block_status", in_thread("reader"))
    answers: list[BlockStatus] = []
    reader = threading.Thread(name="reader", target=lambda: answers.append(query()))
    reader.start()
    assert pause.entered.wait(WAIT)
    guest = Run(lambda: storage.device("virtio0").pwrite_zeroes(8 * CLUSTER, CLUSTER, True))
    time.sleep(GRACE)
    pause.release()
    reader.join(WAIT)
    guest.join()
    assert guest.error is None
    (status,) = answers
    return status


def test_block_status_of_the_backing_scheme_target_holds_across_the_walk(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status walk of pit0 steps from the target into the source. A guest zeroing that
    copies cluster 8 and zeroes it in the source must not fall between the two steps: the
    snapshot holds data there, so the answer must not say ZERO."""
    fleece(storage, tmp_path)
    pit0 = storage.graph.get("pit0")
    status = status_during_guest_zeroing(
        storage, monkeypatch, lambda: pit0.block_status_above(8 * CLUSTER, CLUSTER))
    assert not status.zero, f"the snapshot's cluster 8 holds 0x88, status said {status}"
    assert pit0.pread(8 * CLUSTER, CLUSTER) == b"\x88" * CLUSTER


def test_block_status_of_snapshot_access_holds_across_the_look_and_the_query(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """snapshot-access looks at its copied bitmap, then asks the source. A guest zeroing of
    cluster 8 between the two must wait."""
    target = str(tmp_path / "fl.qcow2")
    create(target, SIZE)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "fl",
                                     "file": {"driver": "file", "filename": target}})
    storage.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                     "file": "disk0", "target": "fl"})
    storage.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "snap",
                                     "file": "cbw"})
    snap = storage.graph.get("snap")
    status = status_during_guest_zeroing(
        storage, monkeypatch, lambda: snap.block_status(8 * CLUSTER, CLUSTER))
    assert not status.zero, f"the snapshot's cluster 8 holds 0x88, status said {status}"
    assert snap.pread(8 * CLUSTER, CLUSTER) == b"\x88" * CLUSTER


# -- defect 2: sync=top's initial bitmap -----------------------------------------------------
def test_sync_top_scan_and_the_filter_leave_no_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sync=top skips what the top layer does not allocate. A guest write into such a
    cluster while the scan runs must either come before the point in time (and be in the
    backup) or after it (and not be): with the scan done before the hook, it was neither."""
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    create(base, SIZE)
    create(top, SIZE, backing_file=base, backing_format="qcow2")
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                         "file": {"driver": "file", "filename": base}})
        storage.graph.get("base").pwrite(0, b"\xbb" * SIZE)
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                         "backing": "base",
                                         "file": {"driver": "file", "filename": top}})
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                       "drive": "disk0"})
        device = storage.device("virtio0")
        device.pwrite(0, b"\x01" * CLUSTER)  # the top allocates clusters 0 and 40 only
        device.pwrite(40 * CLUSTER, b"\x02" * CLUSTER)
        disk0 = storage.graph.get("disk0")
        # Stop the scan once it is past cluster 5 (which it found unallocated in the top).
        pause = Pause(monkeypatch, disk0.driver, "block_status",
                      lambda offset, length: offset >= 40 * CLUSTER)
        backup = Run(lambda: storage.execute("drive-backup", {
            "device": "virtio0", "job-id": "job0", "sync": "top", "format": "qcow2",
            "target": str(tmp_path / "backup.qcow2"), "auto-dismiss": False}))
        assert pause.entered.wait(WAIT)
        guest = Run(lambda: device.pwrite(5 * CLUSTER, b"\x55" * CLUSTER))
        time.sleep(GRACE)
        # Done while the scan still runs: before the point in time, which the scan is part
        # of. Otherwise it waits for the drained section and comes after.
        before_instant = guest.done
        pause.release()
        backup.join()
        guest.join()
        assert backup.error is None and guest.error is None
        job = storage.jobs["job0"]
        assert job.wait(WAIT)
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "b", "read-only": True,
                                         "backing": "base", "file": {
                                             "driver": "file",
                                             "filename": str(tmp_path / "backup.qcow2")}})
        got = storage.graph.get("b").pread(5 * CLUSTER, CLUSTER)
        want = b"\x55" if before_instant else b"\xbb"
        assert got == want * CLUSTER, (
            f"the guest write finished {'during' if before_instant else 'after'} the "
            f"scan, but the backup holds {got[:1]!r}")


# -- defect 4: backup start drains the source --------------------------------------------------
def guest_write_of_cluster_8(storage: Storage) -> tuple[threading.Thread, dict[str, Any]]:
    """A guest write of 0x99 over cluster 8 in a thread named "guest" (the name the pauses
    look for); the dict gets its ``error``, if any, and when it ``finished``."""
    outcome: dict[str, Any] = {}

    def write() -> None:
        try:
            storage.device("virtio0").pwrite(8 * CLUSTER, b"\x99" * CLUSTER)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["finished"] = time.monotonic()

    writer = threading.Thread(name="guest", target=write)
    writer.start()
    return writer, outcome


def test_a_write_in_flight_when_the_backup_starts_is_before_the_instant(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest write already inside the source when drive-backup runs either finishes before
    the point in time (the drain waits for it) or is copied first; it never lands uncopied
    after the snapshot was taken."""
    disk0 = storage.graph.get("disk0")
    pause = Pause(monkeypatch, disk0.driver, "pwritev", in_thread("guest"))
    writer, outcome = guest_write_of_cluster_8(storage)
    assert pause.entered.wait(WAIT)
    backup = Run(lambda: fleece(storage, tmp_path))
    time.sleep(GRACE)
    pause.release()
    writer.join(WAIT)
    backup.join()
    assert backup.error is None and "error" not in outcome
    before_instant = outcome["finished"] < backup.finished_at
    snapshot = storage.graph.get("pit0").pread(8 * CLUSTER, CLUSTER)
    want = b"\x99" if before_instant else b"\x88"
    assert snapshot == want * CLUSTER, (
        f"the write finished {'before' if before_instant else 'after'} drive-backup "
        f"returned, but the snapshot reads {snapshot[:1]!r}")
    time.sleep(0.05)
    assert storage.graph.get("pit0").pread(8 * CLUSTER, CLUSTER) == snapshot  # and stays


# -- defect 5: a write racing the job's end ---------------------------------------------------
@pytest.mark.parametrize("write_behind", [0, 4 << 20])
def test_a_guest_write_racing_the_jobs_end_does_not_fail(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_behind: int
) -> None:
    """A guest write whose copy is under way when the job is cancelled finishes (the filter
    is removed drained); it never fails because the target closed under it."""
    fleece(storage, tmp_path, **{"x-perf": {"write-behind": write_behind}})
    disk0 = storage.graph.get("disk0")
    # The copy reads the old data from the source: stop the guest's copy there.
    pause = Pause(monkeypatch, disk0.driver, "preadv", in_thread("guest"))
    writer, outcome = guest_write_of_cluster_8(storage)
    assert pause.entered.wait(WAIT)
    cancel = Run(lambda: storage.execute("block-job-cancel", {"device": "job0"}))
    time.sleep(GRACE)
    pause.release()
    writer.join(WAIT)
    cancel.join()
    assert cancel.error is None
    assert "error" not in outcome, f"the guest write failed: {outcome.get('error')!r}"
    assert storage.device("virtio0").pread(8 * CLUSTER, CLUSTER) == b"\x99" * CLUSTER
