"""Fault drills: injected I/O errors during backups, ENOSPC under copy-before-write, and a
client that stops reading.

- **Backup error policies**: a ``blkdebug`` filter over the source (``read_aio``) or over the
  target (``write_aio``) fails one request (``once``) during ``blockdev-backup sync=full``. For
  ``on-source-error`` and ``on-target-error`` each of ``report``, ``ignore``, ``stop`` and
  ``enospc`` (with errno 28 and with EIO): ``BLOCK_JOB_ERROR`` names the job, the operation
  (``read``/``write``) and the action; ``report`` ends with ``BLOCK_JOB_COMPLETED`` carrying an
  error; ``ignore`` completes; ``stop`` pauses the job (``query-block-jobs``: ``paused``,
  ``io-status`` ``failed``/``nospace``) until ``block-job-resume``, then the job completes and
  the target equals the source.
- **ENOSPC in copy-before-write**: fleecing (``sync=none``) into a target whose writes fail with
  ENOSPC once: the guest write that needed the copy fails with ``OSError(ENOSPC)`` and leaves
  the source as it was; the snapshot stays the point in time for every cluster.
- **A stalled NBD client** (sends hundreds of READs, never reads a reply) does not block another
  client's reads nor guest writes to the exported node.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.qcow2 import create
from fleece.errors import GenericError
from fleece.nbd.client import NBDClient
from fleece.nbd.connection import MAX_HELD_BYTES, PLANE_HELD_BYTES
from fleece.nbd.constants import REQUEST_MAGIC, Cmd
from fleece.storage import Storage
from tests.drills.support import KiB, MiB, pattern
from tests.events import EventLog

pytestmark = pytest.mark.timeout(60)

SIZE = 8 * MiB
CLUSTER = 64 * KiB
BAD_OFFSET = 3 * MiB  # the request covering this byte fails
CONTENT = pattern(SIZE, seed=7)


def qcow2(path: Path, node: str, backing: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"driver": "qcow2", "node-name": node,
                               "file": {"driver": "file", "filename": str(path)}}
    if backing is not None:
        options["backing"] = backing
    return options


def blkdebug(node: str, image: dict[str, Any], event: str, err: int) -> dict[str, Any]:
    return {"driver": "blkdebug", "node-name": node, "image": image,
            "inject-error": [{"event": event, "errno": err, "sector": BAD_OFFSET // 512,
                              "once": True}]}


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    """A source full of data and an empty target of the same size."""
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    create(str(src), SIZE)
    create(str(tgt), SIZE)
    with Storage() as storage:
        storage.execute("blockdev-add", qcow2(src, "s"))
        storage.graph.get("s").pwrite(0, CONTENT)
    return src, tgt


def start_backup(images: tuple[Path, Path], side: str, policy: str,
                 err: int) -> tuple[Storage, EventLog]:
    src, tgt = images
    storage = Storage()
    log = EventLog()
    storage.subscribe(log)
    if side == "source":
        storage.execute("blockdev-add", blkdebug("src", qcow2(src, "disk0"), "read_aio", err))
        storage.execute("blockdev-add", qcow2(tgt, "tgt"))
    else:
        storage.execute("blockdev-add", qcow2(src, "src"))
        storage.execute("blockdev-add", blkdebug("tgt", qcow2(tgt, "tgt0"), "write_aio", err))
    storage.execute("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full",
                                        "job-id": "job0", f"on-{side}-error": policy})
    return storage, log


CASES = [(side, policy, err) for side in ("source", "target")
         for policy, err in (("report", errno.EIO), ("ignore", errno.EIO), ("stop", errno.EIO),
                             ("enospc", errno.ENOSPC), ("enospc", errno.EIO))]


@pytest.mark.parametrize(("side", "policy", "err"), CASES,
                         ids=[f"{s}-{p}-{errno.errorcode[e]}" for s, p, e in CASES])
def test_backup_error_policy(images: tuple[Path, Path], side: str, policy: str,
                             err: int) -> None:
    storage, log = start_backup(images, side, policy, err)
    operation = "read" if side == "source" else "write"
    action = policy if policy != "enospc" else ("stop" if err == errno.ENOSPC else "report")
    try:
        error = log.wait("BLOCK_JOB_ERROR")
        assert error == {"device": "job0", "operation": operation, "action": action}
        if action == "stop":
            deadline = time.monotonic() + 5
            while True:
                (info,) = storage.execute("query-block-jobs")
                if info["paused"] or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert info["paused"] is True, info
            assert info["io-status"] == ("nospace" if err == errno.ENOSPC else "failed"), info
            assert not log.data("BLOCK_JOB_COMPLETED")
            storage.execute("block-job-resume", {"device": "job0"})
        done = log.wait("BLOCK_JOB_COMPLETED", device="job0")
        if action == "report":
            assert "error" in done, done
            assert done["offset"] < done["len"]
        else:
            assert "error" not in done, done
            assert done["offset"] == done["len"] == SIZE
        assert len(log.data("BLOCK_JOB_ERROR")) == 1  # the rule was `once`
        if action == "stop":
            target = storage.graph.get("tgt")
            assert target.pread(0, SIZE) == CONTENT  # the retried copy landed
    finally:
        storage.close()


def test_enospc_while_copying_before_a_guest_write(tmp_path: Path,
                                                    images: tuple[Path, Path]) -> None:
    """Fleecing into a target that runs out of space once: the guest write that needed the
    copy fails with ENOSPC, the source keeps its old data there, and the snapshot is still the
    point in time everywhere."""
    src, _ = images
    pit = tmp_path / "pit.qcow2"
    create(str(pit), SIZE, backing_file=str(src), backing_format="qcow2")
    storage = Storage()
    log = EventLog()
    storage.subscribe(log)
    try:
        storage.execute("blockdev-add", qcow2(src, "disk0"))
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                       "drive": "disk0"})
        storage.execute("blockdev-add", blkdebug("pit0", qcow2(pit, "pitq", "disk0"),
                                                 "write_aio", errno.ENOSPC))
        storage.execute("blockdev-backup", {"device": "virtio0", "target": "pit0",
                                            "sync": "none", "job-id": "fleece"})
        device = storage.device("virtio0")
        new = b"\xee" * CLUSTER
        with pytest.raises(OSError) as failed:
            device.pwrite(BAD_OFFSET, new)
        assert failed.value.errno == errno.ENOSPC, failed.value
        assert device.pread(BAD_OFFSET, CLUSTER) == CONTENT[BAD_OFFSET:BAD_OFFSET + CLUSTER]
        # Other clusters: the rule fired once, copies work again.
        for offset in (0, 1 * MiB + 512, BAD_OFFSET + CLUSTER, SIZE - CLUSTER):
            device.pwrite(offset, new)
            assert device.pread(offset, CLUSTER) == new
        # The write that failed can be retried now.
        device.pwrite(BAD_OFFSET, new)
        snapshot = storage.graph.get("pit0").pread(0, SIZE)
        assert snapshot == CONTENT
    finally:
        storage.close()


# -- a client that stops reading ----------------------------------------------------------------
@pytest.fixture
def served(tmp_path: Path, images: tuple[Path, Path]) -> Iterator[tuple[Storage, str]]:
    src, _ = images
    sock = str(tmp_path / "nbd.sock")
    storage = Storage()
    try:
        storage.execute("blockdev-add", qcow2(src, "disk0"))
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                       "drive": "disk0", "share-rw": True})
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        storage.execute("nbd-server-add", {"device": "disk0", "name": "disk0"})
        yield storage, sock
    finally:
        storage.close()


def stall(sock_path: str, requests: int, length: int) -> tuple[NBDClient, int]:
    """A client that negotiates, sends ``requests`` READs of ``length`` and never reads.
    Returns it and how many requests the server took before the socket filled up."""
    client = NBDClient.connect_unix(sock_path, "disk0")
    client.sock.settimeout(2.0)
    sent = 0
    try:
        for i in range(requests):
            offset = (i * length) % (SIZE - length)
            client.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, i + 1,
                                            offset, length))
            sent += 1
    except (TimeoutError, OSError):
        pass  # the server stopped reading from us: that is the back-pressure we want
    return client, sent


def test_stalled_client_blocks_no_one(served: tuple[Storage, str]) -> None:
    storage, sock = served
    stalled, sent = stall(sock, 320, 1 * MiB)
    try:
        assert sent > 0
        # Another client reads everything, correctly, in bounded time.
        start = time.monotonic()
        with NBDClient.connect_unix(sock, "disk0") as other:
            for offset in range(0, SIZE, 1 * MiB):
                assert other.pread(offset, 1 * MiB) == CONTENT[offset:offset + 1 * MiB]
        assert time.monotonic() - start < 10
        # Guest writes complete in bounded time (a thread, so a hang is a failure, not a hang).
        device = storage.device("virtio0")
        finished = threading.Event()

        def guest() -> None:
            for offset in range(0, SIZE, 1 * MiB):
                device.pwrite(offset, b"\x5a" * 4096)
            device.flush()
            finished.set()

        writer = threading.Thread(target=guest, daemon=True)
        writer.start()
        assert finished.wait(10), "guest writes blocked behind a stalled NBD client"
        # The stalled client can still be dropped and the export removed.
        connections = storage.nbd_server.connections if storage.nbd_server else set()
        assert len(connections) >= 1
    finally:
        stalled.sock.close()


@pytest.mark.parametrize("through", ["qcow2", "blkdebug"])
def test_stalled_client_queue_is_bounded(tmp_path: Path, images: tuple[Path, Path],
                                         through: str) -> None:
    """What the server holds for a client that never reads stays within its budget (requests
    in flight plus unread replies: MAX_HELD_BYTES, PLANE_HELD_BYTES with the native data
    plane, and the one request that crossed it), however many requests it sent. Through
    ``blkdebug`` (which maps nothing for the plane) every read is Python's."""
    src, _ = images
    sock = str(tmp_path / "nbd.sock")
    image = qcow2(src, "disk0")
    if through == "blkdebug":
        image = {"driver": "blkdebug", "node-name": "disk0",
                 "image": {**image, "node-name": "img"}}
    with Storage() as storage:
        storage.execute("blockdev-add", image)
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        storage.execute("nbd-server-add", {"device": "disk0", "name": "disk0"})
        stalled, _ = stall(sock, 320, 1 * MiB)
        try:
            time.sleep(1.0)
            server = storage.nbd_server
            assert server is not None
            (connection,) = [c for c in server.connections if c.export is not None]
            assert connection.held_limit == (MAX_HELD_BYTES if connection.plane is None
                                             else PLANE_HELD_BYTES)
            queued = connection.sender.pending if connection.sender is not None else 0
            held = queued + connection.in_flight_bytes
            assert held >= connection.held_limit // 2, "the test stalled nothing"
            assert held <= connection.held_limit + 1 * MiB, (
                f"{held / MiB:.1f} MiB held, never read")
        finally:
            stalled.sock.close()


def test_injected_errors_are_rejected_cleanly(tmp_path: Path) -> None:
    """A bad blkdebug rule is a GenericError, not a crash."""
    path = tmp_path / "x.qcow2"
    create(str(path), 1 * MiB)
    with Storage() as storage, pytest.raises(GenericError):
        storage.execute("blockdev-add", {"driver": "blkdebug", "node-name": "b",
                                         "image": qcow2(path, "q"),
                                         "inject-error": [{"event": "nonsense"}]})

