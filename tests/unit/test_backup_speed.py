"""A backup job's ``speed`` counts every byte the job covers, as QEMU's block-copy rate limit does.

QEMU's backup (block/backup.c over block/block-copy.c) passes every task through its rate limit
before running it, whether the task copies data or, for clusters that read as zeroes, writes
zeroes: a ``sync=full`` backup of an empty disk at ``speed`` takes about ``len / speed``. Only
what is outside the job's range from its start (``sync=top``: what the top layer does not
allocate; ``sync=bitmap``: clean clusters) costs no time. The tests give a lower bound only
(a loaded machine is slower, never faster), with a speed chosen so each takes about 1.5 s.
"""

from __future__ import annotations

import time
from pathlib import Path

from fleece.block.qcow2 import create
from fleece.storage import Storage
from tests.events import EventLog

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
#: 64 MiB at this speed takes 1.6 s
SPEED = 40 * MiB
#: slack below len / speed: the job may finish its last chunk without sleeping after it
SLACK = 0.75


def open_storage(tmp: Path) -> tuple[Storage, EventLog]:
    image = str(tmp / "src.qcow2")
    create(image, SIZE)
    storage = Storage()
    log = EventLog()
    storage.subscribe(log)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                     "file": {"driver": "file", "filename": image}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    return storage, log


def timed_backup(storage: Storage, log: EventLog, target: Path, **extra: object) -> float:
    """Seconds a ``sync=full`` backup at ``SPEED`` takes; checks it covered the whole disk."""
    started = time.monotonic()
    storage.execute("drive-backup", {"device": "virtio0", "job-id": "full", "sync": "full",
                                     "format": "qcow2", "target": str(target), "speed": SPEED,
                                     **extra})
    done = log.wait("BLOCK_JOB_COMPLETED", timeout=30, device="full")
    elapsed = time.monotonic() - started
    assert "error" not in done and done["offset"] == done["len"] == SIZE
    return elapsed


def test_speed_limits_a_backup_of_an_empty_disk(tmp_path: Path) -> None:
    """Every cluster reads as zeroes and the fresh target needs no write at all: the job
    still covers 64 MiB, at ``speed``."""
    storage, log = open_storage(tmp_path)
    try:
        elapsed = timed_backup(storage, log, tmp_path / "t.qcow2")
    finally:
        storage.close()
    assert elapsed >= SLACK * SIZE / SPEED, elapsed


def read_image(path: Path) -> bytes:
    """The guest-visible bytes of a qcow2 image (through its backing file)."""
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "img",
                                         "file": {"driver": "file", "filename": str(path)}})
        return storage.graph.get("img").pread(0, SIZE)


def test_speed_counts_zeroes_and_data_alike(tmp_path: Path) -> None:
    """Half the disk data, half zeroes (some of them qcow2 zero clusters), into an existing
    target that holds other data, so the zeroes are written as zeroes: 64 MiB at ``speed``,
    and the target then reads as the source."""
    target = tmp_path / "t.qcow2"
    create(str(target), SIZE)
    with Storage() as old:
        old.execute("blockdev-add", {"driver": "qcow2", "node-name": "old",
                                     "file": {"driver": "file", "filename": str(target)}})
        old.graph.get("old").pwrite(0, b"\xee" * SIZE)
    storage, log = open_storage(tmp_path)
    try:
        device = storage.device("virtio0")
        for offset in range(0, SIZE, 2 * MiB):
            device.pwrite(offset, b"\x5a" * MiB)
        device.pwrite(MiB, b"\x5a" * 512 * KiB)
        device.pwrite_zeroes(MiB, 512 * KiB)  # allocated zero clusters
        want = device.pread(0, SIZE)
        elapsed = timed_backup(storage, log, target, mode="existing")
    finally:
        storage.close()
    assert elapsed >= SLACK * SIZE / SPEED, elapsed
    assert read_image(target) == want
