"""Power-loss drills (issue 13, defect 6): every crash state of a qcow2 image stays consistent.

:mod:`tests.crashsim` records every write and sync fleece makes to the image files during a
scenario, then replays random crash states: everything up to the file's last sync, and any
prefix or subset of the writes since, some torn at 512-byte sectors. Each state must pass
``qemu-img check`` (exit 0, or 3 with leaked clusters only: never a corruption) and reopen in
fleece with every byte readable; what the guest had flushed before the crash must read back.

Scenarios: allocating writes, zeroes and discards with flushes between (on images made by
fleece and by ``qemu-img``, with small clusters and narrow refcounts so that L2 tables,
refcount blocks and the refcount table are allocated too); direct writes (the qcow2 driver's
``begin_direct_write``, written by the file writer thread); copy-before-write with
write-behind into a fleecing target; persistent dirty bitmaps stored and loaded again.
``--long-drills`` draws ten times as many crash states (600 per scenario) from longer scenarios.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fleece._pure.filewriter import FileWriter
from fleece.block.device import Device
from fleece.block.qcow2 import create
from fleece.storage import Storage
from tests.crashsim import CrashState, Guest, Recorder, Sync, Write, check_state
from tests.drills.support import KiB, MiB, pattern, run, scale

pytestmark = pytest.mark.timeout(scale(300, 7200))

STATES = scale(60, 600)  # random crash states per scenario (the header sweep adds its own)
OPS = scale(40, 150)  # guest operations per scenario


def _verify(tmp: Path, recorder: Recorder, images: list[str], seed: int,
            states: int = STATES) -> None:
    """Draw ``states`` crash states and check them (two at a time); fail with the first ones
    that are not consistent.

    Each state holds whole copies of the images (32 MiB for the stream's), so states are
    drawn as the checks go, a few ahead, and only the three earliest failures are kept: the
    600 states of ``--long-drills``, drawn at once, took more than the machine's 24 GiB."""
    rng = random.Random(seed)
    lock = threading.Lock()
    first: list[tuple[CrashState, list[str]]] = []  # the earliest failures, by crash position
    failed = drawn = 0

    def one(k: int, state: CrashState) -> None:
        nonlocal failed
        found = check_state(state, tmp / f"crash{k % 2}-{threading.get_ident()}", images)
        if found:
            with lock:
                failed += 1
                first.append((state, found))
                first.sort(key=lambda f: f[0].at)
                del first[3:]

    with ThreadPoolExecutor(2) as pool:
        running: deque[Future[None]] = deque()
        for k, state in enumerate(recorder.states(rng, states)):
            drawn += 1
            running.append(pool.submit(one, k, state))
            del state
            if len(running) >= 4:
                running.popleft().result()
        for future in running:
            future.result()
    writes = sum(1 for e in recorder.events if type(e).__name__ == "Write")
    syncs = sum(1 for e in recorder.events if type(e).__name__ == "Sync")
    print(f"\nDRILL power loss: {drawn} crash states of {writes} writes and {syncs} syncs, "
          f"{failed} inconsistent")
    if failed:
        lines = [f"{failed} of {drawn} crash states are inconsistent; the first:"]
        for state, found in first:
            lines.append(state.describe(recorder.events))
            lines += [f"    {f}" for f in found]
        pytest.fail("\n".join(lines))


def _open(storage: Storage, path: Path, node: str = "disk0", **extra: Any) -> None:
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": node, "discard": "unmap",
                                     "file": {"driver": "file", "filename": str(path)}, **extra})


def _device(storage: Storage, path: Path) -> Device:
    """The image at ``path`` opened as ``disk0`` under a device ``virtio0``: the guest's path."""
    _open(storage, path)
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    return storage.device("virtio0")


# -- images: made by fleece and by qemu-img ------------------------------------------------------
SIZE = 4 * MiB

CREATORS: dict[str, Callable[[Path], None]] = {
    "fleece-64k": lambda p: create(str(p), SIZE),
    "fleece-4k-refcount4": lambda p: create(str(p), SIZE, cluster_size=4 * KiB, refcount_bits=4),
    "qemu-img-512": lambda p: _qemu_img(p, "cluster_size=512"),
    "qemu-img-v2-4k": lambda p: _qemu_img(p, "compat=0.10,cluster_size=4096"),
}


def _qemu_img(path: Path, options: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), str(SIZE))


