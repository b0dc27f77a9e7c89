"""Backup, fleecing and chain jobs of fleece, checked with the real QEMU tools.

fleece runs the jobs (through :class:`fleece.storage.Storage`); ``qemu-img`` and ``qemu-io``
(missing tools fail, never skip) then judge the images it left, after fleece let go of them:

- **iotest 222 with QEMU's own images**: ``qemu-img create`` makes the 64 MiB source and
  ``qemu-io`` writes the four patterns; fleece snapshots it (``drive-backup sync=none``) and the
  guest overwrites four ranges. Then, as iotest 222 does, ``qemu-io -c 'read -P ...'`` on the
  snapshot image (through its backing file, the source) finds the original patterns and zeroes
  where the guest wrote; ``qemu-img map`` shows exactly the 6 clusters copied before write;
  ``qemu-img info`` names the source as backing file; ``qemu-img check`` is clean.
- **sync=full** under concurrent guest writes: ``qemu-img convert -O raw`` of the target equals
  the point-in-time content, ``qemu-img check`` of target and source exit 0.
- **sync=top** over a backing file: ``qemu-img map --output=json`` of the target allocates
  exactly the clusters the source's top layer allocates; the target converts to the source's
  content, and a zero cluster of the top layer over data in the backing is carried into the
  target (``qemu-img compare`` of source and target is clean).
- **block-stream** (base <- mid <- top, base-node=base) and **block-commit** (mid into base):
  ``qemu-img info`` of top then names base as its backing file, the content (``qemu-img
  convert``) is unchanged and every image is ``qemu-img check`` clean.
"""

from __future__ import annotations

import json
import random
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fleece.block.qcow2 import create
from fleece.storage import Storage
from tests import peers
from tests.events import EventLog

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

KiB = 1 << 10
MiB = 1 << 20
CLUSTER = 64 * KiB
WAIT = 10.0

PATTERNS_BEFORE = ((0x5D, 0), (0xD5, 1 * MiB), (0xDC, 32 * MiB), (0xCD, 0x3FF0000))
PATTERNS_AFTER = ((0xAB, 0), (0xAD, 0xF8000), (0x1D, 0x2008000), (0xEA, 0x3FE0000))


#: qemu-img and qemu-io, failing the test (never skipping) when missing or when they fail
run = partial(peers.run, timeout=60)


def qemu_check(path: str) -> None:
    run("qemu-img", "check", path)


