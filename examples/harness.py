"""A hypervisor harness that embeds fleece and exports a point-in-time snapshot of its disk.

Everything runs in this one process, inside ``with Storage() as storage:`` (which closes jobs,
exports and nodes however the run ends), through ``storage.execute`` (the QMP commands, without a
socket) and ``storage.device("virtio0")`` (the guest's disk, driven from vCPU threads):

1. ``blockdev-add`` a fresh qcow2 image as node ``disk0`` and ``device_add`` it as ``virtio0``;
   the vCPUs fill it with data.
2. Four vCPU threads keep writing 4 KiB blocks through the device, each in its own stripe of the
   disk (so a model of the disk can follow every write exactly).
3. The guest is frozen for a moment (as a guest agent's fsfreeze would) while
   ``drive-backup device=virtio0 format=qcow2 target=pit.qcow2 target-id=pit0 sync=none`` takes
   the snapshot, and the model is copied: that copy is the point in time.
4. ``nbd-server-start`` on a unix socket and ``nbd-server-add device=pit0 writable=false``.
5. While the vCPUs go on writing, the whole snapshot is read over NBD with
   :class:`fleece.nbd.client.NBDClient` and compared with the point-in-time copy byte for byte;
   then the live disk is compared with the model.
6. ``block-job-cancel``, ``nbd-server-stop``: ``pit0`` leaves the graph, ``pit.qcow2`` stays.

Run it as ``python examples/harness.py``; it exits 0 when the snapshot verified, 1 otherwise.
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fleece.block.qcow2 import create
from fleece.events import Event
from fleece.nbd.client import NBDClient
from fleece.storage import Storage

SIZE = 16 << 20  # the guest disk
BLOCK = 4096  # what a vCPU writes at a time
CHUNK = 1 << 20  # what one NBD read asks for
VCPUS = 4
RUN_BEFORE_SNAPSHOT = 0.3  # seconds of guest writes before the snapshot
TIMEOUT = 30.0


class VCPU(threading.Thread):
    """Writes random blocks through the device into its stripe (block index % VCPUS == index)
    and records each one in the shared model; ``lock`` is held around each write so that the
    harness can freeze the guest between writes."""

    def __init__(self, index: int, write: Any, model: bytearray, stop: threading.Event) -> None:
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.index = index
        self.write = write
        self.model = model
        self.stop = stop
        self.lock = threading.Lock()
        self.writes = 0
        self.error: BaseException | None = None
        self.rng = random.Random(index)

    def run(self) -> None:
        blocks = SIZE // BLOCK
        try:
            while not self.stop.is_set():
                block = self.rng.randrange(self.index, blocks, VCPUS)
                data = self.rng.randbytes(BLOCK)
                offset = block * BLOCK
                with self.lock:
                    self.write(offset, data)
                    self.model[offset : offset + BLOCK] = data
                self.writes += 1
        except BaseException as exc:  # reported by the harness
            self.error = exc


class Freeze:
    """Holds every vCPU's lock: no guest write is in flight while it is held."""

    def __init__(self, vcpus: list[VCPU]) -> None:
        self.vcpus = vcpus

    def __enter__(self) -> None:
        for vcpu in self.vcpus:
            vcpu.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for vcpu in reversed(self.vcpus):
            vcpu.lock.release()


def read_snapshot(socket_path: str, export: str, frozen: bytes) -> int:
    """Read the export in 1 MiB requests; returns the number of chunks that differ."""
    bad = 0
    with NBDClient.connect_unix(socket_path, export) as client:
        if client.size != len(frozen):
            raise RuntimeError(f"export size {client.size}, expected {len(frozen)}")
        for offset in range(0, len(frozen), CHUNK):
            if client.pread(offset, CHUNK) != frozen[offset : offset + CHUNK]:
                bad += 1
    return bad


def run(work: Path) -> bool:
    disk, target, nbd = work / "disk.qcow2", work / "pit.qcow2", work / "nbd.sock"
    create(str(disk), SIZE)
    cancelled = threading.Event()

    def on_event(event: Event) -> None:
        if event["event"] == "BLOCK_JOB_CANCELLED":
            cancelled.set()

    stop = threading.Event()
    vcpus: list[VCPU] = []
    with Storage() as storage:  # closed (jobs, exports, nodes) however the block ends
        storage.subscribe(on_event)
        try:
            storage.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "disk0",
                "file": {"driver": "file", "filename": str(disk)},
            })
            storage.execute("device_add",
                            {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
            device = storage.device("virtio0")

            # The guest's disk starts full of data, then the vCPUs keep writing.
            seed = random.Random(1).randbytes(SIZE)
            for offset in range(0, SIZE, CHUNK):
                device.pwrite(offset, seed[offset : offset + CHUNK])
            model = bytearray(seed)
            vcpus = [VCPU(index, device.pwrite, model, stop) for index in range(VCPUS)]
            for vcpu in vcpus:
                vcpu.start()
            time.sleep(RUN_BEFORE_SNAPSHOT)

            with Freeze(vcpus):
                storage.execute("drive-backup", {
                    "device": "virtio0", "format": "qcow2", "target": str(target),
                    "target-id": "pit0", "sync": "none",
                })
                frozen = bytes(model)
            writes_at_snapshot = sum(v.writes for v in vcpus)
            storage.execute("nbd-server-start",
                            {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
            storage.execute("nbd-server-add", {"device": "pit0", "writable": False})

            bad = read_snapshot(str(nbd), "pit0", frozen)  # the vCPUs are still writing
            deadline = time.monotonic() + TIMEOUT  # let the guest overwrite a fair part of it
            while sum(v.writes for v in vcpus) < writes_at_snapshot + 1000:
                if time.monotonic() > deadline or any(v.error for v in vcpus):
                    break
                time.sleep(0.01)
            stop.set()
            for vcpu in vcpus:
                vcpu.join(TIMEOUT)
            errors = [v.error for v in vcpus if v.error is not None]
            writes_after = sum(v.writes for v in vcpus) - writes_at_snapshot
            live_ok = device.pread(0, SIZE) == bytes(model)
            snapshot_changed = frozen != bytes(model)

            storage.execute("block-job-cancel", {"device": "virtio0"})
            cancelled.wait(TIMEOUT)
            still_serving = read_snapshot(str(nbd), "pit0", frozen) == 0
            storage.execute("nbd-server-stop")
            nodes = [n["node-name"] for n in storage.execute("query-named-block-nodes")]
        finally:
            stop.set()
            for vcpu in vcpus:
                vcpu.join(TIMEOUT)

    print(f"harness: {VCPUS} vCPUs wrote {writes_at_snapshot} blocks before the snapshot and "
          f"{writes_after} while it was read")
    print(f"harness: snapshot over NBD: {'identical' if not bad else f'{bad} chunks differ'}")
    print(f"harness: live disk matches the guest's writes: {live_ok}")
    print(f"harness: after cancel the export {'still serves' if still_serving else 'FAILED'}; "
          f"after nbd-server-stop pit0 is {'still there' if 'pit0' in nodes else 'gone'}; "
          f"target {'kept' if target.exists() else 'MISSING'}")
    for error in errors:
        print(f"harness: a vCPU failed: {error!r}")
    return (not bad and live_ok and not errors and cancelled.is_set() and still_serving
            and "pit0" not in nodes and "disk0" in nodes and target.exists()
            and writes_after > 0 and snapshot_changed)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fleece-harness-") as tmp:
        ok = run(Path(tmp))
    print(f"harness: {'the snapshot verified' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
