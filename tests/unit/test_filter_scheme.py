"""The copy-before-write filter scheme (QEMU 6.2+): the filter, snapshot-access, its policies.

QEMU's image-fleecing scenario (iotest 222) with the filter and a raw target without backing,
users moved onto the filter when it is inserted, TRIM through snapshot-access, break-guest-write
against break-snapshot on a failing target (blkdebug EIO) and on cbw-timeout, and the target
size limit. Transactions across two disks are in ``test_transaction.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.device import Device
from fleece.block.qcow2 import create
from fleece.errors import GenericError
from fleece.storage import Storage

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
KiB = 1 << 10
SIZE = 64 * MiB
BEFORE = [(0x5D, 0), (0xD5, 1 * MiB), (0xDC, 32 * MiB), (0xCD, 0x3FF0000)]
AFTER = [(0xAB, 0), (0xAD, 0xF8000), (0x1D, 0x2008000), (0xEA, 0x3FE0000)]


def _raw(path: Path, size: int) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


class Disk:
    """A 64 MiB qcow2 source as device virtio0 with the 'before' patterns, and a raw target."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        src = str(tmp / "src.qcow2")
        create(src, SIZE)
        self.storage = Storage()
        self.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                              "file": {"driver": "file", "filename": src}})
        self.storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                            "drive": "src"})
        for pattern, offset in BEFORE:
            self.device.pwrite(offset, bytes([pattern]) * 64 * KiB)
        self.expected = self.device.pread(0, SIZE)

    @property
    def device(self) -> Device:
        return self.storage.device("virtio0")

    def target(self, name: str = "tgt", extra: dict[str, Any] | None = None) -> None:
        path = _raw(self.tmp / f"{name}.raw", SIZE)
        self.storage.execute("blockdev-add", {"driver": "raw", "node-name": name,
                                              "file": {"driver": "file", "filename": path},
                                              **(extra or {})})

    def fleece(self, **options: Any) -> None:
        self.storage.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                              "file": "src", "target": "tgt", **options})
        self.storage.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                              "file": "fl"})

    def guest_writes(self) -> None:
        for pattern, offset in AFTER:
            self.device.pwrite(offset, bytes([pattern]) * 64 * KiB)

    def snapshot(self, offset: int = 0, length: int = SIZE) -> bytes:
        return self.storage.graph.get("acc").pread(offset, length)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path)
    try:
        yield d
    finally:
        d.storage.close()


def test_iotest_222_with_the_filter_and_a_raw_target(disk: Disk) -> None:
    disk.target()
    disk.fleece()
    assert disk.device.node.name == "fl"  # the guest now writes through the filter
    disk.guest_writes()
    assert disk.snapshot() == disk.expected
    live = disk.device.pread(0, SIZE)
    assert live != disk.expected and live[:64 * KiB] == b"\xab" * 64 * KiB
    info = {n["node-name"]: n for n in disk.storage.execute("query-named-block-nodes")}
    fleecing = info["fl"]["image"]["fleecing"]
    # 0xad@0xf8000 and 0x1d@0x2008000 straddle two clusters each, the others one each
    assert fleecing["copied-bytes"] == 6 * 64 * KiB
    assert fleecing["broken"] is False


def test_inserting_the_filter_moves_exports_too(disk: Disk) -> None:
    disk.storage.execute("device_del", {"id": "virtio0"})
    disk.storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src",
                                        "share-rw": True})
    sock = str(disk.tmp / "nbd.sock")
    disk.storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    disk.storage.execute("nbd-server-add", {"device": "src", "name": "live", "writable": True})
    disk.target()
    disk.fleece()
    assert disk.storage.nbd_server is not None
    export = next(iter(disk.storage.nbd_server.exports.values()))
    assert export.node.name == "fl"
    from fleece.nbd.client import NBDClient

    with NBDClient.connect_unix(sock, "live") as client:
        client.pwrite(0, b"\x77" * 4096)  # a write through the export is copied before too
    assert disk.snapshot(0, 64 * KiB) == disk.expected[:64 * KiB]


def test_filter_and_snapshot_access_go_away_in_order(disk: Disk) -> None:
    disk.target()
    disk.fleece()
    with pytest.raises(GenericError, match="is busy"):
        disk.storage.execute("blockdev-del", {"node-name": "fl"})
    disk.storage.execute("blockdev-del", {"node-name": "acc"})
    disk.storage.execute("device_del", {"id": "virtio0"})
    disk.storage.execute("blockdev-del", {"node-name": "fl"})
    disk.storage.execute("blockdev-del", {"node-name": "tgt"})
    names = {n["node-name"] for n in disk.storage.execute("query-named-block-nodes")}
    assert "fl" not in names and "acc" not in names and "src" in names