def qemu_raw(path: str, tmp: Path) -> bytes:
    """The guest-visible bytes of the image at ``path``, as QEMU reads them."""
    out = tmp / f"{Path(path).stem}-{time.monotonic_ns()}.raw"
    run("qemu-img", "convert", "-O", "raw", path, str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_map(path: str) -> list[dict[str, Any]]:
    return list(json.loads(run("qemu-img", "map", "--output=json", path).stdout))


def qemu_info(path: str) -> dict[str, Any]:
    return dict(json.loads(run("qemu-img", "info", "--output=json", path).stdout))


def own_clusters(path: str) -> set[int]:
    """Clusters the image itself allocates (depth 0, data or zero), from ``qemu-img map``."""
    clusters: set[int] = set()
    for extent in qemu_map(path):
        if extent["depth"] == 0 and extent["present"]:
            start, end = extent["start"], extent["start"] + extent["length"]
            clusters.update(range(start // CLUSTER, -(-end // CLUSTER)))
    return clusters


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"lengths differ: {len(got)} != {len(want)}"
    for at, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            return f"first difference at {at:#x}: got {a:#04x}, want {b:#04x}"
    return "equal"


def open_storage(image: str, **extra: Any) -> tuple[Storage, EventLog]:
    storage = Storage()
    log = EventLog()
    storage.subscribe(log)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                     "file": {"driver": "file", "filename": image}, **extra})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    return storage, log


def test_iotest_222_with_images_qemu_made(tmp_path: Path) -> None:
    src = str(tmp_path / "src.qcow2")
    pit = str(tmp_path / "pit.qcow2")
    run("qemu-img", "create", "-f", "qcow2", src, "64M")
    for pattern, offset in PATTERNS_BEFORE:
        run("qemu-io", "-c", f"write -P {pattern:#x} {offset:#x} 64k", src)
    storage, log = open_storage(src)
    try:
        storage.execute("drive-backup", {"device": "virtio0", "target": pit, "format": "qcow2",
                                         "target-id": "pit0", "sync": "none"})
        device = storage.device("virtio0")
        for pattern, offset in PATTERNS_AFTER:
            device.pwrite(offset, bytes([pattern]) * CLUSTER)
        storage.execute("block-job-cancel", {"device": "virtio0"})
        assert log.wait("BLOCK_JOB_CANCELLED")["len"] == 64 * MiB
    finally:
        storage.close()
    qemu_check(src)
    qemu_check(pit)
    info = qemu_info(pit)
    assert info["backing-filename"] == src
    assert info.get("backing-filename-format") == "qcow2"
    # iotest 222's verification: the snapshot still reads the original data ...
    reads = [f"read -P {pattern:#x} {offset:#x} 64k" for pattern, offset in PATTERNS_BEFORE]
    # ... and zeroes where the guest wrote over never-written areas
    reads += ["read -P 0 0x00f8000 32k", "read -P 0 0x2010000 32k", "read -P 0 0x3fe0000 64k"]
    for command in reads:
        out = run("qemu-io", "-r", "-c", command, pit, check=False)
        assert out.returncode == 0 and "verification failed" not in out.stdout, (
            f"{command}: {out.stdout}{out.stderr}"
        )
    assert own_clusters(pit) == {0, 15, 16, 0x200, 0x201, 0x3FE}
    # and the source has the guest's data
    for pattern, offset in PATTERNS_AFTER:
        run("qemu-io", "-r", "-c", f"read -P {pattern:#x} {offset:#x} 64k", src)


def _writer(storage: Storage, size: int, seed: int, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    device = storage.device("virtio0")
    try:
        for _ in range(150):
            offset = rng.randrange(size)
            length = min(rng.randrange(1, 3 * CLUSTER), size - offset)
            device.pwrite(offset, bytes([rng.randrange(1, 256)]) * length)
    except BaseException as exc:
        errors.append(exc)


def test_sync_full_under_concurrent_writes_converts_to_the_point_in_time(tmp_path: Path) -> None:
    size = 32 * MiB
    src = str(tmp_path / "src.qcow2")
    target = str(tmp_path / "full.qcow2")
    create(src, size)
    storage, log = open_storage(src)
    try:
        device = storage.device("virtio0")
        rng = random.Random(7)
        for offset in range(0, size, 2 * MiB):  # data in every other MiB, zeroes between
            device.pwrite(offset, rng.randbytes(MiB))
        want = device.pread(0, size)
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "full", "sync": "full",
                                         "format": "qcow2", "target": target,
                                         "speed": 32 * MiB})
        errors: list[BaseException] = []
        writers = [threading.Thread(target=_writer, args=(storage, size, seed, errors))
                   for seed in range(3)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(WAIT)
        done = log.wait("BLOCK_JOB_COMPLETED")
        assert "error" not in done and done["offset"] == done["len"] == size
        assert errors == []
    finally:
        storage.close()
    qemu_check(target)
    qemu_check(src)
    got = qemu_raw(target, tmp_path)
    assert got == want, first_difference(got, want)


def _top_over_base(tmp: Path, size: int) -> tuple[str, str]:
    base = str(tmp / "base.qcow2")
    top = str(tmp / "top.qcow2")
    run("qemu-img", "create", "-f", "qcow2", base, str(size))
    run("qemu-io", "-c", f"write -P 0x11 0 {size}", base)
    run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    return base, top


def test_sync_top_allocates_only_the_top_layers_clusters(tmp_path: Path) -> None:
    size = 4 * MiB
    base, top = _top_over_base(tmp_path, size)
    target = str(tmp_path / "top-backup.qcow2")
    storage, log = open_storage(top)
    try:
        device = storage.device("virtio0")
        device.pwrite(0, b"\x22" * CLUSTER)
        device.pwrite(3 * CLUSTER + 5, b"\x23" * 100)
        device.pwrite(2 * MiB, b"\x24" * (4 * CLUSTER))
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "top", "sync": "top",
                                         "format": "qcow2", "target": target})
        device.pwrite(3 * MiB, b"\x25" * CLUSTER)  # after the point in time: not in the backup
        done = log.wait("BLOCK_JOB_COMPLETED")
        assert "error" not in done
    finally:
        storage.close()
    qemu_check(target)
    qemu_check(top)
    top_clusters = own_clusters(top)
    assert top_clusters == {0, 3, 32, 33, 34, 35, 48}
    assert own_clusters(target) == top_clusters - {48}
    assert qemu_info(target)["backing-filename"] == base
    want = bytearray(b"\x11" * size)
    want[0:CLUSTER] = b"\x22" * CLUSTER
    want[3 * CLUSTER + 5:3 * CLUSTER + 105] = b"\x23" * 100
    want[2 * MiB:2 * MiB + 4 * CLUSTER] = b"\x24" * (4 * CLUSTER)
    got = qemu_raw(target, tmp_path)
    assert got == want, first_difference(got, bytes(want))


