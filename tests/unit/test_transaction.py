"""``transaction``: all or nothing, one point in time across several disks.

A guest writes an increasing counter to disk a and then to disk b, without pause; a transaction
snapshots both. If the two snapshots were taken at different instants, b's counter could lag
a's by more than the one write in between, or lead it. A failing or aborted transaction leaves
no job and no target node.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.qcow2 import create
from fleece.errors import DeviceNotFound, GenericError
from fleece.storage import Storage

pytestmark = pytest.mark.timeout(60)

SIZE = 16 << 20


@pytest.fixture
def two_disks(tmp_path: Path) -> Iterator[Storage]:
    storage = Storage()
    for name in ("a", "b"):
        path = str(tmp_path / f"{name}.qcow2")
        create(path, SIZE)
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                         "file": {"driver": "file", "filename": path}})
        storage.execute("device_add", {"driver": "virtio-blk", "id": f"vd{name}",
                                       "drive": name})
    try:
        yield storage
    finally:
        storage.close()


def _backup(device: str, target: str, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "drive-backup", "data": {
        "device": device, "target": str(tmp / target), "format": "qcow2", "sync": "none",
        **extra}}


def test_two_disks_one_point_in_time(two_disks: Storage, tmp_path: Path) -> None:
    a, b = two_disks.device("vda"), two_disks.device("vdb")
    stop = threading.Event()
    counter = [0]

    def guest() -> None:
        while not stop.is_set():
            counter[0] += 1
            value = counter[0].to_bytes(8, "little") * 512
            a.pwrite(0, value)
            b.pwrite(0, value)

    thread = threading.Thread(target=guest)
    thread.start()
    try:
        for round_ in range(5):
            two_disks.execute("transaction", {"actions": [
                _backup("vda", f"pa{round_}.qcow2", tmp_path, **{"target-id": f"pa{round_}"}),
                _backup("vdb", f"pb{round_}.qcow2", tmp_path, **{"target-id": f"pb{round_}"}),
            ]})
            snap_a = int.from_bytes(two_disks.graph.get(f"pa{round_}").pread(0, 8), "little")
            snap_b = int.from_bytes(two_disks.graph.get(f"pb{round_}").pread(0, 8), "little")
            # At one instant a holds counter n and b holds n or n - 1.
            assert snap_a - snap_b in (0, 1), (snap_a, snap_b)
            for job in ("vda", "vdb"):
                two_disks.execute("block-job-cancel", {"device": job})
                two_disks.jobs[job].join(10)
    finally:
        stop.set()
        thread.join()


def test_a_failing_action_leaves_no_job(two_disks: Storage, tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound) as info:
        two_disks.execute("transaction", {"actions": [
            _backup("vda", "ok.qcow2", tmp_path, **{"target-id": "ok"}),
            _backup("nosuch", "bad.qcow2", tmp_path),
        ]})
    # QEMU's class and words for a failed device-or-node lookup
    assert info.value.qmp_class == "GenericError"
    assert info.value.desc == "Cannot find device='nosuch' nor node-name='nosuch'"
    assert two_disks.execute("query-block-jobs") == []
    names = {n["node-name"] for n in two_disks.execute("query-named-block-nodes")}
    assert "ok" not in names


def test_abort_action(two_disks: Storage, tmp_path: Path) -> None:
    with pytest.raises(GenericError, match="Abort action"):
        two_disks.execute("transaction", {"actions": [
            _backup("vda", "x.qcow2", tmp_path), {"type": "abort", "data": {}}]})
    assert two_disks.execute("query-block-jobs") == []


def test_bad_actions_are_refused_before_anything_runs(two_disks: Storage, tmp_path: Path
                                                      ) -> None:
    with pytest.raises(GenericError, match="nosuch-action"):
        two_disks.execute("transaction", {"actions": [
            _backup("vda", "x.qcow2", tmp_path), {"type": "nosuch-action", "data": {}}]})
    with pytest.raises(GenericError, match="grouped"):
        two_disks.execute("transaction", {"actions": [], "properties": {
            "completion-mode": "grouped"}})
    assert two_disks.execute("query-block-jobs") == []
    assert not (tmp_path / "x.qcow2").exists()


def test_guest_writes_resume_after_the_transaction(two_disks: Storage, tmp_path: Path) -> None:
    two_disks.execute("transaction", {"actions": [_backup("vda", "p.qcow2", tmp_path)]})
    done = threading.Event()

    def write() -> None:
        two_disks.device("vda").pwrite(0, b"\x01" * 4096)
        done.set()

    threading.Thread(target=write).start()
    assert done.wait(5)


def test_bitmap_actions_are_undone_when_a_later_action_fails(two_disks: Storage,
                                                              tmp_path: Path) -> None:
    two_disks.execute("block-dirty-bitmap-add", {"node": "a", "name": "old"})
    two_disks.device("vda").pwrite(0, b"\x01" * 4096)
    with pytest.raises(GenericError, match="Abort action"):
        two_disks.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "b", "name": "new"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "a", "name": "old"}},
            {"type": "abort", "data": {}},
        ]})
    bitmaps = {b["name"]: b for n in two_disks.execute("query-named-block-nodes")
               for b in n.get("dirty-bitmaps", [])}
    assert "new" not in bitmaps
    assert bitmaps["old"]["count"] > 0  # the clear was taken back


def test_backup_and_bitmap_add_at_one_instant(two_disks: Storage, tmp_path: Path) -> None:
    """libvirt's pattern: a full backup and a new bitmap in one transaction; writes after it
    are exactly what the bitmap records."""
    two_disks.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "inc0"}},
        _backup("vda", "full.qcow2", tmp_path, **{"sync": "full", "job-id": "full"}),
    ]})
    two_disks.jobs["full"].wait(30)
    bitmaps = {b["name"]: b for n in two_disks.execute("query-named-block-nodes")
               for b in n.get("dirty-bitmaps", [])}
    assert bitmaps["inc0"]["count"] == 0
    two_disks.device("vda").pwrite(0, b"\x02" * 4096)
    bitmaps = {b["name"]: b for n in two_disks.execute("query-named-block-nodes")
               for b in n.get("dirty-bitmaps", [])}
    assert bitmaps["inc0"]["count"] > 0