def test_trim_on_snapshot_access_drops_the_copy_and_stops_cbw(disk: Disk) -> None:
    disk.target()
    disk.fleece()
    acc = disk.storage.graph.get("acc")
    cbw = disk.storage.graph.get("fl").driver.cbw  # type: ignore[attr-defined]
    acc.pdiscard(0, 128 * KiB)  # the reader is done with the first two clusters
    disk.guest_writes()
    assert cbw.copied_bytes == 5 * 64 * KiB  # six clusters touched, cluster 0 not copied
    with pytest.raises(OSError) as info:
        acc.pread(0, 4096)
    assert info.value.errno == errno.EACCES
    assert disk.snapshot(1 * MiB, 64 * KiB) == disk.expected[1 * MiB:1 * MiB + 64 * KiB]


def test_snapshot_access_refuses_writes(disk: Disk) -> None:
    disk.target()
    disk.fleece()
    with pytest.raises(OSError):
        disk.storage.graph.get("acc").pwrite(0, b"x")


def _failing_target(disk: Disk) -> None:
    path = _raw(disk.tmp / "tgt.raw", SIZE)
    disk.storage.execute("blockdev-add", {
        "driver": "blkdebug", "node-name": "tgt",
        "image": {"driver": "raw", "file": {"driver": "file", "filename": path}},
        "inject-error": [{"event": "write_aio", "errno": errno.EIO}],
    })


def test_break_guest_write_fails_the_write_and_keeps_the_snapshot(disk: Disk) -> None:
    _failing_target(disk)
    disk.fleece()  # on-cbw-error defaults to break-guest-write
    with pytest.raises(OSError) as info:
        disk.device.pwrite(0, b"\xab" * 4096)
    assert info.value.errno == errno.EIO
    assert disk.device.pread(0, 4096) == disk.expected[:4096]  # the write did not land
    assert disk.snapshot() == disk.expected


def test_break_snapshot_lets_the_write_through_and_fails_reads(disk: Disk) -> None:
    _failing_target(disk)
    disk.fleece(**{"on-cbw-error": "break-snapshot"})
    disk.device.pwrite(0, b"\xab" * 4096)
    assert disk.device.pread(0, 4096) == b"\xab" * 4096
    with pytest.raises(OSError) as info:
        disk.snapshot(1 * MiB, 4096)
    assert info.value.errno == errno.EACCES
    assert "broken" in str(info.value)


