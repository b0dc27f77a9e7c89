"""Image fleecing through :class:`fleece.storage.Storage`: the point-in-time invariant and jobs.

What is tested (everything through ``Storage.execute`` and the device, as a harness drives it;
images are qcow2 made by :func:`fleece.block.qcow2.create` and read back with fleece only):

- **QEMU's iotest 222 scenario**: a 64 MiB source with the patterns 0x5d@0, 0xd5@1M, 0xdc@32M and
  0xcd@0x3ff0000 (64 KiB each), a snapshot by ``drive-backup sync=none target-id=pit0``, guest
  writes 0xab@0, 0xad@0xf8000, 0x1d@0x2008000, 0xea@0x3fe0000; the snapshot reads the original
  patterns and zeroes everywhere else (all 64 MiB compared), the device reads the new data, the
  job copied exactly the 6 clusters the writes touched, and cancel sends
  ``BLOCK_JOB_CANCELLED`` with ``len`` 67108864. The same with ``blockdev-backup`` into a
  pre-created qcow2 whose backing is the source (the way iotest 222 builds it).
- **Lifecycle of the original design**: an export-like user holds pit0; the job is cancelled;
  the export still reads the snapshot; once released, pit0 leaves ``query-named-block-nodes``
  and its file stays on disk; with ``target-temporary=true`` the file goes when the node closes.
- **drive-backup errors**: job id in use, target-id in use (no file created), blockdev-del of
  a node a job uses (``is busy: block device is in use by block job: backup``), a running
  backup's target used as another backup's source or target, a source and target of different
  sizes; and one source feeding two fleecing jobs at once, each keeping its own point in time.
  A copy that cannot be written to the target fails the guest write and keeps the source. A
  drive-backup whose target file is an image in use (the source's own file, or a running job's
  target) is refused and leaves that file intact.
- **Concurrency property** (Hypothesis, 10 examples): writer threads write, zero and discard
  (the source is opened with ``discard=unmap``, so discards do drop data and go through
  copy-before-write) random aligned and unaligned ranges through the device while reader
  threads read the whole snapshot again and again (in requests of 64 KiB to 3 MiB, aligned or
  not, as NBD clients do); every read equals the point-in-time content; every cluster the
  writes touched was copied, each copied cluster exactly once (``cbw.copied_clusters`` equals
  the clusters marked done). The copies are not *exactly* the distinct clusters overwritten:
  a sequential guest stream makes copy-before-write copy ahead (``COPY_AHEAD_BYTES``), into
  clusters the guest never touched; with ``x-perf.copy-ahead: 0`` they are exactly those.
  Snapshot reads that keep overlapping one cluster do not starve a guest write to it (a
  waiting exclusive range lock goes before new shared ones).
- **sync=full** under concurrent guest writes: after ``BLOCK_JOB_COMPLETED`` (no error) the
  target (reopened in a fresh Storage) holds the point-in-time content and every cluster was
  copied exactly once. **sync=top** copies only the top layer's clusters (content through the
  target's backing equals the source), and a zero cluster of the top layer over data in the
  backing reads as zeroes in the target too. **blockdev-backup** into a pre-created node
  overwrites stale data there. Regressions of races found here (the guest request is injected
  deterministically just before the job skips a chunk's zero clusters): a guest
  ``write_zeroes`` over data must not erase the copied point-in-time data from the target, and
  a guest write into a zero area must not make ``offset`` overshoot ``len``.
- **block-stream** (``base <- mid <- top``, base-node=base) and **block-commit** (mid into base):
  the guest content never changes; after completion the backing of top is base (in the node
  graph and in top's image header) and mid is closed and gone; active commit is refused.
- **Shutdown**: ``Storage.close()`` with a running sync=none job sends ``BLOCK_JOB_CANCELLED``
  and closes every node, leaving the files on disk.

Run on the compiled extensions and with ``FLEECE_NO_EXTENSIONS=1`` (the pure twins); every test
is bounded (``pytest-timeout`` 20 s; waits for events time out after a few seconds).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleece.block.cbw import COPY_AHEAD_BYTES, CopyBeforeWrite
from fleece.block.copy_ahead import GROWTH
from fleece.block.device import Device
from fleece.block.node import BlockNode, UserKind
from fleece.block.perm import Perm
from fleece.block.qcow2 import create
from fleece.errors import DeviceNotFound, GenericError
from fleece.jobs.backup import BackupJob
from fleece.storage import Storage
from tests.events import EventLog

pytestmark = pytest.mark.timeout(20)

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
WAIT = 8.0

#: iotest 222: (pattern, offset) written before the snapshot, and the guest writes after it
PATTERNS_BEFORE = ((0x5D, 0), (0xD5, 1 * MiB), (0xDC, 32 * MiB), (0xCD, 0x3FF0000))
PATTERNS_AFTER = ((0xAB, 0), (0xAD, 0xF8000), (0x1D, 0x2008000), (0xEA, 0x3FE0000))


def open_storage(image: str, node: str = "disk0", device: str | None = "virtio0",
                 **extra: Any) -> tuple[Storage, EventLog]:
    """A Storage with ``image`` (qcow2) as ``node`` and, unless None, ``device`` on it."""
    storage = Storage()
    log = EventLog()
    storage.subscribe(log)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": node,
                                     "file": {"driver": "file", "filename": image}, **extra})
    if device is not None:
        storage.execute("device_add", {"driver": "virtio-blk", "id": device, "drive": node})
    return storage, log


def read_image(path: str, length: int | None = None) -> bytes:
    """What a fresh Storage reads from the qcow2 image at ``path`` (its chain included)."""
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "check",
                                         "file": {"driver": "file", "filename": path},
                                         "read-only": True})
        node = storage.graph.get("check")
        return node.pread(0, node.size if length is None else length)


def first_difference(got: bytes, want: bytes) -> str:
    """A short description of where two byte strings first differ (for assertion messages)."""
    if len(got) != len(want):
        return f"lengths differ: {len(got)} != {len(want)}"
    a = np.frombuffer(got, dtype=np.uint8)
    b = np.frombuffer(want, dtype=np.uint8)
    bad = np.flatnonzero(a != b)
    if not len(bad):
        return "equal"
    at = int(bad[0])
    return (f"{len(bad)} bytes differ; first at {at:#x} (cluster {at // CLUSTER}): "
            f"got {got[at]:#04x}, want {want[at]:#04x}")


def sector_pattern(size: int) -> bytes:
    """Every 512-byte sector filled with its own number (little-endian u32s): no two alike."""
    sectors = np.arange(size // 512, dtype="<u4")
    return bytes(np.repeat(sectors, 128).tobytes())


def fill(device: Device, data: bytes, chunk: int = 4 * MiB) -> None:
    for offset in range(0, len(data), chunk):
        device.pwrite(offset, data[offset:offset + chunk])


def backup_job(storage: Storage, job_id: str) -> BackupJob:
    job = storage.jobs[job_id]
    assert isinstance(job, BackupJob)
    return job


def node_names(storage: Storage) -> set[str]:
    return {info["node-name"] for info in storage.execute("query-named-block-nodes")}


def touched_clusters(offset: int, length: int) -> range:
    return range(offset // CLUSTER, -(-(offset + length) // CLUSTER))


# --------------------------------------------------------------------------------------------
# iotest 222
# --------------------------------------------------------------------------------------------


class Fleecing:
    """iotest 222's setup: a 64 MiB source with the four patterns, on device virtio0."""

    SIZE = 64 * MiB

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.src = str(tmp / "src.qcow2")
        self.pit = str(tmp / "pit.qcow2")
        create(self.src, self.SIZE)
        self.storage, self.log = open_storage(self.src)
        self.device = self.storage.device("virtio0")
        self.expected = bytearray(self.SIZE)
        for pattern, offset in PATTERNS_BEFORE:
            self.device.pwrite(offset, bytes([pattern]) * CLUSTER)
            self.expected[offset:offset + CLUSTER] = bytes([pattern]) * CLUSTER

    def snapshot(self, **extra: Any) -> None:
        self.storage.execute("drive-backup", {
            "device": "virtio0", "target": self.pit, "format": "qcow2", "target-id": "pit0",
            "sync": "none", **extra,
        })

    def guest_writes(self) -> None:
        for pattern, offset in PATTERNS_AFTER:
            self.device.pwrite(offset, bytes([pattern]) * CLUSTER)

    def check_snapshot(self, node: str = "pit0") -> None:
        got = self.storage.graph.get(node).pread(0, self.SIZE)
        assert got == self.expected, first_difference(got, bytes(self.expected))

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def fleecing(tmp_path: Path) -> Iterator[Fleecing]:
    rig = Fleecing(tmp_path)
    yield rig
    rig.close()


