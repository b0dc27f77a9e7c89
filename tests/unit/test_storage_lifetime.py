"""A :class:`fleece.storage.Storage` dropped without ``close()``.

- **Collected while busy**: a Storage with a running ``drive-backup sync=none`` fleecing job, a
  device the guest wrote through, an NBD server on a unix socket and an export of the snapshot
  (read by a client that has since disconnected), dropped by its last reference, is garbage
  collected (the running job and the server's thread do not keep it alive). Collecting it emits
  a ``ResourceWarning`` that says to use ``with Storage() as storage:``; it then closes
  everything as ``close()`` would: the job is cancelled (``BLOCK_JOB_CANCELLED`` reaches a
  subscriber), the NBD socket file it created is gone, and ``qemu-img check`` finds both the
  source and the target clean (no leaked cluster, no corruption). The snapshot read back from the
  target (over its backing, with ``qemu-img``) is the point-in-time content, the source the new.
- **Closed is quiet**: a Storage closed (``with`` block or ``close()``) and then collected emits
  no ``ResourceWarning``; nor does one whose ``__init__`` never finished.
"""

from __future__ import annotations

import gc
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from fleece.bitmaps.commands import BitmapCommands
from fleece.block.qcow2 import create
from fleece.commands import Nodes
from fleece.events import Event
from fleece.nbd.client import NBDClient
from fleece.storage import FINALIZER_THREAD, Storage
from tests.peers import run

pytestmark = pytest.mark.timeout(60)

SIZE = 8 << 20
CLUSTER = 64 * 1024


def _join_finalizers(timeout: float = 30.0) -> None:
    for thread in threading.enumerate():
        if thread.name == FINALIZER_THREAD:
            thread.join(timeout)
            assert not thread.is_alive(), "a dropped Storage did not finish closing"


def _busy_storage(work: Path, cancelled: threading.Event) -> tuple[bytes, bytes]:
    """Build a busy Storage and drop it on return; (point-in-time content, content after)."""
    disk, target, sock = work / "disk.qcow2", work / "pit.qcow2", work / "nbd.sock"
    create(str(disk), SIZE)
    storage = Storage()

    def on_event(event: Event) -> None:
        if event["event"] == "BLOCK_JOB_CANCELLED":
            cancelled.set()

    storage.subscribe(on_event)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                     "file": {"driver": "file", "filename": str(disk)}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    device = storage.device("virtio0")
    before = bytes(range(256)) * (SIZE // 256)
    device.pwrite(0, before)
    storage.execute("drive-backup", {"device": "virtio0", "format": "qcow2",
                                     "target": str(target), "target-id": "pit0", "sync": "none"})
    storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    storage.execute("nbd-server-add", {"device": "pit0", "writable": False})
    after = bytearray(before)
    for offset in range(0, SIZE, 3 * CLUSTER):  # copy-before-write allocates in the target
        data = bytes([0xA5]) * 4096
        device.pwrite(offset + 512, data)
        after[offset + 512 : offset + 512 + 4096] = data
    with NBDClient.connect_unix(str(sock), "pit0") as client:
        assert client.pread(0, SIZE) == before
    (job,) = storage.execute("query-block-jobs")
    assert job["type"] == "backup" and job["device"] == "virtio0"
    assert sock.exists()
    return before, bytes(after)  # the last references to storage and device go here


def test_dropped_busy_storage_warns_and_leaves_consistent_images(tmp_path: Path) -> None:
    cancelled = threading.Event()
    with pytest.warns(ResourceWarning, match=r"with Storage\(\) as storage") as caught:
        before, after = _busy_storage(tmp_path, cancelled)
        gc.collect()
        _join_finalizers()
    assert sum(issubclass(w.category, ResourceWarning) for w in caught) == 1
    assert cancelled.is_set()
    assert not (tmp_path / "nbd.sock").exists()
    disk, target = tmp_path / "disk.qcow2", tmp_path / "pit.qcow2"
    for image in (disk, target):
        check = run("qemu-img", "check", "--output=json", str(image))
        assert '"check-errors": 0' in check.stdout, check.stdout
        assert "leaks" not in check.stdout and "corruptions" not in check.stdout, check.stdout
    snapshot = tmp_path / "snapshot.raw"
    run("qemu-img", "convert", "-O", "raw", str(target), str(snapshot))
    assert snapshot.read_bytes() == before
    live = tmp_path / "live.raw"
    run("qemu-img", "convert", "-O", "raw", str(disk), str(live))
    assert live.read_bytes() == after


def _no_resource_warning(make: Any) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
        gc.collect()
        _join_finalizers()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_closed_storage_is_collected_quietly(tmp_path: Path) -> None:
    def with_block() -> None:
        with Storage() as storage:
            storage.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})

    def closed() -> None:
        storage = Storage()
        storage.execute("nbd-server-start",
                        {"addr": {"type": "unix", "data": {"path": str(tmp_path / "s")}}})
        storage.close()

    _no_resource_warning(with_block)
    _no_resource_warning(closed)
    assert not (tmp_path / "s").exists()


def test_half_built_storage_is_collected_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: BitmapCommands, nodes: Nodes) -> None:
        raise RuntimeError("no bitmaps today")

    def half_built() -> None:
        with pytest.raises(RuntimeError, match="no bitmaps today"):
            Storage()

    monkeypatch.setattr(BitmapCommands, "__init__", fail)
    _no_resource_warning(half_built)