def test_cbw_timeout_breaks_the_snapshot(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    disk.target()
    disk.fleece(**{"on-cbw-error": "break-snapshot", "cbw-timeout": 1})
    cbw = disk.storage.graph.get("fl").driver.cbw  # type: ignore[attr-defined]
    slow_copy = cbw._copy_run

    def stalled(first: int, count: int) -> int:
        import time

        time.sleep(2.5)
        return int(slow_copy(first, count))

    monkeypatch.setattr(cbw, "_copy_run", stalled)
    disk.device.pwrite(0, b"\xab" * 4096)  # returns after the 1 s timeout
    assert cbw.broken is not None and "timed out" in cbw.broken
    with pytest.raises(OSError) as info:
        disk.snapshot(0, 4096)
    assert info.value.errno == errno.EACCES


def test_cbw_timeout_needs_break_snapshot(disk: Disk) -> None:
    disk.target()
    with pytest.raises(GenericError, match="cbw-timeout"):
        disk.fleece(**{"cbw-timeout": 1})


def test_target_size_limit_under_both_policies(disk: Disk) -> None:
    disk.target()
    disk.fleece(**{"target-size-limit": 2 * 64 * KiB})
    disk.device.pwrite(0, b"\x01" * 4096)
    disk.device.pwrite(1 * MiB, b"\x01" * 4096)
    with pytest.raises(OSError) as info:
        disk.device.pwrite(32 * MiB, b"\x01" * 4096)  # a third cluster: over the limit
    assert info.value.errno == errno.ENOSPC
    assert disk.snapshot() == disk.expected


def test_target_size_limit_holds_for_copies_at_once(disk: Disk,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two guest writes whose copies run at the same time, with room for one: the second
    copy finds the first one's bytes claimed and fails with ENOSPC, rather than both passing
    the check before either counted its bytes."""
    disk.target()
    disk.fleece(**{"target-size-limit": 64 * KiB})
    cbw = disk.storage.graph.get("fl").driver.cbw  # type: ignore[attr-defined]
    both_checked = threading.Barrier(2, timeout=1)
    mark_copied = cbw._mark_copied

    def slow_mark(first: int, count: int, length: int) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            both_checked.wait()  # the other copy is past its check too, if it got there
        mark_copied(first, count, length)

    monkeypatch.setattr(cbw, "_mark_copied", slow_mark)
    errors: list[OSError] = []

    def write(offset: int) -> None:
        try:
            disk.device.pwrite(offset, b"\x01" * 4096)
        except OSError as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(at,)) for at in (0, 32 * MiB)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(10)
    assert [e.errno for e in errors] == [errno.ENOSPC]
    assert cbw.copied_bytes == 64 * KiB


def test_target_size_limit_breaks_the_snapshot_instead(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    try:
        disk.target()
        disk.fleece(**{"target-size-limit": 64 * KiB, "on-cbw-error": "break-snapshot"})
        disk.device.pwrite(0, b"\x01" * 4096)
        disk.device.pwrite(1 * MiB, b"\x02" * 4096)  # the guest always wins
        assert disk.device.pread(1 * MiB, 4096) == b"\x02" * 4096
        info = {n["node-name"]: n for n in disk.storage.execute("query-named-block-nodes")}
        assert info["fl"]["image"]["fleecing"]["broken"] is True
    finally:
        disk.storage.close()


def test_snapshot_access_needs_a_filter(disk: Disk) -> None:
    with pytest.raises(GenericError, match="copy-before-write"):
        disk.storage.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                              "file": "src"})
    assert os.path.exists(disk.tmp / "src.qcow2")


def test_filter_with_a_bitmap_reads_fail_outside_it(disk: Disk) -> None:
    """QEMU's fleecing with a bitmap: only the bitmap's dirty clusters are in the snapshot."""
    disk.storage.execute("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    disk.device.pwrite(1 * MiB, bytes([0xD5]) * 64 * KiB)  # same data: only dirties 1 MiB
    disk.target()
    disk.fleece(bitmap={"node": "src", "name": "b0"})
    disk.guest_writes()
    assert disk.snapshot(1 * MiB, 64 * KiB) == disk.expected[1 * MiB:1 * MiB + 64 * KiB]
    with pytest.raises(OSError) as info:
        disk.snapshot(0, 4096)
    assert info.value.errno == errno.EACCES
    cbw = disk.storage.graph.get("fl").driver.cbw  # type: ignore[attr-defined]
    # of the clusters the guest overwrote, only the one at 1 MiB (hit by 0xad@0xf8000) is in it
    assert cbw.copied_bytes == 64 * KiB


def test_backup_job_reports_fleecing_space_and_honours_a_limit(disk: Disk) -> None:
    """The backing scheme too: query-block-jobs and the target node show the bytes copied;
    target-size-limit with break-guest-write refuses the write that would exceed it."""
    pit = str(disk.tmp / "pit.qcow2")
    disk.storage.execute("drive-backup", {"device": "virtio0", "target": pit, "format": "qcow2",
                                          "target-id": "pit0", "sync": "none",
                                          "target-size-limit": 2 * 64 * KiB,
                                          "x-perf": {"copy-ahead": 0}})
    disk.device.pwrite(0, b"\x01" * 4096)
    disk.device.pwrite(1 * MiB, b"\x01" * 4096)
    with pytest.raises(OSError) as info:
        disk.device.pwrite(32 * MiB, b"\x01" * 4096)
    assert info.value.errno == errno.ENOSPC
    job = disk.storage.execute("query-block-jobs")[0]
    assert job["fleecing"]["copied-bytes"] == 2 * 64 * KiB
    nodes = {n["node-name"]: n for n in disk.storage.execute("query-named-block-nodes")}
    assert nodes["pit0"]["fleecing"]["copied-bytes"] == 2 * 64 * KiB
    assert disk.storage.graph.get("pit0").pread(0, SIZE) == disk.expected


def test_a_push_from_snapshot_access_reports_the_fleecing_image(disk: Disk) -> None:
    """query-block-jobs of a backup whose source is a snapshot-access node says what the
    fleecing image holds (issue 16): its name, the bytes copied into it, its size on disk."""
    disk.target()
    disk.fleece()
    disk.guest_writes()
    disk.target("push")
    disk.storage.execute("blockdev-backup", {"device": "acc", "target": "push", "sync": "full",
                                             "job-id": "push", "speed": 1,
                                             "auto-dismiss": False})
    (job,) = disk.storage.execute("query-block-jobs")
    assert job["device"] == "push"
    assert job["snapshot"]["fleecing-image"] == "tgt"
    assert job["snapshot"]["copied-bytes"] == 6 * 64 * KiB
    # zero clusters copied as zeroes take no space: three of the six held data
    assert job["snapshot"]["actual-size"] == 3 * 64 * KiB
    disk.storage.execute("block-job-cancel", {"device": "push"})