def test_iotest_222_snapshot_reads_the_point_in_time(fleecing: Fleecing) -> None:
    fleecing.snapshot()
    fleecing.check_snapshot()  # before any guest write, too
    fleecing.guest_writes()
    for pattern, offset in PATTERNS_AFTER:
        assert fleecing.device.pread(offset, CLUSTER) == bytes([pattern]) * CLUSTER
    fleecing.check_snapshot()
    job = backup_job(fleecing.storage, "virtio0")
    touched = {c for _, offset in PATTERNS_AFTER for c in touched_clusters(offset, CLUSTER)}
    assert len(touched) == 6
    assert job.cbw.copied_clusters == 6
    (info,) = fleecing.storage.execute("query-block-jobs")
    assert info["type"] == "backup" and info["device"] == "virtio0"
    assert info["len"] == 64 * MiB and info["offset"] == 6 * CLUSTER
    fleecing.storage.execute("block-job-cancel", {"device": "virtio0"})
    cancelled = fleecing.log.wait("BLOCK_JOB_CANCELLED")
    assert cancelled == {"type": "backup", "device": "virtio0", "len": 67108864,
                         "offset": 6 * CLUSTER, "speed": 0}
    assert "BLOCK_JOB_COMPLETED" not in fleecing.log.names()


def test_iotest_222_with_blockdev_backup_into_a_precreated_overlay(fleecing: Fleecing) -> None:
    """iotest 222 itself: blockdev-add a qcow2 whose backing is the source node, then
    blockdev-backup sync=none into it."""
    create(fleecing.pit, Fleecing.SIZE, backing_file=fleecing.src, backing_format="qcow2")
    fleecing.storage.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "tgt", "backing": "disk0",
        "file": {"driver": "file", "filename": fleecing.pit},
    })
    fleecing.storage.execute("blockdev-backup", {"device": "disk0", "target": "tgt",
                                                 "sync": "none", "job-id": "fleecing"})
    fleecing.guest_writes()
    fleecing.check_snapshot("tgt")
    assert backup_job(fleecing.storage, "fleecing").cbw.copied_clusters == 6
    with pytest.raises(GenericError, match="is busy: block device is in use by block job: "
                                           "backup"):
        fleecing.storage.execute("blockdev-del", {"node-name": "tgt"})
    fleecing.storage.execute("block-job-cancel", {"device": "fleecing"})
    fleecing.log.wait("BLOCK_JOB_CANCELLED", device="fleecing", len=64 * MiB)
    fleecing.check_snapshot("tgt")
    fleecing.storage.execute("blockdev-del", {"node-name": "tgt"})
    assert "tgt" not in node_names(fleecing.storage)


def test_lifecycle_export_outlives_the_job(fleecing: Fleecing) -> None:
    fleecing.snapshot()
    pit0 = fleecing.storage.graph.get("pit0")
    export = pit0.add_user(UserKind.EXPORT, "exported via NBD as 'pit0'", Perm.CONSISTENT_READ,
                           Perm.all())
    fleecing.guest_writes()
    fleecing.storage.execute("block-job-cancel", {"device": "virtio0"})
    fleecing.log.wait("BLOCK_JOB_CANCELLED")
    assert fleecing.storage.execute("query-block-jobs") == []
    assert "pit0" in node_names(fleecing.storage)
    fleecing.check_snapshot()  # the export still reads the snapshot
    with pytest.raises(GenericError, match="pit0"):  # busy, and not the monitor's anyway
        fleecing.storage.execute("blockdev-del", {"node-name": "pit0"})
    assert "pit0" in node_names(fleecing.storage)
    export.release()
    assert pit0.closed
    assert "pit0" not in node_names(fleecing.storage)
    assert node_names(fleecing.storage) == {"disk0", "#block101"}  # the source and its file
    assert os.path.exists(fleecing.pit)
    fleecing.device.pwrite(0, b"\x01" * CLUSTER)  # the guest goes on without copy-before-write
    assert fleecing.device.pread(0, 4) == b"\x01" * 4


def test_lifecycle_without_export_closes_the_target(fleecing: Fleecing) -> None:
    fleecing.snapshot()
    pit0 = fleecing.storage.graph.get("pit0")
    fleecing.storage.execute("block-job-cancel", {"device": "virtio0"})
    fleecing.log.wait("BLOCK_JOB_CANCELLED")
    assert pit0.closed and "pit0" not in node_names(fleecing.storage)
    assert os.path.exists(fleecing.pit)


