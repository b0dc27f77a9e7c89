"""A cluster that reads as zeroes in the source stays a zero cluster when copied before write.

As QEMU's block-copy does (``COPY_WRITE_ZEROES`` for a range block status calls zero), the copy
writes zeroes into the target instead of data, so the snapshot's block status still reports
zeroes there (``tests/interop/test_snapshot_map.py`` compares the NBD map with
qemu-storage-daemon's). Checked for both schemes, with and without write-behind, over clusters
that read as zeroes because nothing allocates them and over qcow2 zero clusters; the snapshot
still reads the point-in-time bytes. ``sync=bitmap`` keeps copying zeroes as data: an
incremental image must allocate every dirty cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleece.block.cbw import WRITE_BEHIND_BYTES
from fleece.block.driver import Status
from fleece.block.node import BlockNode
from fleece.block.qcow2 import create
from fleece.storage import Storage
from tests.events import EventLog

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
SIZE = 8 * MiB
#: cluster 0 data, cluster 1 unallocated, cluster 2 a qcow2 zero cluster, cluster 3 data
DATA, UNALLOCATED, ZERO_CLUSTER, DATA_AFTER = 0, 1, 2, 3


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    image = str(tmp_path / "src.qcow2")
    create(image, SIZE)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                         "file": {"driver": "file", "filename": image}})
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
        device = storage.device("virtio0")
        device.pwrite(DATA * CLUSTER, b"\x5d" * CLUSTER)
        device.pwrite(ZERO_CLUSTER * CLUSTER, b"\x5e" * CLUSTER)
        device.pwrite_zeroes(ZERO_CLUSTER * CLUSTER, CLUSTER)
        device.pwrite(DATA_AFTER * CLUSTER, b"\x5f" * CLUSTER)
        status = storage.graph.get("src").block_status(ZERO_CLUSTER * CLUSTER, CLUSTER)
        assert status.flags == Status.ALLOCATED | Status.ZERO  # a qcow2 zero cluster
        yield storage


def own_flags(node: BlockNode, cluster: int) -> Status:
    """What the node's own layer says of one cluster."""
    status = node.block_status(cluster * CLUSTER, CLUSTER)
    assert status.length == CLUSTER
    return status.flags


def guest_writes(storage: Storage) -> bytes:
    """The guest overwrites clusters 0-3 in one write; returns what they held before."""
    device = storage.device("virtio0")
    before = device.pread(0, 4 * CLUSTER)
    device.pwrite(0, b"\xab" * 4 * CLUSTER)
    return before


@pytest.mark.parametrize("write_behind", [0, WRITE_BEHIND_BYTES], ids=["sync", "write-behind"])
def test_backing_scheme_keeps_zero_clusters(storage: Storage, tmp_path: Path,
                                            write_behind: int) -> None:
    storage.execute("drive-backup", {
        "device": "virtio0", "job-id": "j", "sync": "none", "format": "qcow2",
        "target": str(tmp_path / "pit.qcow2"), "target-id": "pit0",
        "x-perf": {"copy-ahead": 0, "write-behind": write_behind},
    })
    before = guest_writes(storage)
    pit = storage.graph.get("pit0")
    assert pit.pread(0, 4 * CLUSTER) == before
    assert own_flags(pit, DATA) & Status.DATA
    assert own_flags(pit, DATA_AFTER) & Status.DATA
    for cluster in (UNALLOCATED, ZERO_CLUSTER):
        # the target holds the cluster (its backing, the live disk, has the guest's data now)
        # as a zero cluster, not as 64 KiB of zero data
        assert own_flags(pit, cluster) == Status.ALLOCATED | Status.ZERO, cluster
        status = pit.block_status_above(cluster * CLUSTER, CLUSTER)
        assert status.flags & Status.ZERO and not status.flags & Status.DATA
    job = storage.jobs["j"]
    assert job.offset == 4 * CLUSTER  # zero clusters count as copied, like the others


def test_filter_scheme_keeps_zero_clusters(storage: Storage, tmp_path: Path) -> None:
    target = str(tmp_path / "tgt.qcow2")
    create(target, SIZE)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                     "file": {"driver": "file", "filename": target}})
    storage.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                     "file": "src", "target": "tgt", "x-copy-ahead": 0})
    storage.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                     "file": "fl"})
    before = guest_writes(storage)
    acc, tgt = storage.graph.get("acc"), storage.graph.get("tgt")
    assert acc.pread(0, 4 * CLUSTER) == before
    assert own_flags(tgt, DATA) & Status.DATA
    for cluster in (UNALLOCATED, ZERO_CLUSTER):
        assert not own_flags(tgt, cluster) & Status.DATA, cluster
        flags = own_flags(acc, cluster)
        assert flags & Status.ZERO and not flags & Status.DATA, cluster


def test_sync_bitmap_copies_zeroes_as_data(storage: Storage, tmp_path: Path) -> None:
    """An incremental image allocates every dirty cluster, so that it hides the older backup
    it goes over; a dirty cluster reading as zeroes is copied as data."""
    storage.execute("block-dirty-bitmap-add", {"node": "src", "name": "b"})
    device = storage.device("virtio0")
    device.pwrite_zeroes(4 * CLUSTER, CLUSTER)  # dirty, and reads as zeroes
    target = tmp_path / "inc.qcow2"
    log = EventLog()
    storage.subscribe(log)
    storage.execute("drive-backup", {"device": "virtio0", "job-id": "inc", "sync": "bitmap",
                                     "bitmap": "b", "bitmap-mode": "on-success",
                                     "format": "qcow2", "target": str(target)})
    assert "error" not in log.wait("BLOCK_JOB_COMPLETED", device="inc")
    with Storage() as check:
        check.execute("blockdev-add", {"driver": "qcow2", "node-name": "inc",
                                       "file": {"driver": "file", "filename": str(target)}})
        assert own_flags(check.graph.get("inc"), 4) & Status.DATA
