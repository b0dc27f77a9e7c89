"""Dirty bitmaps and incremental backup against the real peers.

- A persistent bitmap fleece stored is listed by ``qemu-img info`` (format-specific bitmaps,
  flag ``auto``, not ``in-use``), ``qemu-img check`` is clean, and QEMU reads the same bits:
  ``qemu-nbd -B`` exports it and ``nbdinfo --map=qemu:dirty-bitmap:NAME`` shows the dirty ranges.
- A bitmap QEMU made (``qemu-img bitmap --add``) and filled (``qemu-io`` writes) loads in fleece
  with the same bits and keeps recording; the image stays clean after fleece closes it.
- An incremental backup: its allocated clusters (``qemu-img map --output=json``) are exactly the
  dirty ones, and rebased on the full backup (``qemu-img rebase -u``) it reads the same as the
  source (``qemu-img compare``).
- fleece's own NBD server publishes ``qemu:dirty-bitmap:NAME`` (``block-export-add bitmaps``):
  ``nbdinfo --map`` shows the dirty ranges.

Every test is bounded (``pytest-timeout`` 60 s; peers time out after 120 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.qcow2 import create
from fleece.events import Event
from fleece.storage import Storage
from tests.interop.conftest import require, run

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def peer(*args: str) -> subprocess.CompletedProcess[str]:
    require(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=PEER_ENV)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Disk:
    """A Storage with ``image`` as node ``disk0`` and device ``virtio0``."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.storage = Storage()
        self.events: list[Event] = []
        self.cond = threading.Condition()
        self.storage.subscribe(self._event)
        self.x("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                "file": {"driver": "file", "filename": image}})
        self.x("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
        self.device = self.storage.device("virtio0")

    def _event(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def x(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self.storage.execute(command, args or {})

    def wait_job(self, job: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            for e in self.events:
                data = e.get("data") or {}
                if e["event"] == "BLOCK_JOB_COMPLETED" and data.get("device") == job:
                    return dict(data)
            return None

        with self.cond:
            self.cond.wait_for(lambda: done() is not None, 30)
            result = done()
        assert result is not None, f"job {job} did not complete"
        assert "error" not in result, result
        return result

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = str(tmp_path / "src.qcow2")
    create(path, SIZE)
    return path


def nbd_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = peer("nbdinfo", "--json", f"--map={context}", uri).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def dirty_of(extents: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(offset, length) for offset, length, kind in extents if kind & 1]


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(image: str, bitmap: str) -> str:
        sock = str(tmp_path / f"qnbd{len(procs)}.sock")
        proc = subprocess.Popen(
            [require("qemu-nbd"), "-r", "-t", "-f", "qcow2", "-B", bitmap, "-k", sock, image],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"qemu-nbd did not start: {err}")
            time.sleep(0.02)
        return f"nbd+unix:///?socket={sock}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def test_qemu_reads_a_bitmap_fleece_stored(image: str, qemu_nbd: Any) -> None:
    disk = Disk(image)
    try:
        disk.x("block-dirty-bitmap-add", {"node": "virtio0", "name": "b0", "persistent": True})
        disk.x("block-dirty-bitmap-add", {"node": "disk0", "name": "off", "persistent": True,
                                          "disabled": True, "granularity": 4096})
        disk.device.pwrite(MiB + 7, b"x" * 100)
        disk.device.pwrite(9 * MiB, b"y" * (2 * MiB))
        disk.x("block-dirty-bitmap-merge", {"node": "disk0", "target": "off",
                                            "bitmaps": ["b0"]})
    finally:
        disk.close()
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    bitmaps = {b["name"]: b for b in info["format-specific"]["data"]["bitmaps"]}
    assert bitmaps == {
        "b0": {"name": "b0", "granularity": 65536, "flags": ["auto"]},
        "off": {"name": "off", "granularity": 4096, "flags": []},
    }
    run("qemu-img", "check", image)
    expected = [(MiB, 64 * KiB), (9 * MiB, 2 * MiB)]
    assert dirty_of(nbd_map(qemu_nbd(image, "b0"), "qemu:dirty-bitmap:b0")) == expected
    assert dirty_of(nbd_map(qemu_nbd(image, "off"), "qemu:dirty-bitmap:off")) == expected


def test_fleece_loads_a_bitmap_qemu_made(image: str) -> None:
    run("qemu-img", "bitmap", "--add", "-g", "65536", image, "q")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 3M 64k", "-c", "write 10M 1k", image)
    disk = Disk(image)
    try:
        info = disk.x("query-block")[0]["inserted"]["dirty-bitmaps"]
        assert info == [{"name": "q", "recording": True, "persistent": True, "busy": False,
                         "granularity": 65536, "count": 128 * KiB}]
        disk.device.pwrite(15 * MiB, b"z")
        bitmaps = disk.x("query-named-block-nodes")[0]["image"]["format-specific"]["data"]
        assert bitmaps["bitmaps"] == [{"name": "q", "granularity": 65536,
                                       "flags": ["in-use", "auto"]}]
    finally:
        disk.close()
    run("qemu-img", "check", image)
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"name": "q", "granularity": 65536, "flags": ["auto"]}
    ]
    # QEMU can still work with it: clearing it through qemu-img succeeds
    run("qemu-img", "bitmap", "--clear", image, "q")
    run("qemu-img", "check", image)


def map_allocated(path: str) -> list[tuple[int, int]]:
    out = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
    ranges: list[tuple[int, int]] = []
    for extent in out:
        if extent["depth"] == 0 and extent["present"]:
            start, length = extent["start"], extent["length"]
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
    return ranges


def test_incremental_backup_holds_exactly_the_dirty_clusters(image: str, tmp_path: Path) -> None:
    full = str(tmp_path / "full.qcow2")
    inc = str(tmp_path / "inc.qcow2")
    disk = Disk(image)
    try:
        dev = disk.device
        for i in range(16):
            dev.pwrite(i * MiB, bytes([i + 1]) * (512 * KiB))
        disk.x("block-dirty-bitmap-add", {"node": "disk0", "name": "b"})
        disk.x("drive-backup", {"device": "virtio0", "sync": "full", "target": full,
                                "format": "qcow2", "job-id": "full"})
        disk.wait_job("full")
        dev.pwrite(MiB + 3, b"\xaa" * 10)
        dev.pwrite(4 * MiB - 1, b"\xbb" * 2)  # straddles two clusters
        dev.pwrite_zeroes(8 * MiB, 64 * KiB)  # zeroed data must hide the full backup's
        dev.pwrite(14 * MiB, b"\xcc" * (256 * KiB))
        dirty = disk.x("query-block")[0]["inserted"]["dirty-bitmaps"]
        assert dirty[0]["count"] == 8 * 64 * KiB
        disk.x("drive-backup", {"device": "virtio0", "sync": "incremental", "bitmap": "b",
                                "target": inc, "format": "qcow2", "job-id": "inc"})
        disk.wait_job("inc")
        assert disk.x("query-block")[0]["inserted"]["dirty-bitmaps"][0]["count"] == 0
    finally:
        disk.close()
    assert map_allocated(inc) == [
        (MiB, 64 * KiB), (4 * MiB - 64 * KiB, 128 * KiB), (8 * MiB, 64 * KiB),
        (14 * MiB, 256 * KiB),
    ]
    run("qemu-img", "check", inc)
    run("qemu-img", "rebase", "-u", "-b", full, "-F", "qcow2", inc)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", inc, image)
    run("qemu-img", "check", image)


def test_fleece_export_publishes_the_dirty_bitmap(image: str, tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    disk = Disk(image)
    try:
        disk.x("block-dirty-bitmap-add", {"node": "disk0", "name": "b", "granularity": 4096})
        disk.device.pwrite(2 * MiB + 5, b"q")
        disk.device.pwrite(12 * MiB, b"r" * (8 * KiB + 1))
        disk.x("block-dirty-bitmap-disable", {"node": "disk0", "name": "b"})
        disk.x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        disk.x("block-export-add", {"type": "nbd", "id": "e", "node-name": "disk0",
                                    "name": "disk", "bitmaps": ["b"]})
        uri = f"nbd+unix:///disk?socket={sock}"
        extents = nbd_map(uri, "qemu:dirty-bitmap:b")
        assert dirty_of(extents) == [(2 * MiB, 4096), (12 * MiB, 12 * KiB)]
        assert sum(length for _, length, _ in extents) == SIZE
        listed = peer("nbdinfo", "--list", "--json",
                      f"nbd+unix:///?socket={sock}").stdout
        contexts = json.loads(listed)["exports"][0]["contexts"]
        assert "qemu:dirty-bitmap:b" in contexts
        disk.x("block-export-del", {"id": "e"})
    finally:
        disk.close()