def test_target_temporary_deletes_the_file_when_the_node_closes(fleecing: Fleecing) -> None:
    fleecing.snapshot(**{"target-temporary": True})
    pit0 = fleecing.storage.graph.get("pit0")
    export = pit0.add_user(UserKind.EXPORT, "exported via NBD as 'pit0'", Perm.CONSISTENT_READ,
                           Perm.all())
    fleecing.guest_writes()
    fleecing.storage.execute("block-job-cancel", {"device": "virtio0"})
    fleecing.log.wait("BLOCK_JOB_CANCELLED")
    assert os.path.exists(fleecing.pit)  # still open: the export holds it
    fleecing.check_snapshot()
    export.release()
    assert pit0.closed
    assert not os.path.exists(fleecing.pit)
    assert os.path.exists(fleecing.src)


# --------------------------------------------------------------------------------------------
# drive-backup errors and two jobs on one source
# --------------------------------------------------------------------------------------------


def test_drive_backup_job_id_in_use(fleecing: Fleecing) -> None:
    fleecing.snapshot()
    other = str(fleecing.tmp / "other.qcow2")
    with pytest.raises(GenericError, match="Job ID 'virtio0' already in use"):
        fleecing.storage.execute("drive-backup", {"device": "virtio0", "target": other,
                                                  "format": "qcow2", "sync": "none",
                                                  "target-id": "pit1"})
    assert not os.path.exists(other)
    assert "pit1" not in node_names(fleecing.storage)
    assert list(fleecing.storage.jobs) == ["virtio0"]


@pytest.mark.parametrize("name", ["pit0", "disk0"])
def test_drive_backup_target_id_in_use(fleecing: Fleecing, name: str) -> None:
    fleecing.snapshot()
    other = str(fleecing.tmp / "other.qcow2")
    with pytest.raises(GenericError, match=f"Duplicate nodes with node-name='{name}'"):
        fleecing.storage.execute("drive-backup", {"device": "virtio0", "target": other,
                                                  "format": "qcow2", "sync": "none",
                                                  "target-id": name, "job-id": "j2"})
    assert not os.path.exists(other)
    assert list(fleecing.storage.jobs) == ["virtio0"]
    fleecing.guest_writes()
    fleecing.check_snapshot()


def test_drive_backup_unknown_device(fleecing: Fleecing) -> None:
    with pytest.raises(DeviceNotFound) as info:
        fleecing.storage.execute("drive-backup", {"device": "nope", "target": fleecing.pit,
                                                  "format": "qcow2", "sync": "none"})
    assert info.value.qmp_class == "GenericError"  # as QEMU answers
    assert info.value.desc == "Cannot find device='nope' nor node-name='nope'"
    assert not os.path.exists(fleecing.pit)


def test_node_used_by_a_job_cannot_be_deleted(fleecing: Fleecing) -> None:
    target = str(fleecing.tmp / "tgt.qcow2")
    create(target, Fleecing.SIZE)
    fleecing.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                              "file": {"driver": "file", "filename": target}})
    fleecing.storage.execute("blockdev-backup", {"device": "virtio0", "target": "tgt",
                                                 "sync": "none", "job-id": "j"})
    with pytest.raises(GenericError) as info:
        fleecing.storage.execute("blockdev-del", {"node-name": "tgt"})
    assert "Node 'tgt' is busy: block device is in use by block job: backup" in str(info.value)
    assert "tgt" in node_names(fleecing.storage)
    fleecing.storage.execute("block-job-cancel", {"device": "j"})
    fleecing.log.wait("BLOCK_JOB_CANCELLED", device="j")
    fleecing.storage.execute("blockdev-del", {"node-name": "tgt"})
    assert "tgt" not in node_names(fleecing.storage)


def test_a_running_backups_target_is_no_other_backups_source_or_target(
    fleecing: Fleecing,
) -> None:
    fleecing.snapshot()
    other_src = str(fleecing.tmp / "disk1.qcow2")
    create(other_src, Fleecing.SIZE)
    fleecing.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk1",
                                              "file": {"driver": "file", "filename": other_src}})
    as_source = str(fleecing.tmp / "as-source.qcow2")
    with pytest.raises(GenericError, match="block job: backup"):
        fleecing.storage.execute("drive-backup", {"device": "pit0", "target": as_source,
                                                  "format": "qcow2", "sync": "full",
                                                  "job-id": "j2"})
    assert not os.path.exists(as_source)
    with pytest.raises(GenericError, match="block job: backup"):
        fleecing.storage.execute("blockdev-backup", {"device": "pit0", "target": "disk1",
                                                     "sync": "full", "job-id": "j3"})
    with pytest.raises(GenericError):
        fleecing.storage.execute("blockdev-backup", {"device": "disk1", "target": "pit0",
                                                     "sync": "full", "job-id": "j4"})
    assert list(fleecing.storage.jobs) == ["virtio0"]
    fleecing.guest_writes()
    fleecing.check_snapshot()


def test_blockdev_backup_refuses_mismatched_nodes(fleecing: Fleecing) -> None:
    small = str(fleecing.tmp / "small.qcow2")
    create(small, 1 * MiB)
    fleecing.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "small",
                                              "file": {"driver": "file", "filename": small}})
    with pytest.raises(GenericError, match="different sizes"):
        fleecing.storage.execute("blockdev-backup", {"device": "virtio0", "target": "small",
                                                     "sync": "full"})
    with pytest.raises(GenericError, match="cannot be the same"):
        fleecing.storage.execute("blockdev-backup", {"device": "virtio0", "target": "disk0",
                                                     "sync": "full"})
    with pytest.raises(GenericError, match="nope"):
        fleecing.storage.execute("blockdev-backup", {"device": "virtio0", "target": "nope",
                                                     "sync": "full"})
    assert fleecing.storage.jobs == {}
    fleecing.storage.execute("blockdev-del", {"node-name": "small"})


def test_drive_backup_onto_the_sources_own_file_leaves_it_intact(fleecing: Fleecing) -> None:
    with pytest.raises(GenericError):
        fleecing.storage.execute("drive-backup", {"device": "virtio0", "target": fleecing.src,
                                                  "format": "qcow2", "sync": "none",
                                                  "target-id": "pit0"})
    assert os.path.exists(fleecing.src), "the source image file was deleted"
    got = fleecing.device.pread(0, Fleecing.SIZE)
    assert got == fleecing.expected, first_difference(got, bytes(fleecing.expected))


def test_drive_backup_onto_a_running_targets_file_leaves_it_intact(fleecing: Fleecing) -> None:
    fleecing.snapshot()
    fleecing.guest_writes()
    other_src = str(fleecing.tmp / "disk1.qcow2")
    create(other_src, Fleecing.SIZE)
    fleecing.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk1",
                                              "file": {"driver": "file", "filename": other_src}})
    with pytest.raises(GenericError):
        fleecing.storage.execute("drive-backup", {"device": "disk1", "target": fleecing.pit,
                                                  "format": "qcow2", "sync": "full",
                                                  "job-id": "j2"})
    assert os.path.exists(fleecing.pit), "the running job's target file was deleted"
    fleecing.check_snapshot()