def test_sync_top_carries_a_zero_cluster_of_the_top_layer(tmp_path: Path) -> None:
    size = 4 * MiB
    _, top = _top_over_base(tmp_path, size)
    target = str(tmp_path / "top-backup.qcow2")
    run("qemu-io", "-c", "write -z 1M 64k", top)  # a zero cluster in top over base's 0x11
    storage, log = open_storage(top)
    try:
        storage.execute("drive-backup", {"device": "virtio0", "job-id": "top", "sync": "top",
                                         "format": "qcow2", "target": target})
        assert "error" not in log.wait("BLOCK_JOB_COMPLETED")
    finally:
        storage.close()
    qemu_check(target)
    out = run("qemu-img", "compare", top, target, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


class Chain:
    """base <- mid <- top made by qemu-img, with distinct data (qemu-io) in each layer."""

    SIZE = 4 * MiB

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.base, self.mid, self.top = (str(tmp / f"{n}.qcow2") for n in ("base", "mid", "top"))
        run("qemu-img", "create", "-f", "qcow2", self.base, str(self.SIZE))
        run("qemu-img", "create", "-f", "qcow2", "-b", self.base, "-F", "qcow2", self.mid)
        run("qemu-img", "create", "-f", "qcow2", "-b", self.mid, "-F", "qcow2", self.top)
        run("qemu-io", "-c", "write -P 0x0b 0 4M", self.base)
        run("qemu-io", "-c", "write -P 0x0d 1M 2M", self.mid)
        run("qemu-io", "-c", "write -P 0x07 1536k 64k", self.top)
        self.content = qemu_raw(self.top, tmp)
        self.storage = Storage()
        self.log = EventLog()
        self.storage.subscribe(self.log)
        self.storage.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "base",
            "file": {"driver": "file", "filename": self.base},
        })
        self.storage.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": self.top},
            "backing": {"driver": "qcow2", "node-name": "mid", "backing": "base",
                        "file": {"driver": "file", "filename": self.mid}},
        })
        self.storage.execute("device_add",
                             {"driver": "virtio-blk", "id": "virtio0", "drive": "top"})

    def run_job(self, command: str, arguments: dict[str, Any]) -> None:
        try:
            self.storage.execute(command, {**arguments, "job-id": "chain"})
            done = self.log.wait("BLOCK_JOB_COMPLETED")
            assert "error" not in done, done["error"]
        finally:
            self.storage.close()
        for path in (self.base, self.mid, self.top):
            qemu_check(path)
        info = qemu_info(self.top)
        assert info["backing-filename"] == self.base
        assert info.get("backing-filename-format") == "qcow2"
        got = qemu_raw(self.top, self.tmp)
        assert got == self.content, first_difference(got, self.content)


def test_block_stream_leaves_top_over_base(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.run_job("block-stream", {"device": "top", "base-node": "base"})
    assert own_clusters(chain.top) == set(range(16, 48))  # mid's 2 MiB, top's cluster inside


def test_block_commit_of_mid_into_base(tmp_path: Path) -> None:
    chain = Chain(tmp_path)
    chain.run_job("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"})
    assert own_clusters(chain.top) == {24}
    base = qemu_raw(chain.base, tmp_path)
    assert base[1 * MiB:3 * MiB] == b"\x0d" * (2 * MiB)  # mid's data is in base now
