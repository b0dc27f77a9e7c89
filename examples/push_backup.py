"""Push backup with fleecing: a guest keeps writing while its disk's snapshot streams to a
backup server over NBD (QEMU's "push backup with fleecing", what Proxmox does).

Everything on the fleecing side runs in this process, inside ``with Storage() as storage:``:

1. ``blockdev-add`` a fresh qcow2 image as node ``disk0``, ``device_add`` it as ``virtio0`` and
   fill it with data; a guest thread then keeps writing random 4 KiB blocks through the device
   (and records each one in a model of the disk).
2. The backup server: ``qemu-nbd`` serving a fresh raw image over a unix socket when it is
   installed, else a second ``Storage`` with ``nbd-server-start`` and a writable
   ``nbd-server-add`` (``--server fleece`` chooses it).
3. The point in time, with the guest held between two writes for a moment (as a guest agent's
   fsfreeze would): the model is copied, then the filter scheme goes in::

       blockdev-add driver=raw node-name=fl-img file=fleecing.raw discard=unmap
       blockdev-add driver=copy-before-write node-name=fl file=disk0 target=fl-img
       blockdev-add driver=snapshot-access node-name=acc file=fl

4. ``blockdev-add driver=nbd node-name=push server={type: unix, path: ...}`` and
   ``blockdev-backup device=acc target=push sync=full discard-source=true speed=64M`` (limited so
   that the guest overwrites a fair part of the disk before the job reaches it); the guest goes on
   writing (its first write to each cluster copies the old data into ``fl-img``, locally) until
   ``BLOCK_JOB_COMPLETED``. ``discard-source`` drops every pushed run from ``fl-img``, so the
   fleecing image stays small.
5. The check: the backup server's image equals, byte for byte, the disk at the point in time,
   though the guest overwrote part of it during the push; the live disk equals the model.

Run it as ``python examples/push_backup.py [--server qemu-nbd|fleece]``; it exits 0 when the
pushed image verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleece.block.qcow2 import create
from fleece.events import Event
from fleece.storage import Storage

MiB = 1 << 20
SIZE = 32 * MiB  # the guest disk
BLOCK = 4096  # what the guest writes at a time
TIMEOUT = 30.0
SPEED = 64 * MiB  # the push's rate limit (bytes/s), so that the guest overwrites a fair part
PEER_PATH = "/usr/bin:" + os.environ.get("PATH", "")


class Guest(threading.Thread):
    """Writes random blocks through the device and records each one in ``model``; ``lock`` is
    held around each write so that the example can hold the guest between writes."""

    def __init__(self, write: Any, model: bytearray) -> None:
        super().__init__(name="guest", daemon=True)
        self.write = write
        self.model = model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.writes = 0
        self.error: BaseException | None = None
        self.rng = random.Random(16)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                offset = self.rng.randrange(SIZE // BLOCK) * BLOCK
                data = self.rng.randbytes(BLOCK)
                with self.lock:
                    self.write(offset, data)
                    self.model[offset : offset + BLOCK] = data
                self.writes += 1
                time.sleep(0.0002)  # a guest doing other things too
        except BaseException as exc:  # reported by the example
            self.error = exc


@contextmanager
def qemu_nbd(image: Path, sock: Path) -> Iterator[str]:
    """``qemu-nbd`` serving the raw ``image`` on ``sock``; yields the export name."""
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", str(sock),
                             str(image)], env={**os.environ, "PATH": PEER_PATH},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"qemu-nbd did not start: {err}")
            time.sleep(0.01)
        yield ""
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextmanager
def fleece_server(image: Path, sock: Path) -> Iterator[str]:
    """A second ``Storage`` serving the raw ``image`` writable on ``sock``; yields the export
    name."""
    with Storage() as remote:
        remote.execute("blockdev-add", {"driver": "raw", "node-name": "backup",
                                        "file": {"driver": "file", "filename": str(image)}})
        remote.execute("nbd-server-start",
                       {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        remote.execute("nbd-server-add", {"device": "backup", "writable": True})
        yield "backup"
        remote.execute("nbd-server-stop")


def run(work: Path, server: str) -> bool:
    disk, fleecing = work / "disk.qcow2", work / "fleecing.raw"
    backup, sock = work / "backup.raw", work / "backup.sock"
    create(str(disk), SIZE)
    for sparse in (fleecing, backup):
        with sparse.open("wb") as f:
            f.truncate(SIZE)
    done = threading.Event()
    completed: dict[str, Any] = {}

    def on_event(event: Event) -> None:
        if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"]["device"] == "push0":
            completed.update(event["data"])
            done.set()

    serve = qemu_nbd if server == "qemu-nbd" else fleece_server
    guest: Guest | None = None
    with serve(backup, sock) as export_name, Storage() as storage:
        storage.subscribe(on_event)
        try:
            storage.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "disk0",
                "file": {"driver": "file", "filename": str(disk)},
            })
            storage.execute("device_add",
                            {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
            device = storage.device("virtio0")
            seed = random.Random(1)
            for offset in range(0, SIZE, 2 * MiB):  # half data, half never written (zeroes)
                device.pwrite(offset, seed.randbytes(MiB))
            model = bytearray(device.pread(0, SIZE))
            guest = Guest(device.pwrite, model)
            guest.start()
            time.sleep(0.2)

            with guest.lock:  # the point in time: no guest write in flight
                point_in_time = bytes(model)
                storage.execute("blockdev-add", {
                    "driver": "raw", "node-name": "fl-img", "discard": "unmap",
                    "file": {"driver": "file", "filename": str(fleecing), "discard": "unmap"},
                })
                storage.execute("blockdev-add", {"driver": "copy-before-write",
                                                 "node-name": "fl", "file": "disk0",
                                                 "target": "fl-img"})
                storage.execute("blockdev-add", {"driver": "snapshot-access",
                                                 "node-name": "acc", "file": "fl"})
            writes_at_snapshot = guest.writes

            push: dict[str, Any] = {"driver": "nbd", "node-name": "push",
                                    "server": {"type": "unix", "path": str(sock)},
                                    "export": export_name}
            storage.execute("blockdev-add", push)
            started = time.monotonic()
            storage.execute("blockdev-backup", {"device": "acc", "target": "push",
                                                "sync": "full", "job-id": "push0",
                                                "discard-source": True,
                                                "speed": SPEED})
            finished = done.wait(TIMEOUT)
            seconds = time.monotonic() - started
            (filter_info,) = [node["image"]["fleecing"]
                              for node in storage.execute("query-named-block-nodes")
                              if node["node-name"] == "fl"]
            copied = filter_info["copied-bytes"]
            guest.stop.set()
            guest.join(TIMEOUT)
            writes_during = guest.writes - writes_at_snapshot
            live_ok = device.pread(0, SIZE) == bytes(model)
            fleecing_left = os.stat(fleecing).st_blocks * 512
            storage.execute("blockdev-del", {"node-name": "push"})  # flushes, disconnects
        finally:
            if guest is not None:
                guest.stop.set()
                guest.join(TIMEOUT)
    pushed_ok = backup.read_bytes() == point_in_time
    overwritten = sum(point_in_time[o : o + BLOCK] != model[o : o + BLOCK]
                      for o in range(0, SIZE, BLOCK))

    error = completed.get("error")
    print(f"push_backup: backup server {server}; the push of {SIZE // MiB} MiB "
          f"{'completed' if finished and not error else 'FAILED: ' + str(error or 'timeout')} "
          f"in {seconds:.2f} s")
    print(f"push_backup: the guest wrote {writes_during} blocks during the push "
          f"({overwritten} of {SIZE // BLOCK} blocks now differ from the point in time); "
          f"the filter copied {copied // 1024} KiB to the fleecing image, "
          f"{fleecing_left // 1024} KiB of it left after discard-source")
    print(f"push_backup: pushed image equals the point in time: {pushed_ok}")
    print(f"push_backup: live disk matches the guest's writes: {live_ok}")
    if guest is not None and guest.error is not None:
        print(f"push_backup: the guest failed: {guest.error!r}")
    return (finished and not error and pushed_ok and live_ok and writes_during > 0
            and overwritten > 0 and guest is not None and guest.error is None)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server", choices=("qemu-nbd", "fleece"),
                        help="the backup server (default: qemu-nbd when installed, else fleece)")
    args = parser.parse_args()
    server = args.server or ("qemu-nbd" if shutil.which("qemu-nbd", path=PEER_PATH)
                             else "fleece")
    with tempfile.TemporaryDirectory(prefix="fleece-push-") as tmp:
        ok = run(Path(tmp), server)
    print(f"push_backup: {'the pushed image verified' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