def test_one_source_two_backups_each_with_its_own_point_in_time(tmp_path: Path) -> None:
    size = 16 * MiB
    src = str(tmp_path / "src.qcow2")
    create(src, size)
    storage, log = open_storage(src)
    try:
        device = storage.device("virtio0")
        fill(device, sector_pattern(size))
        t0 = device.pread(0, size)
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "j0", "sync": "none",
                                         "format": "qcow2", "target-id": "pit0",
                                         "target": str(tmp_path / "pit0.qcow2")})
        device.pwrite(0, b"\x11" * (2 * CLUSTER))
        device.pwrite(5 * MiB + 100, b"\x12" * 3000)
        t1 = device.pread(0, size)
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "j1", "sync": "none",
                                         "format": "qcow2", "target-id": "pit1",
                                         "target": str(tmp_path / "pit1.qcow2")})
        device.pwrite(CLUSTER, b"\x21" * (2 * CLUSTER))  # over a cluster j0 has, j1 has not
        device.pwrite(5 * MiB, b"\x22" * CLUSTER)
        device.pwrite(12 * MiB - 10, b"\x23" * 20)
        for node, want in (("pit0", t0), ("pit1", t1)):
            got = storage.graph.get(node).pread(0, size)
            assert got == want, f"{node}: {first_difference(got, want)}"
        assert backup_job(storage, "j0").cbw.copied_clusters == len({0, 1, 2, 80, 191, 192})
        assert backup_job(storage, "j1").cbw.copied_clusters == len({1, 2, 80, 191, 192})
        storage.execute("block-job-cancel", {"device": "j0"})
        log.wait("BLOCK_JOB_CANCELLED", device="j0")
        device.pwrite(8 * MiB, b"\x31" * CLUSTER)
        assert storage.graph.get("pit1").pread(0, size) == t1  # j1 goes on alone
    finally:
        storage.close()