def _guest_ops(rng: random.Random, device: Any, guest: Guest, size: int, cluster: int,
               ops: int) -> None:
    """Random writes (partial and whole clusters), zeroes, discards and flushes."""
    for _ in range(ops):
        roll = rng.random()
        length = rng.choice([512, cluster, 2 * cluster, 3 * cluster + 512, 64 * KiB])
        length = min(length, size)
        offset = rng.randrange(0, size - length + 1) // 512 * 512
        if roll < 0.6:
            data = bytes([rng.randrange(1, 256)]) * length
            guest.writing(offset, length, data)
            device.pwrite(offset, data)
        elif roll < 0.7:
            guest.writing(offset, length, None)
            device.pwrite_zeroes(offset, length, rng.random() < 0.5)
        elif roll < 0.8:
            # A discard may keep or drop the data: what it covers is undefined afterwards.
            guest.writing(offset, length, bytes(length))
            device.pdiscard(offset, length)
            guest.content[offset : offset + length] = device.pread(offset, length)
        else:
            device.flush()
            guest.flushed()


@pytest.fixture(autouse=True)
def _python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder sees the system calls made in Python (the file driver's seam). The native
    data plane's writes are the same pwrite into a cluster already allocated (it never
    allocates or touches metadata), but the recorder cannot see them: keep it off here."""
    monkeypatch.setenv("FLEECE_NO_DATAPLANE", "1")


@pytest.mark.parametrize("creator", sorted(CREATORS))
def test_allocating_writes_survive_power_loss(tmp_path: Path, creator: str) -> None:
    image = tmp_path / "disk.qcow2"
    CREATORS[creator](image)
    rng = random.Random(f"alloc-{creator}")
    with Storage() as storage:
        device = _device(storage, image)
        cluster = storage.graph.get("disk0").driver.image_info()["cluster-size"]
        # Some data first, flushed: later crash states must keep it.
        device.pwrite(0, pattern(SIZE // 2, seed=7))
        device.flush()
        recorder = Recorder()
        real = recorder.watch(image)
        with recorder.recording():
            guest = Guest(recorder, real, device.pread(0, SIZE))
            _guest_ops(rng, device, guest, SIZE, cluster, OPS)
    _verify(tmp_path, recorder, [real], seed=1)


def test_direct_writes_survive_power_loss(tmp_path: Path) -> None:
    image = tmp_path / "target.qcow2"
    create(str(image), SIZE)
    cluster = 64 * KiB
    rng = random.Random("direct")
    recorder = Recorder()
    real = recorder.watch(image)
    with recorder.recording(), Storage() as storage:
        _open(storage, image)
        node = storage.graph.get("disk0")
        user = node.add_user(*_writer(node))
        writer = FileWriter()
        guest = Guest(recorder, real, bytes(SIZE))
        try:
            for _ in range(OPS):
                roll = rng.random()
                count = rng.choice([1, 1, 2, 4])
                offset = rng.randrange(0, SIZE // cluster - count + 1) * cluster
                data = bytes([rng.randrange(1, 256)]) * (count * cluster)
                if roll < 0.6:
                    direct = node.begin_direct_write(offset, len(data))
                    guest.writing(offset, len(data), data)
                    if direct is None:  # clusters held already: the normal path
                        node.pwrite(offset, data)
                        continue
                    ticket = writer.submit(direct.fd, direct.host, data)
                    writer.wait(ticket)
                    ((_, error),) = writer.reap()
                    direct.finish(error == 0)
                    assert error == 0
                elif roll < 0.8:
                    guest.writing(offset, len(data), data)
                    node.pwrite(offset, data)
                else:
                    node.flush()
                    guest.flushed()
        finally:
            writer.close()
            user.release()
    _verify(tmp_path, recorder, [real], seed=2)


def test_a_stream_through_reservations_made_ahead_survives_power_loss(tmp_path: Path) -> None:
    """A sequential stream allocates from a reservation made ahead of it, whose refcounts the
    file makes durable write by write (``RWF_DSYNC``) rather than with a sync of the whole
    image: no pointer into it may outlive them."""
    size = 32 * MiB  # twice the first reservation: the stream's second half uses the next one
    image = tmp_path / "disk.qcow2"
    create(str(image), size)
    recorder = Recorder()
    real = recorder.watch(image)
    with recorder.recording(), Storage() as storage:
        device = _device(storage, image)
        guest = Guest(recorder, real, bytes(size))
        chunk = 256 * KiB
        for offset in range(0, size, chunk):
            data = bytes([offset // chunk % 255 + 1]) * chunk
            guest.writing(offset, chunk, data)
            device.pwrite(offset, data)
        syncs = sum(1 for e in recorder.events if isinstance(e, Sync))
        durable = sum(1 for e in recorder.events if isinstance(e, Write) and e.durable)
    assert durable and syncs <= 1  # the first reservation's sync; the next one's writes
    _verify(tmp_path, recorder, [real], seed=5)


def _writer(node: Any) -> tuple[Any, str, Any, Any]:
    from fleece.block.node import UserKind
    from fleece.block.perm import Perm

    return (UserKind.MONITOR, "the drill", Perm.CONSISTENT_READ | Perm.WRITE,
            Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


def test_copy_before_write_with_write_behind_survives_power_loss(tmp_path: Path) -> None:
    size = 8 * MiB
    src, target = tmp_path / "src.qcow2", tmp_path / "pit.qcow2"
    create(str(src), size)
    rng = random.Random("cbw")
    with Storage() as storage:
        _open(storage, src)
        storage.graph.get("disk0").pwrite(0, pattern(size, seed=11))
        storage.graph.get("disk0").flush()
    create(str(target), size, backing_file=str(src), backing_format="qcow2")
    recorder = Recorder()
    real_src, real_target = recorder.watch(src), recorder.watch(target)
    with recorder.recording(), Storage() as storage:
        device = _device(storage, src)
        guest = Guest(recorder, real_src, device.pread(0, size))
        storage.execute("drive-backup", {
            "device": "virtio0", "target": str(target), "format": "qcow2", "mode": "existing",
            "target-id": "pit0", "sync": "none", "job-id": "fleece",
        })
        _guest_ops(rng, device, guest, size, 64 * KiB, OPS)
        storage.graph.get("pit0").flush()
        storage.execute("block-job-cancel", {"device": "fleece"})
    _verify(tmp_path, recorder, [real_src, real_target], seed=3)


@pytest.mark.parametrize("creator", ["fleece-64k", "qemu-img-64k"])
def test_persistent_bitmaps_survive_power_loss(tmp_path: Path, creator: str) -> None:
    """Bitmaps added, stored on close, loaded (flagged in use) and stored again. An image made
    by qemu-img has a feature table that leaves no room in the first sector: its header
    rewrite spans two sectors, which a power loss may tear."""
    image = tmp_path / "disk.qcow2"
    if creator == "fleece-64k":
        create(str(image), SIZE)
    else:
        _qemu_img(image, "cluster_size=65536")
    rng = random.Random(f"bitmaps-{creator}")
    recorder = Recorder()
    real = recorder.watch(image)
    with recorder.recording():
        guest: Guest | None = None
        for round_ in range(3):
            with Storage() as storage:
                _open(storage, image)
                storage.execute("device_add",
                                {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
                device = storage.device("virtio0")
                if guest is None:
                    guest = Guest(recorder, real, device.pread(0, SIZE))
                storage.execute("block-dirty-bitmap-add", {
                    "node": "disk0", "name": f"b{round_}", "persistent": True,
                    "granularity": 64 * KiB,
                })
                _guest_ops(rng, device, guest, SIZE, 64 * KiB, OPS // 3)
                if round_ == 1:
                    storage.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})
            guest.flushed()  # a close flushes
    _verify(tmp_path, recorder, [real], seed=4)


def test_refcount_blocks_made_together_survive_kill_and_power_loss(tmp_path: Path) -> None:
    """The first allocation in a fresh 4 MiB image of 512-byte clusters reserves all of it: 32
    new refcount blocks, placed together after the reservation and linked into the refcount
    table entry by entry. A block whose own refcount lives in a block not linked yet would be in
    use with refcount 0 (``qemu-img check``: "refcount=0 reference=1"): so every prefix of
    the writes (what ``kill -9`` leaves) is checked, then the usual random power-loss states."""
    image = tmp_path / "disk.qcow2"
    create(str(image), 4 * MiB, cluster_size=512)
    recorder = Recorder()
    real = recorder.watch(image)
    with recorder.recording(), Storage() as storage:
        device = _device(storage, image)
        guest = Guest(recorder, real, bytes(4 * MiB))
        guest.writing(0, 4 * KiB, b"\x5a" * 4 * KiB)
        device.pwrite(0, b"\x5a" * 4 * KiB)
    writes = [i for i, e in enumerate(recorder.events) if isinstance(e, Write)]
    assert len(writes) > 64  # the blocks, their table entries: the window a kill may hit
    rng = random.Random(6)
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(
            lambda i: (i, check_state(recorder.state(i + 1, "prefix", rng),
                                      tmp_path / f"kill-{threading.get_ident()}", [real])),
            writes,
        ))
    broken = [(i, found) for i, found in verdicts if found]
    assert not broken, (
        f"{len(broken)} of {len(writes)} kill -9 moments leave a corrupt image; the first, "
        f"after write #{broken[0][0]}: {broken[0][1][0][:400]}"
    )
    _verify(tmp_path, recorder, [real], seed=6)