def test_guest_write_is_not_starved_by_a_stream_of_snapshot_reads(fleecing: Fleecing) -> None:
    """Snapshot reads of cluster 0 keep arriving, each overlapping the one before (as from
    several NBD connections); a guest write to cluster 0 must still finish promptly."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    written = threading.Event()

    def snapshot_read() -> None:
        with cbw.read_guard(0, CLUSTER):  # what a snapshot read from the source holds
            time.sleep(0.1)

    def guest_write() -> None:
        fleecing.device.pwrite(0, b"\xab" * CLUSTER)
        written.set()

    readers = [threading.Thread(target=snapshot_read, daemon=True)]
    readers[0].start()
    time.sleep(0.02)
    writer = threading.Thread(target=guest_write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not written.is_set():
        time.sleep(0.05)
        reader = threading.Thread(target=snapshot_read, daemon=True)
        reader.start()
        readers.append(reader)
    finished_in_time = written.is_set()
    for thread in [*readers, writer]:
        thread.join(WAIT)
    assert written.is_set()
    assert finished_in_time, f"the guest write waited behind {len(readers)} snapshot reads"
    fleecing.check_snapshot()


def test_a_failed_copy_fails_the_guest_write_and_keeps_the_source(tmp_path: Path) -> None:
    """The snapshot is never silently wrong: when copy-before-write cannot write the old data
    to the target, the guest write fails (errno kept) and the source keeps its data; a retry
    copies and writes."""
    size = 4 * MiB
    src = str(tmp_path / "src.qcow2")
    raw = tmp_path / "tgt.raw"
    create(src, size)
    with open(raw, "wb") as f:
        f.truncate(size)
    storage, _ = open_storage(src)
    try:
        device = storage.device("virtio0")
        device.pwrite(0, b"\x42" * size)
        storage.execute("blockdev-add", {
            "driver": "raw", "node-name": "tgt",
            "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": str(raw)},
                     "inject-error": [{"event": "write_aio", "errno": 28, "once": True}]},
        })
        storage.execute("blockdev-backup", {"device": "virtio0", "target": "tgt",
                                            "sync": "none", "job-id": "j"})
        with pytest.raises(OSError) as info:
            device.pwrite(CLUSTER + 100, b"\x01" * CLUSTER)
        assert info.value.errno == 28
        assert device.pread(0, size) == b"\x42" * size
        device.pwrite(CLUSTER + 100, b"\x01" * CLUSTER)
        assert device.pread(CLUSTER + 100, CLUSTER) == b"\x01" * CLUSTER
        assert storage.graph.get("tgt").pread(CLUSTER, 2 * CLUSTER) == b"\x42" * (2 * CLUSTER)
        assert backup_job(storage, "j").cbw.copied_clusters == 2
    finally:
        storage.close()


# --------------------------------------------------------------------------------------------
# The concurrency property
# --------------------------------------------------------------------------------------------

PROP_SIZE = 8 * MiB
PROP_CLUSTERS = PROP_SIZE // CLUSTER

Op = tuple[str, int, int]  # (kind, offset, length)


def _clip(offset: int, length: int) -> tuple[int, int]:
    return offset, max(1, min(length, PROP_SIZE - offset))


_aligned = st.tuples(st.integers(0, PROP_CLUSTERS - 1), st.integers(1, 4)).map(
    lambda t: _clip(t[0] * CLUSTER, t[1] * CLUSTER)
)
_unaligned = st.tuples(st.integers(0, PROP_SIZE - 1), st.integers(1, 3 * CLUSTER)).map(
    lambda t: _clip(t[0], t[1])
)
_op: st.SearchStrategy[Op] = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "discard"]),
    st.one_of(_aligned, _unaligned),
).map(lambda t: (t[0], t[1][0], t[1][1]))


def _guest(device: Device, ops: list[Op], marker: int, start: threading.Barrier,
           errors: list[BaseException]) -> None:
    try:
        start.wait(WAIT)
        for kind, offset, length in ops:
            if kind == "write":
                device.pwrite(offset, bytes([marker]) * length)
            elif kind == "zero":
                device.pwrite_zeroes(offset, length)
            else:
                device.pdiscard(offset, length)
    except BaseException as exc:
        errors.append(exc)


def _reader(node: BlockNode, want: bytes, chunk: int, writers_done: threading.Event,
            start: threading.Barrier, reads: list[int], failures: list[str],
            errors: list[BaseException]) -> None:
    """Read the whole snapshot again and again, ``chunk`` bytes per request (as an NBD client
    does), until the writers are done and two more whole passes were read."""
    try:
        start.wait(WAIT)
        count = 0
        while True:
            finished = writers_done.is_set()
            for offset in range(0, PROP_SIZE, chunk):
                length = min(chunk, PROP_SIZE - offset)
                got = node.pread(offset, length)
                if got != want[offset:offset + length]:
                    where = first_difference(got, want[offset:offset + length])
                    failures.append(f"read of {length} bytes at {offset:#x}: {where}")
                    return
            count += 1
            if finished and count >= 2:
                break
        reads.append(count)
    except BaseException as exc:
        errors.append(exc)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plans=st.lists(st.lists(_op, min_size=1, max_size=25), min_size=1, max_size=4),
       nreaders=st.integers(1, 3),
       chunk=st.sampled_from([CLUSTER, 3 * CLUSTER + 512, 1 * MiB, 3 * MiB - 4096]))
def test_snapshot_reads_are_point_in_time_under_concurrent_guest_io(
    plans: list[list[Op]], nreaders: int, chunk: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="fleece-prop-") as tmp:
        src = os.path.join(tmp, "src.qcow2")
        create(src, PROP_SIZE)
        storage, _ = open_storage(src, discard="unmap")
        try:
            device = storage.device("virtio0")
            want = sector_pattern(PROP_SIZE)
            fill(device, want)
            storage.execute("drive-backup", {"device": "virtio0", "job-id": "fleece",
                                             "sync": "none", "format": "qcow2",
                                             "target-id": "pit0",
                                             "target": os.path.join(tmp, "pit.qcow2")})
            pit0 = storage.graph.get("pit0")
            start = threading.Barrier(len(plans) + nreaders)
            writers_done = threading.Event()
            errors: list[BaseException] = []
            failures: list[str] = []
            reads: list[int] = []
            writers = [threading.Thread(target=_guest,
                                        args=(device, ops, 0xA0 + i, start, errors))
                       for i, ops in enumerate(plans)]
            readers = [threading.Thread(target=_reader,
                                        args=(pit0, want, chunk, writers_done, start, reads,
                                              failures, errors))
                       for _ in range(nreaders)]
            for thread in writers + readers:
                thread.start()
            for thread in writers:
                thread.join(WAIT)
            writers_done.set()
            for thread in readers:
                thread.join(WAIT)
            assert not any(t.is_alive() for t in writers + readers), "threads hung"
            assert errors == []
            assert failures == []
            assert len(reads) == nreaders
            got = pit0.pread(0, PROP_SIZE)
            assert got == want, first_difference(got, want)
            touched = {c for ops in plans for _, offset, length in ops
                       for c in touched_clusters(offset, length)}
            cbw = backup_job(storage, "fleece").cbw
            done = {c for c in range(PROP_CLUSTERS) if cbw.done.get(c)}
            assert touched <= done  # every cluster the guest touched was copied first
            assert cbw.copied_clusters == len(done)  # each once, none marked without a copy
            # (exactly the touched clusters only without copy-ahead: see the next test)
        finally:
            storage.close()


def test_fleecing_copies_exactly_the_clusters_the_guest_overwrites(fleecing: Fleecing) -> None:
    """With copy-ahead off (x-perf.copy-ahead=0), as QEMU does: only what a write destroys."""
    fleecing.snapshot(**{"x-perf": {"copy-ahead": 0}})
    for cluster in range(4):  # one sequential guest stream of 4 x 64 KiB
        fleecing.device.pwrite(cluster * CLUSTER, b"\x01" * CLUSTER)
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    assert cbw.copied_clusters == 4
    own = {c for s in fleecing.storage.graph.get("pit0").extents(0, Fleecing.SIZE, above=False)
           if s.allocated for c in touched_clusters(s.offset, s.length)}
    assert own == {0, 1, 2, 3}
    fleecing.check_snapshot()


def test_copy_ahead_copies_a_sequential_stream_in_one_piece(fleecing: Fleecing) -> None:
    """The default copy-ahead: the second write of a sequential stream copies COPY_AHEAD_BYTES
    at once; a random write copies only its own cluster; the snapshot stays exact either way."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    fleecing.device.pwrite(40 * CLUSTER, b"\x02" * CLUSTER)  # not sequential: its cluster only
    assert cbw.copied_clusters == 1
    fleecing.device.pwrite(41 * CLUSTER, b"\x02" * CLUSTER)  # continues it: copies ahead
    assert cbw.copied_clusters == 1 + COPY_AHEAD_BYTES // CLUSTER
    for cluster in range(42, 40 + COPY_AHEAD_BYTES // CLUSTER + 1):
        fleecing.device.pwrite(cluster * CLUSTER, b"\x02" * CLUSTER)  # nothing more to copy
    assert cbw.copied_clusters == 1 + COPY_AHEAD_BYTES // CLUSTER
    fleecing.check_snapshot()


def test_copy_ahead_follows_a_writer_it_does_not_see_and_grows(fleecing: Fleecing) -> None:
    """A sequential writer's writes to the clusters copied ahead need no copy (the native
    plane serves them without copy-before-write hearing of them): its next write here, just
    past the copied window and possibly out of order, still counts as sequential. It copies
    from the window's end (so the writes still in flight find their clusters copied), and the
    window doubles each time, up to GROWTH times copy-ahead. A write elsewhere is another
    writer: its own cluster only, and the windows start small again."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    window = COPY_AHEAD_BYTES // CLUSTER

    def write(cluster: int) -> None:
        fleecing.device.pwrite(cluster * CLUSTER, b"\x03" * CLUSTER)
        cbw.drain()  # write-behind: the copies land

    write(40)
    write(41)  # continues it: copies [41, 41 + window)
    copied, end, size = 1 + window, 41 + window, window
    while end + 2 < cbw.nclusters:
        write(end + 2)  # the writes in the window went by natively; this one lands past it
        size = min(2 * size, GROWTH * window)
        now = min(cbw.nclusters, end + size) - end
        copied, end = copied + now, end + now
        assert cbw.copied_clusters == copied
        assert all(cbw.done.get(c) for c in range(40, end))
    assert size == GROWTH * window
    write(20)  # not sequential: its own cluster only
    write(22)  # nor this one
    assert cbw.copied_clusters == copied + 2
    fleecing.check_snapshot()  # the point in time, whatever was copied


def _hold_the_copier(cbw: CopyBeforeWrite, fail: bool = False
                     ) -> tuple[threading.Event, list[tuple[int, int]]]:
    """Make the copier thread wait for the event returned before each piece (then copy it,
    or fail it with EIO); the list collects the pieces it was given."""
    copier = cbw._ahead_copier
    assert copier is not None
    go = threading.Event()
    pieces: list[tuple[int, int]] = []
    copy_piece = copier._copy

    def held(first: int, end: int) -> object:
        pieces.append((first, end))
        assert go.wait(30)
        if fail:
            raise OSError(5, "the source went away")
        return copy_piece(first, end)

    copier._copy = held
    return go, pieces


def test_a_window_is_copied_beside_the_writer(fleecing: Fleecing) -> None:
    """The write that opens a window waits for its own clusters only: the rest is copied by
    the copier thread, locked before that write went on. A write that reaches it while it is
    being copied waits for it and finds it copied: nothing is copied twice. Since a write
    waited for it, the copier goes on with the next window (twice as large), and stops there:
    nobody waited for that one."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    go, pieces = _hold_the_copier(cbw)
    window = COPY_AHEAD_BYTES // CLUSTER
    fleecing.device.pwrite(40 * CLUSTER, b"\x03" * CLUSTER)
    fleecing.device.pwrite(41 * CLUSTER, b"\x03" * CLUSTER)  # opens [41, 41 + window)
    assert cbw.copied_clusters == 2
    assert not any(cbw.done.get(c) for c in range(42, 41 + window))
    assert cbw.pending.count() == window - 1  # native writes there may wait for the copy
    assert all(cbw.pending.get(c) for c in range(42, 41 + window))
    reached = threading.Thread(target=fleecing.device.pwrite,
                               args=(45 * CLUSTER, b"\x04" * CLUSTER))
    reached.start()
    time.sleep(0.2)
    assert reached.is_alive()  # waits for the piece's lock
    go.set()
    reached.join(30)
    assert not reached.is_alive()
    cbw.drain()
    assert pieces == [(42, 41 + window), (41 + window, 41 + 3 * window)]
    assert all(cbw.done.get(c) for c in range(40, 41 + 3 * window))
    assert cbw.pending.count() == 0
    assert cbw.copied_clusters == 1 + 3 * window  # every cluster once, 45 by the copier
    fleecing.check_snapshot()


def test_the_copier_goes_on_while_the_writer_waits_for_it(fleecing: Fleecing) -> None:
    """A sequential writer faster than the copy (each piece held 0.1 s here) catches up with
    it at every piece. The copier, finding its writer right behind when its pieces run out,
    queues the next window itself: after the stream's first window the writer's thread
    copies nothing (it used to open each window, copying its own cluster, while the copier
    idled). The snapshot is the point in time."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    copier = cbw._ahead_copier
    assert copier is not None
    copy_piece, guest_copy = copier._copy, cbw._guest_copy
    writer_copied: list[int] = []

    def slow_piece(first: int, end: int) -> object:
        time.sleep(0.1)
        return copy_piece(first, end)

    def copied_by_the_writer(first: int, end: int) -> None:
        # Nobody holds these: the writer copies them itself (else it waits for the copier).
        if any(not cbw.done.get(c) and not cbw.pending.get(c) for c in range(first, end)):
            writer_copied.append(first)
        guest_copy(first, end)

    copier._copy = slow_piece
    cbw._guest_copy = copied_by_the_writer  # type: ignore[method-assign]
    stream = range(40, 40 + 8 * MiB // CLUSTER)
    for cluster in stream:
        fleecing.device.pwrite(cluster * CLUSTER, b"\x05" * CLUSTER)
    cbw.drain()
    assert writer_copied == [40, 41]  # its first write, then the one opening the first window
    assert all(cbw.done.get(c) for c in stream)
    assert cbw.copied_clusters <= len(stream) + 2 * GROWTH * COPY_AHEAD_BYTES // CLUSTER
    fleecing.check_snapshot()


def test_a_failed_copy_ahead_leaves_its_clusters_to_the_writer(fleecing: Fleecing) -> None:
    """A background copy that fails copies nothing and lets its lock go: the guest write that
    reaches those clusters copies its own, as if nothing had been copied ahead."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    go, pieces = _hold_the_copier(cbw, fail=True)
    go.set()
    fleecing.device.pwrite(40 * CLUSTER, b"\x03" * CLUSTER)
    fleecing.device.pwrite(41 * CLUSTER, b"\x03" * CLUSTER)
    cbw.drain()
    assert pieces and cbw.copied_clusters == 2
    assert len(cbw.locks) == 0 and cbw.pending.count() == 0
    fleecing.device.pwrite(45 * CLUSTER, b"\x04" * CLUSTER)  # inside the window: 45 alone
    assert cbw.copied_clusters == 3 and cbw.done.get(45) and not cbw.done.get(44)
    fleecing.check_snapshot()


def test_closing_the_filter_drops_the_copies_not_started(fleecing: Fleecing) -> None:
    """When the filter closes, the piece being copied ahead finishes, the others are dropped
    with their locks, and no copier thread is left."""
    fleecing.snapshot()
    cbw = backup_job(fleecing.storage, "virtio0").cbw
    go, pieces = _hold_the_copier(cbw)
    window = COPY_AHEAD_BYTES // CLUSTER
    fleecing.device.pwrite(0, b"\x03" * CLUSTER)
    fleecing.device.pwrite(CLUSTER, b"\x03" * CLUSTER)  # the first window: one piece
    end = 1 + window
    for _ in range(3):  # windows of 2, 4 and 8 pieces
        fleecing.device.pwrite((end + 1) * CLUSTER, b"\x03" * CLUSTER)
        end = cbw.ahead._end
    closing = threading.Thread(target=cbw.detach)
    closing.start()
    time.sleep(0.2)
    assert closing.is_alive()  # the piece under way finishes first
    go.set()
    closing.join(30)
    assert not closing.is_alive()
    assert len(pieces) == 1 and len(cbw.locks) == 0 and cbw.pending.count() == 0
    assert not any(t.name == "fleece-cbw-ahead" and t.is_alive() for t in threading.enumerate())


# --------------------------------------------------------------------------------------------
# sync=full, sync=top, blockdev-backup
# --------------------------------------------------------------------------------------------


def _random_guest_writes(device: Device, size: int, seed: int, count: int,
                         errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(count):
            offset = rng.randrange(size)
            length = min(rng.randrange(1, 3 * CLUSTER), size - offset)
            device.pwrite(offset, bytes([rng.randrange(256)]) * length)
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.parametrize("seed", [1, 2])
def test_sync_full_under_concurrent_guest_writes(tmp_path: Path, seed: int) -> None:
    size = 32 * MiB
    src = str(tmp_path / "src.qcow2")
    target = str(tmp_path / "full.qcow2")
    create(src, size)
    storage, log = open_storage(src)
    try:
        device = storage.device("virtio0")
        want = sector_pattern(size)
        fill(device, want)
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "full", "sync": "full",
                                         "format": "qcow2", "target": target,
                                         "speed": 32 * MiB})
        job = backup_job(storage, "full")
        errors: list[BaseException] = []
        writers = [threading.Thread(target=_random_guest_writes,
                                    args=(device, size, seed * 10 + i, 150, errors))
                   for i in range(3)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(WAIT)
        done = log.wait("BLOCK_JOB_COMPLETED", device="full", timeout=10)
        assert "error" not in done and done["offset"] == done["len"] == size
        assert errors == []
        assert job.cbw.copied_clusters == size // CLUSTER  # each cluster exactly once
    finally:
        storage.close()
    got = read_image(target)
    assert got == want, first_difference(got, want)


class _GuestRequestBeforeZeroSkip:
    """Wraps ``CopyBeforeWrite.skip_zeroes``: the first time the backup job is about to skip
    the clusters of a chunk that read as zero, a guest request lands on ``victim`` first (as it
    may at any moment: the job decides nothing about a chunk before it holds its clusters)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, request: Callable[[], None],
                 victim: int) -> None:
        self.fired = False
        original = CopyBeforeWrite.skip_zeroes

        def skip_zeroes(cbw: CopyBeforeWrite, first: int, end: int, *,
                        target_reads_zero: bool) -> int:
            if not self.fired and first <= victim < end:
                self.fired = True
                request()
            return original(cbw, first, end, target_reads_zero=target_reads_zero)

        monkeypatch.setattr(CopyBeforeWrite, "skip_zeroes", skip_zeroes)


def test_sync_full_keeps_data_the_guest_zeroes_during_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest write_zeroes over data, just before the job skips the zero clusters of its
    chunk, must not erase the copied point-in-time data from a pre-created target (a bug
    found here: the job used to zero every cluster its status query found zero)."""
    size = 4 * MiB
    src = str(tmp_path / "src.qcow2")
    target = str(tmp_path / "tgt.qcow2")
    create(src, size)
    create(target, size)
    storage, log = open_storage(src)
    try:
        device = storage.device("virtio0")
        want = sector_pattern(size)
        fill(device, want)
        victim = 40
        hook = _GuestRequestBeforeZeroSkip(
            monkeypatch, lambda: device.pwrite_zeroes(victim * CLUSTER, CLUSTER), victim)
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": target}})
        storage.execute("blockdev-backup", {"device": "virtio0", "target": "tgt",
                                            "sync": "full", "job-id": "b"})
        done = log.wait("BLOCK_JOB_COMPLETED", device="b")
        assert hook.fired and "error" not in done
        assert done["offset"] == done["len"] == size
        assert device.pread(victim * CLUSTER, CLUSTER) == bytes(CLUSTER)
        got = storage.graph.get("tgt").pread(0, size)
        assert got == want, first_difference(got, want)
    finally:
        storage.close()


def test_sync_full_progress_never_overshoots(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest write into a zero area just before the job skips it: the hook copies it (and
    counts it), the job must not count it again (``offset`` used to overshoot ``len``)."""
    size = 4 * MiB
    src = str(tmp_path / "src.qcow2")
    target = str(tmp_path / "full.qcow2")
    create(src, size)
    storage, log = open_storage(src)
    try:
        device = storage.device("virtio0")
        device.pwrite(0, b"\x01" * MiB)  # data, then 3 MiB of zeroes
        want = device.pread(0, size)
        victim = 40
        hook = _GuestRequestBeforeZeroSkip(
            monkeypatch, lambda: device.pwrite(victim * CLUSTER, b"\x02" * CLUSTER), victim)
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "full", "sync": "full",
                                         "format": "qcow2", "target": target})
        done = log.wait("BLOCK_JOB_COMPLETED", device="full")
        assert hook.fired and "error" not in done
        assert done["offset"] == done["len"] == size
    finally:
        storage.close()
    got = read_image(target)
    assert got == want, first_difference(got, want)


def _chain(tmp: Path, size: int) -> tuple[str, str]:
    """base.qcow2 (0x11 everywhere) <- top.qcow2 (empty); returns both paths."""
    base = str(tmp / "base.qcow2")
    top = str(tmp / "top.qcow2")
    create(base, size)
    storage, _ = open_storage(base, node="base", device=None)
    try:
        storage.graph.get("base").pwrite(0, b"\x11" * size)
    finally:
        storage.close()
    create(top, size, backing_file=base, backing_format="qcow2")
    return base, top


TOP_WRITES = ((0, CLUSTER, 0x22), (3 * CLUSTER + 5, 100, 0x23), (2 * MiB, 4 * CLUSTER, 0x24))


def test_sync_top_copies_only_the_top_layer(tmp_path: Path) -> None:
    size = 4 * MiB
    _, top = _chain(tmp_path, size)
    target = str(tmp_path / "top-backup.qcow2")
    storage, log = open_storage(top)
    try:
        device = storage.device("virtio0")
        for offset, length, value in TOP_WRITES:
            device.pwrite(offset, bytes([value]) * length)
        want = device.pread(0, size)
        source = storage.graph.get("disk0")
        top_allocated = {c for s in source.extents(0, size, above=False) if s.allocated
                         for c in touched_clusters(s.offset, s.length)}
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "top", "sync": "top",
                                         "format": "qcow2", "target": target,
                                         "target-id": "tgt"})
        target_node = storage.graph.get("tgt")
        assert target_node.backing() is source.backing()
        job = backup_job(storage, "top")
        done = log.wait("BLOCK_JOB_COMPLETED", device="top")
        assert "error" not in done and done["offset"] == done["len"] == size
        assert job.cbw.copied_clusters == len(top_allocated)
    finally:
        storage.close()
    with Storage() as check:
        check.execute("blockdev-add", {"driver": "qcow2", "node-name": "t", "read-only": True,
                                       "file": {"driver": "file", "filename": target}})
        node = check.graph.get("t")
        got = node.pread(0, size)
        own = {c for s in node.extents(0, size, above=False) if s.allocated
               for c in touched_clusters(s.offset, s.length)}
    assert got == want, first_difference(got, want)
    assert own == top_allocated


def test_sync_top_keeps_a_zero_cluster_of_the_top_layer(tmp_path: Path) -> None:
    size = 4 * MiB
    _, top = _chain(tmp_path, size)
    target = str(tmp_path / "top-backup.qcow2")
    storage, log = open_storage(top)
    try:
        device = storage.device("virtio0")
        device.pwrite(0, b"\x22" * CLUSTER)
        device.pwrite_zeroes(1 * MiB, CLUSTER)  # a zero cluster in top, over base's 0x11
        want = device.pread(0, size)
        assert want[1 * MiB:1 * MiB + CLUSTER] == bytes(CLUSTER)
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "top", "sync": "top",
                                         "format": "qcow2", "target": target})
        done = log.wait("BLOCK_JOB_COMPLETED", device="top")
        assert "error" not in done
    finally:
        storage.close()
    got = read_image(target)
    assert got == want, first_difference(got, want)


def test_blockdev_backup_into_a_precreated_node(tmp_path: Path) -> None:
    size = 8 * MiB
    src = str(tmp_path / "src.qcow2")
    target = str(tmp_path / "tgt.qcow2")
    create(src, size)
    create(target, size)
    storage, log = open_storage(src)
    try:
        device = storage.device("virtio0")
        device.pwrite(0, b"\x01" * (2 * MiB))
        device.pwrite(5 * MiB + 17, b"\x02" * 1000)
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": target}})
        stale = storage.graph.get("tgt")
        stale.pwrite(0, b"\xee" * size)  # stale data the backup must overwrite, zeroes included
        want = device.pread(0, size)
        storage.execute("blockdev-backup", {"device": "virtio0", "target": "tgt",
                                            "sync": "full", "job-id": "b"})
        device.pwrite(0, b"\x03" * size)  # after the point in time
        done = log.wait("BLOCK_JOB_COMPLETED", device="b")
        assert "error" not in done
        got = stale.pread(0, size)
        assert got == want, first_difference(got, want)
        storage.execute("blockdev-del", {"node-name": "tgt"})
    finally:
        storage.close()
    got = read_image(target)
    assert got == want, first_difference(got, want)


# --------------------------------------------------------------------------------------------
# block-stream and block-commit
# --------------------------------------------------------------------------------------------

CHAIN_SIZE = 4 * MiB


class Chain:
    """base.qcow2 <- mid.qcow2 <- top.qcow2, distinct data in each, top on device virtio0.

    base is a monitor-owned node ``base``; mid is opened inline as top's backing (node name
    ``mid``, owned by that link alone) so it can go away once the chain drops it.
    """

    def __init__(self, tmp: Path) -> None:
        self.paths = {name: str(tmp / f"{name}.qcow2") for name in ("base", "mid", "top")}
        create(self.paths["base"], CHAIN_SIZE)
        create(self.paths["mid"], CHAIN_SIZE, backing_file=self.paths["base"],
               backing_format="qcow2")
        create(self.paths["top"], CHAIN_SIZE, backing_file=self.paths["mid"],
               backing_format="qcow2")
        for name, value, offset, length in (("base", 0x0B, 0, CHAIN_SIZE),
                                            ("mid", 0x0D, 1 * MiB, 2 * MiB),
                                            ("top", 0x07, 1536 * KiB, 64 * KiB)):
            writer = Storage()
            try:
                writer.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": name, "backing": None,
                    "file": {"driver": "file", "filename": self.paths[name]},
                })
                writer.graph.get(name).pwrite(offset, bytes([value]) * length)
            finally:
                writer.close()
        self.storage = Storage()
        self.log = EventLog()
        self.storage.subscribe(self.log)
        self.storage.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "base",
            "file": {"driver": "file", "filename": self.paths["base"]},
        })
        self.storage.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": self.paths["top"]},
            "backing": {"driver": "qcow2", "node-name": "mid", "backing": "base",
                        "file": {"driver": "file", "filename": self.paths["mid"]}},
        })
        self.storage.execute("device_add",
                             {"driver": "virtio-blk", "id": "virtio0", "drive": "top"})
        self.device = self.storage.device("virtio0")
        self.top = self.storage.graph.get("top")
        self.mid = self.storage.graph.get("mid")
        self.base = self.storage.graph.get("base")
        self.content = self.device.pread(0, CHAIN_SIZE)

    def run(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Run a chain job to its end; returns its BLOCK_JOB_COMPLETED data."""
        self.storage.execute(command, {**arguments, "job-id": "chain"})
        done = self.log.wait("BLOCK_JOB_COMPLETED", device="chain")
        got = self.device.pread(0, CHAIN_SIZE)
        assert got == self.content, first_difference(got, self.content)
        return done

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    rig = Chain(tmp_path)
    yield rig
    rig.close()


def test_chain_reads_through_every_layer(chain: Chain) -> None:
    assert chain.top.backing() is chain.mid and chain.mid.backing() is chain.base
    content = chain.content
    assert content[:1 * MiB] == b"\x0b" * MiB
    assert content[1 * MiB:1536 * KiB] == b"\x0d" * (512 * KiB)
    assert content[1536 * KiB:1600 * KiB] == b"\x07" * (64 * KiB)
    assert content[1600 * KiB:3 * MiB] == b"\x0d" * (3 * MiB - 1600 * KiB)
    assert content[3 * MiB:] == b"\x0b" * MiB


@pytest.mark.parametrize("command", ["block-stream", "block-commit"])
def test_chain_jobs_never_change_what_the_guest_reads(chain: Chain, command: str) -> None:
    """Whatever the end of the job, top reads the same before, during and after it."""
    arguments: dict[str, Any] = {"device": "top", "base-node": "base"}
    if command == "block-commit":
        arguments["top-node"] = "mid"
    chain.run(command, arguments)


def test_block_stream_drops_mid(chain: Chain) -> None:
    done = chain.run("block-stream", {"device": "top", "base-node": "base"})
    assert "error" not in done, done["error"]
    assert done["type"] == "stream" and done["len"] == CHAIN_SIZE
    assert chain.top.backing() is chain.base
    assert chain.mid.closed and "mid" not in node_names(chain.storage)
    assert chain.top.driver.backing_filename() == chain.paths["base"]


def test_block_commit_of_mid_into_base(chain: Chain) -> None:
    done = chain.run("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"})
    assert "error" not in done, done["error"]
    assert done["type"] == "commit"
    assert chain.top.backing() is chain.base
    assert chain.mid.closed and "mid" not in node_names(chain.storage)
    assert chain.top.driver.backing_filename() == chain.paths["base"]


def test_block_commit_refuses_the_active_layer(chain: Chain) -> None:
    with pytest.raises(GenericError, match="Active commit is not supported"):
        chain.storage.execute("block-commit", {"device": "top", "base-node": "base"})
    assert chain.storage.jobs == {}


# --------------------------------------------------------------------------------------------
# Shutdown
# --------------------------------------------------------------------------------------------


def test_close_cancels_a_running_fleecing_job_and_closes_every_node(fleecing: Fleecing) -> None:
    fleecing.snapshot()
    pit0 = fleecing.storage.graph.get("pit0")
    export = pit0.add_user(UserKind.EXPORT, "exported via NBD as 'pit0'", Perm.CONSISTENT_READ,
                           Perm.all())
    fleecing.guest_writes()
    nodes = fleecing.storage.graph.nodes()
    assert len(nodes) == 5  # disk0, its file, pit0, its file, the backup's filter
    start = time.monotonic()
    fleecing.storage.close()
    assert time.monotonic() - start < 5
    cancelled = fleecing.log.wait("BLOCK_JOB_CANCELLED", timeout=1)
    assert cancelled["device"] == "virtio0" and cancelled["len"] == 64 * MiB
    assert all(node.closed for node in nodes)
    assert fleecing.storage.graph.nodes() == []
    assert fleecing.storage.jobs == {} and fleecing.storage.devices == {}
    assert export.released
    assert os.path.exists(fleecing.src) and os.path.exists(fleecing.pit)
    with pytest.raises(GenericError, match="shutting down"):
        fleecing.storage.execute("query-block-jobs")
    assert read_image(fleecing.pit, CLUSTER) == bytes([0x5D]) * CLUSTER
