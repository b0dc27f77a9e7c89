"""The native data plane (:mod:`fleece._fast.dataplane`, :mod:`fleece.block.route`).

Each test runs in both unit passes. With the compiled extensions the plane serves the reads its
route maps and the counters must show it; with ``FLEECE_NO_EXTENSIONS=1`` there is no route and
every read goes through the graph: the answers must be the same either way. The defect tests
(stale mappings after a discard, a snapshot read racing a guest write, a broken snapshot, a
drained root) each fail when the matching safeguard is taken out of the plane.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fleece.block import route
from fleece.nbd import dataplane
from fleece.nbd.client import NBDClient, NBDError
from fleece.nbd.constants import Cmd
from fleece.storage import Storage

if TYPE_CHECKING:
    from fleece._fast.dataplane import Route

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 8 * MiB
NATIVE = route.available()


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def storage() -> Iterator[Storage]:
    with Storage() as storage:
        yield storage


def _serve(storage: Storage, tmp_path: Path) -> str:
    sock = str(tmp_path / "nbd.sock")
    storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    return sock


def _grew(before: int) -> bool:
    return dataplane.native_requests() > before


def test_the_switches() -> None:
    assert dataplane.enabled() is NATIVE
    os.environ["FLEECE_NO_DATAPLANE"] = "1"
    try:
        assert not dataplane.enabled()
    finally:
        del os.environ["FLEECE_NO_DATAPLANE"]
    assert (route.new_route() is None) is not NATIVE


def test_a_route_maps_replaces_and_forgets(tmp_path: Path) -> None:
    if not NATIVE:  # the route is compiled only
        assert route.new_route() is None
        return
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)
    fd = os.open(path, os.O_RDONLY)
    try:
        native = route.new_route()
        assert native is not None
        gen = native.generation
        assert native.add(gen, 0, 4096, fd, 0) and native.add(gen, 8192, 4096, fd, 100)
        buf = bytearray(16)
        assert native.pread_into(8, buf) and buf == path.read_bytes()[8:24]
        assert not native.pread_into(4090, buf)  # a gap at 4096: the caller reads it
        assert native.add(gen, 4096, 4096, fd, 4096)  # the gap filled, contiguous on disk
        assert native.pread_into(4090, buf) and buf == path.read_bytes()[4090:4106]
        assert native.add(gen, 2048, 8192, fd, 10000)  # splits the extents it overlaps
        assert len(native) == 3
        assert native.pread_into(2040, buf)
        data = path.read_bytes()
        assert buf == data[2040:2048] + data[10000:10008]
        assert native.mapped_until(0, 1 << 20) == 12288  # up to the end of the last extent
        assert native.mapped_until(100, 5000) == 5000 and native.mapped_until(20000, 30000) == 20000
        native.invalidate()
        assert len(native) == 0 and not native.pread_into(0, buf)
        assert not native.add(gen, 0, 4096, fd, 0)  # learned before the invalidation
        native.close()
        assert not native.add(native.generation, 0, 4096, fd, 0)  # closed: drained
        native.open()
        assert native.add(native.generation, 0, 4096, fd, 0)
        with pytest.raises(ValueError):
            native.add(native.generation, 0, 0, fd, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("structured", [True, False])
def test_reads_answer_like_the_graph(storage: Storage, tmp_path: Path, fmt: str,
                                     structured: bool) -> None:
    image = tmp_path / f"disk.{fmt}"
    _qemu_img("create", "-f", fmt, str(image), str(SIZE))
    pattern = os.urandom(SIZE // 2)
    storage.execute("blockdev-add", {"driver": fmt, "node-name": "disk",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.graph.get("disk").pwrite(0, pattern)  # half data, half unallocated
    sock = _serve(storage, tmp_path)
    storage.execute("nbd-server-add", {"device": "disk", "name": "disk"})
    expected = pattern + bytes(SIZE // 2)
    before = dataplane.native_requests()
    with NBDClient.connect_unix(sock, "disk", structured=structured) as client:
        for _ in range(2):  # the second pass finds the mappings the first one taught
            for offset in range(0, SIZE, 3 * CLUSTER + 512):
                length = min(2 * CLUSTER + 7, SIZE - offset)
                assert client.pread(offset, length) == expected[offset:offset + length]
        with pytest.raises(NBDError) as exc:
            client.pread(SIZE - 512, 1024)  # past the end: Python refuses it
        assert exc.value.errno == errno.EINVAL
        assert client.pread(0, 4096) == expected[:4096]  # still served after the error
    assert _grew(before) is NATIVE


def _random_qcow2_served(storage: Storage, tmp_path: Path) -> tuple[str, bytes]:
    """A qcow2 disk full of random data, exported read-only as ``disk``: the socket and the
    data."""
    image = tmp_path / "disk.qcow2"
    _qemu_img("create", "-f", "qcow2", str(image), str(SIZE))
    pattern = os.urandom(SIZE)
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.graph.get("disk").pwrite(0, pattern)
    sock = _serve(storage, tmp_path)
    storage.execute("nbd-server-add", {"device": "disk", "name": "disk"})
    return sock, pattern


@pytest.mark.parametrize("structured", [True, False])
def test_replies_stay_whole_and_in_place_when_the_client_lags(
        storage: Storage, tmp_path: Path, structured: bool) -> None:
    """A large native read goes out with ``sendfile`` and streams when the socket is full:
    the plane waits a little for room, then reads the rest into the front of its outbox.
    Python's reply to the flush sent just before it is queued meanwhile, and must leave after
    all of the read. Each round sends a flush and a read the socket cannot hold, and reads
    nothing until the plane's wait has run out."""
    sock, pattern = _random_qcow2_served(storage, tmp_path)
    chunk = 4 * MiB
    with NBDClient.connect_unix(sock, "disk", structured=structured) as client:
        assert client.pread(0, SIZE) == pattern  # the route learns the disk
        before = dataplane.native_requests()
        for n in range(6):
            offset = n % 2 * chunk
            flush = client.submit(Cmd.FLUSH)
            read = client.submit(Cmd.READ, offset, chunk)
            time.sleep(0.1)  # the socket fills; the plane's wait for room runs out
            reply = client.wait(read)
            assert reply.error == 0 and reply.data == pattern[offset:offset + chunk]
            assert client.wait(flush).error == 0
    assert _grew(before) is NATIVE


def test_a_deep_pipeline_read_slowly_still_goes_out_with_sendfile(
        storage: Storage, tmp_path: Path) -> None:
    """A client that keeps many reads in flight and takes its replies a little late (nbdcopy
    with its 64 requests per connection, on a busy machine) fills the socket, so one reply's
    rest is copied into the outbox. The plane takes the next request only once the outbox is
    empty: had it served it behind the queued rest, the reply could not have streamed with
    ``sendfile`` and would have been copied too, and the next, as long as the client lags.
    (Without the compiled plane Python serves them, as correctly.)"""
    sock, pattern = _random_qcow2_served(storage, tmp_path)
    piece = 256 * 1024
    with NBDClient.connect_unix(sock, "disk") as client:
        assert client.pread(0, SIZE) == pattern  # the route learns the disk
        before = dataplane.sendfile_bytes()
        offsets = [n * piece % SIZE for n in range(48)]
        cookies = [client.submit(Cmd.READ, offset, piece) for offset in offsets]
        time.sleep(0.1)  # the socket fills; the first stream's wait for room runs out
        for cookie, offset in zip(cookies, offsets, strict=True):
            reply = client.wait(cookie)
            assert reply.error == 0 and reply.data == pattern[offset:offset + piece]
            time.sleep(0.005)  # a client a little late for each reply
    streamed = dataplane.sendfile_bytes() - before
    if NATIVE:
        assert streamed >= 0.5 * len(offsets) * piece, f"{streamed} of {len(offsets) * piece}"
    else:
        assert streamed == 0  # no plane: Python served them


@pytest.mark.parametrize("write", [60 * 1024, 1 * MiB])
def test_a_client_that_reads_replies_only_after_sending_is_not_deadlocked(
        storage: Storage, tmp_path: Path, write: int) -> None:
    """A client sends a large read, a write and another read before it reads any reply (a
    simple client, or one thread sending while another will read). The read's reply fills
    the socket and its rest waits in the plane's outbox; the plane must still take the
    write and the read after it, or the client blocks in its send while the plane waits
    for it to read: each side waits for the other (found by the differential test). A
    write larger than the plane's input buffer must get through too. (What a client may
    leave unread is bounded: past the connection's budget it must read, as from QEMU.)"""
    image = tmp_path / "disk.qcow2"
    _qemu_img("create", "-f", "qcow2", str(image), str(SIZE))
    pattern = bytearray(os.urandom(SIZE))
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.graph.get("disk").pwrite(0, bytes(pattern))
    sock = _serve(storage, tmp_path)
    storage.execute("nbd-server-add", {"device": "disk", "name": "disk", "writable": True})
    big = 320 * 1024  # more than the socket holds
    with NBDClient.connect_unix(sock, "disk") as client:
        client.sock.settimeout(5.0)  # a deadlock fails the test instead of hanging it
        assert client.pread(0, big) == pattern[:big]  # the route learns the disk
        data = os.urandom(write)
        first = client.submit(Cmd.READ, 0, big)
        written = client.submit(Cmd.WRITE, SIZE - write, payload=data)
        last = client.submit(Cmd.READ, 0, 1)
        assert client.wait(first).data == bytes(pattern[:big])
        assert client.wait(written).error == 0
        assert client.wait(last).data == bytes(pattern[:1])
        pattern[SIZE - write:] = data
        assert client.pread(0, SIZE) == pattern


def _flush_until_paused(storage: Storage, client: NBDClient, within: float) -> None:
    """Send 20 flushes of a disk made slow: Python runs 16 at once and pauses the connection
    (with no reply queued); fail unless it pauses ``within`` seconds."""
    server = storage.nbd_server
    assert server is not None
    for _ in range(20):
        client.submit(Cmd.FLUSH)
    deadline = time.monotonic() + within
    while not any(c.paused for c in server.connections):
        assert time.monotonic() < deadline, "the connection never paused"
        time.sleep(0.01)


def test_a_paused_plane_does_not_spin_after_its_client_hung_up(
        storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sends more slow requests than Python runs at once (16 flushes of a slow
    disk), so the connection pauses with no reply queued, and hangs up. The socket then
    polls as hung up at once and for good: a plane that kept polling it, wanting neither
    to read nor to send, would spin on a core until the flushes ended. Its CPU time while
    they run stays near nothing."""
    sock, _ = _random_qcow2_served(storage, tmp_path)
    monkeypatch.setattr(storage.graph.get("disk"), "flush", lambda: time.sleep(1.0))
    client = NBDClient.connect_unix(sock, "disk")
    _flush_until_paused(storage, client, within=5.0)
    client.sock.close()
    time.sleep(0.1)
    before = time.process_time()
    time.sleep(0.5)
    spent = time.process_time() - before
    assert spent < 0.2, f"{spent:.2f} s of CPU in 0.5 s while the client was gone"


def test_a_pause_is_answered_with_one_report_even_with_nothing_queued(
        storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python pauses a connection on a count it took earlier (bytes queued, requests running);
    by the time the plane looks, the socket may have taken every queued byte, and no later
    send would tell Python so: the plane owes it one report right after each pause. Here
    the pause comes from 16 slow flushes running, with no reply queued at all: the report
    must come long before the first flush ends."""
    sock, _ = _random_qcow2_served(storage, tmp_path)
    monkeypatch.setattr(storage.graph.get("disk"), "flush", lambda: time.sleep(2.5))
    with NBDClient.connect_unix(sock, "disk") as client:
        before = dataplane.progress_reports()
        _flush_until_paused(storage, client, within=1.5)
        time.sleep(0.3)  # the flushes still run (0.7 s at least): nothing was sent
        assert (dataplane.progress_reports() == before + 1) is NATIVE


def test_a_client_served_natively_wakes_python_for_nothing(
        storage: Storage, tmp_path: Path) -> None:
    """Replies the plane queued for a lagging client and sent later are nobody's business
    but the plane's while Python has not paused the connection: telling it cost a GIL
    round and a turn of the event loop per flush (about a third of the daemon's CPU with
    four nbdcopy connections)."""
    sock, pattern = _random_qcow2_served(storage, tmp_path)
    piece = 256 * 1024
    with NBDClient.connect_unix(sock, "disk") as client:
        for offset in range(0, SIZE, piece):  # the route learns the disk (within the budget:
            assert client.pread(offset, piece) == pattern[offset:offset + piece]  # no pause)
        before, streamed = dataplane.progress_reports(), dataplane.sendfile_bytes()
        offsets = [n * piece % SIZE for n in range(48)]
        cookies = [client.submit(Cmd.READ, offset, piece) for offset in offsets]
        time.sleep(0.1)  # the socket fills: a stream's rest is queued, and sent later
        for cookie, offset in zip(cookies, offsets, strict=True):
            reply = client.wait(cookie)
            assert reply.error == 0 and reply.data == pattern[offset:offset + piece]
            time.sleep(0.005)
        queued = dataplane.sendfile_bytes() - streamed < len(offsets) * piece
    if NATIVE:
        assert queued, "no reply waited in the outbox: the test showed nothing"
    assert dataplane.progress_reports() == before


def test_a_client_python_paused_gets_every_reply_as_it_reads(tmp_path: Path) -> None:
    """Reads Python serves (``blkdebug`` maps nothing for the plane) held back by a client
    that does not read pause the connection at its budget; as the client reads, the plane
    tells Python that its replies left, and reading resumes until every reply came."""
    image = tmp_path / "disk.qcow2"
    _qemu_img("create", "-f", "qcow2", str(image), str(SIZE))
    pattern = os.urandom(SIZE)
    with Storage() as storage:
        storage.execute("blockdev-add", {
            "driver": "blkdebug", "node-name": "disk",
            "image": {"driver": "qcow2", "node-name": "img",
                      "file": {"driver": "file", "filename": str(image)}}})
        storage.graph.get("disk").pwrite(0, pattern)
        sock = _serve(storage, tmp_path)
        storage.execute("nbd-server-add", {"device": "disk", "name": "disk"})
        before = dataplane.progress_reports()
        with NBDClient.connect_unix(sock, "disk") as client:
            offsets = [n * MiB % SIZE for n in range(32)]
            cookies = [client.submit(Cmd.READ, offset, MiB) for offset in offsets]
            time.sleep(0.2)  # far past the connection's budget: it pauses
            for cookie, offset in zip(cookies, offsets, strict=True):
                reply = client.wait(cookie)
                assert reply.error == 0 and reply.data == pattern[offset:offset + MiB]
        assert (dataplane.progress_reports() > before) is NATIVE


def test_a_trim_drops_the_mapping_of_the_freed_cluster(storage: Storage, tmp_path: Path) -> None:
    """A qcow2 cluster freed by a trim, then written again (a new host cluster): a native read
    must find the new data, not the freed cluster through a stale mapping."""
    image = tmp_path / "disk.qcow2"
    _qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", str(image), str(SIZE))
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk", "discard": "unmap",
                                     "file": {"driver": "file", "filename": str(image)}})
    node = storage.graph.get("disk")
    sock = _serve(storage, tmp_path)
    storage.execute("nbd-server-add", {"device": "disk", "name": "disk", "writable": True})
    with NBDClient.connect_unix(sock, "disk") as client:
        for round_ in range(4):
            offset = round_ * 3 * CLUSTER
            client.pwrite(offset, b"\xaa" * CLUSTER)
            for _ in range(2):  # taught, then served natively
                assert client.pread(offset, CLUSTER) == b"\xaa" * CLUSTER
            host = node.block_status(offset, CLUSTER).host_offset
            client.trim(offset, CLUSTER)
            assert client.pread(offset, CLUSTER) == bytes(CLUSTER)
            client.pwrite(offset, b"\xcc" * CLUSTER)
            moved = node.block_status(offset, CLUSTER).host_offset != host
            assert client.pread(offset, CLUSTER) == b"\xcc" * CLUSTER, f"{round_=} {moved=}"
            client.zero(offset, CLUSTER)  # a zero write may free the cluster too
            client.pwrite(offset, b"\xdd" * CLUSTER)
            assert client.pread(offset, CLUSTER) == b"\xdd" * CLUSTER, f"{round_=}"


def _fleecing(storage: Storage, tmp_path: Path) -> tuple[str, bytes]:
    """A qcow2 source full of data, plugged in, fleeced to pit0 (drive-backup sync=none) and
    exported: the socket, and the content at the instant."""
    image = tmp_path / "src.qcow2"
    _qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", str(image), str(SIZE))
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
    instant = os.urandom(SIZE)
    storage.device("virtio0").pwrite(0, instant)
    sock = _serve(storage, tmp_path)
    storage.execute("drive-backup", {"device": "virtio0", "target": str(tmp_path / "pit.qcow2"),
                                     "format": "qcow2", "target-id": "pit0", "sync": "none"})
    storage.execute("nbd-server-add", {"device": "pit0", "name": "pit0"})
    return sock, instant


def test_snapshot_reads_keep_the_instant_while_the_guest_writes(
        storage: Storage, tmp_path: Path) -> None:
    """Uncopied clusters are read from the source natively: a guest write that lands after the
    mapping was learned must not show through (the copied bit is checked around the read)."""
    sock, instant = _fleecing(storage, tmp_path)
    device = storage.device("virtio0")
    with NBDClient.connect_unix(sock, "pit0") as client:
        assert client.pread(0, SIZE // 2) == instant[:SIZE // 2]  # teaches the route
        before = dataplane.native_requests()
        assert client.pread(0, SIZE // 2) == instant[:SIZE // 2]
        assert _grew(before) is NATIVE
        for offset in range(0, SIZE // 2, 5 * CLUSTER):
            device.pwrite(offset + 100, b"\x5a" * 3000)
            assert client.pread(offset, CLUSTER) == instant[offset:offset + CLUSTER]
        assert client.pread(0, SIZE) == instant
    assert device.pread(100, 3000) == b"\x5a" * 3000


def test_a_broken_snapshot_stops_native_reads(storage: Storage, tmp_path: Path) -> None:
    sock, instant = _fleecing(storage, tmp_path)
    storage.device("virtio0").pwrite(0, b"\x01" * CLUSTER)  # cluster 0 copied to pit0
    with NBDClient.connect_unix(sock, "pit0") as client:
        for _ in range(2):
            assert client.pread(0, 4 * CLUSTER) == instant[:4 * CLUSTER]
        cbw = storage.graph.get("pit0").read_guard
        assert cbw is not None
        cbw.cbw.break_snapshot("test")  # type: ignore[attr-defined]
        for offset in (0, 2 * CLUSTER):  # a copied cluster and a read-through one
            with pytest.raises(NBDError) as exc:
                client.pread(offset, CLUSTER)
            assert exc.value.errno == errno.EPERM  # NBD has no EACCES


def test_a_drained_root_serves_nothing_natively(storage: Storage, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(SIZE))
    storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk"})
    device = storage.device("virtio0")
    root = device.root
    buf = bytearray(CLUSTER)
    device.pread_into(0, buf)  # teaches the device's route
    native = root.route
    assert (native is not None) is NATIVE
    if native is None:
        return
    assert native.pread_into(0, buf)
    root.drain_begin()
    try:
        assert not native.pread_into(0, buf)  # a graph change may be under way
    finally:
        root.drain_end()
    device.pread_into(0, buf)
    assert native.pread_into(0, buf) and buf == image.read_bytes()[:CLUSTER]


def test_a_bitmap_added_later_sees_native_writes(storage: Storage, tmp_path: Path) -> None:
    """A range the plane writes itself, then a dirty bitmap on the node: the next writes
    there must mark it (adding the bitmap drops the routes through the node)."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SIZE))
    storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk",
                                     "file": {"driver": "file", "filename": str(image)}})
    sock = _serve(storage, tmp_path)
    storage.execute("nbd-server-add", {"device": "disk", "name": "disk", "writable": True})
    with NBDClient.connect_unix(sock, "disk") as client:
        for _ in range(3):  # taught by the first, native from then on
            client.pwrite(0, b"\x01" * CLUSTER)
        before = dataplane.native_requests()
        client.pwrite(0, b"\x02" * CLUSTER)
        assert _grew(before) is NATIVE
        storage.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
        client.pwrite(2 * CLUSTER, b"\x03" * CLUSTER)  # taught again, now not writable
        for _ in range(2):
            client.pwrite(2 * CLUSTER, b"\x04" * CLUSTER)
            client.pwrite(0, b"\x05" * CLUSTER)
    bitmap = storage.graph.get("disk").bitmaps.get("b0")
    assert bitmap is not None
    assert bitmap.get(0) and bitmap.get(2 * CLUSTER)
    assert image.read_bytes()[:3 * CLUSTER] == b"\x05" * CLUSTER + bytes(CLUSTER) + (
        b"\x04" * CLUSTER)


def test_device_writes_copy_before_write_once_fleecing_starts(
        storage: Storage, tmp_path: Path) -> None:
    """A device whose writes went natively to the source: once a backup inserts its filter,
    a write to a cluster not copied yet must copy it first (the insertion drains the device
    and drops its route; the filter's mapping takes writes only of copied clusters)."""
    image = tmp_path / "src.raw"
    instant = os.urandom(SIZE)
    image.write_bytes(instant)
    storage.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
    device = storage.device("virtio0")
    for offset in range(0, SIZE, CLUSTER):  # every range learned, written natively after
        device.pwrite(offset, instant[offset:offset + CLUSTER])
        device.pwrite(offset, instant[offset:offset + CLUSTER])
    storage.execute("drive-backup", {"device": "virtio0", "target": str(tmp_path / "pit.qcow2"),
                                     "format": "qcow2", "target-id": "pit0", "sync": "none"})
    for offset in range(0, SIZE, 3 * CLUSTER):
        for pattern in (b"\xee", b"\xef"):  # the second write finds the cluster copied
            device.pwrite(offset, pattern * CLUSTER)
    assert storage.graph.get("pit0").pread(0, SIZE) == instant
    assert device.pread(0, CLUSTER) == b"\xef" * CLUSTER


@contextmanager
def _file_route(tmp_path: Path, flags: int) -> Iterator[tuple[Route, int, Path]]:
    """A fresh native route, and a file of 8 clusters of zeroes open with ``flags``."""
    path = tmp_path / "f"
    path.write_bytes(bytes(8 * CLUSTER))
    fd = os.open(path, flags)
    try:
        native = route.new_route()
        assert native is not None
        yield native, fd, path
    finally:
        os.close(fd)


def test_a_write_guard_admits_writes_of_copied_clusters_only(tmp_path: Path) -> None:
    """Copy-before-write's mapping: reads go through whatever is copied; a write goes
    natively only once every cluster it touches is copied, including a cluster copied after
    the extent was learned (no relearning), and never past the bitmap."""
    if not NATIVE:  # the route is compiled only
        return
    from fleece._fast.bitmap import ClusterBitmap

    with _file_route(tmp_path, os.O_RDWR) as (native, fd, path):
        copied = ClusterBitmap(4)  # the extent reaches past it: those clusters never qualify
        assert native.add(native.generation, 0, 8 * CLUSTER, fd, 0, cluster=CLUSTER,
                          writable=True, write_guard=copied)
        data = b"\x5a" * CLUSTER
        assert native.pread_into(CLUSTER, bytearray(CLUSTER))
        assert not native.pwrite_from(CLUSTER, data)
        copied.set_range(1, 1)
        assert native.pwrite_from(CLUSTER, data)
        assert not native.pwrite_from(CLUSTER + 1, data)  # reaches into cluster 2
        copied.set_range(2, 2)
        assert native.pwrite_from(CLUSTER + 1, data)
        assert not native.pwrite_from(4 * CLUSTER, data)  # past the bitmap
        assert path.read_bytes()[CLUSTER:2 * CLUSTER + 1] == data + data[:1]
        assert path.read_bytes()[:CLUSTER] == bytes(CLUSTER)


def test_a_write_waits_for_a_copy_under_way_then_goes_natively(tmp_path: Path) -> None:
    """A write to clusters not copied but pending (the copier holds them) waits for their
    copy natively and then goes on natively; one to clusters neither copied nor pending,
    or whose copy stays pending past the wait, goes to Python (False). Each write that
    waited counts once in the pending bitmap's ``waits`` (the copier reads its writer being
    right behind it there)."""
    if not NATIVE:  # the route is compiled only
        return
    from fleece._fast.bitmap import ClusterBitmap

    with _file_route(tmp_path, os.O_RDWR) as (native, fd, path):
        copied, pending = ClusterBitmap(8), ClusterBitmap(8)
        assert native.add(native.generation, 0, 8 * CLUSTER, fd, 0, cluster=CLUSTER,
                          writable=True, write_guard=copied, write_pending=pending)
        data = b"\x5b" * CLUSTER
        assert not native.pwrite_from(CLUSTER, data)  # neither: Python's, at once
        assert pending.waits == 0
        pending.set_range(1, 2)
        began = time.monotonic()
        assert not native.pwrite_from(CLUSTER, data)  # its copy never comes: gives up
        assert 0.01 < time.monotonic() - began < 5
        assert pending.waits == 1  # one write, however many times it looked

        def copy_done() -> None:  # as copy-before-write's copier ends a piece
            copied.set_range(1, 2)
            pending.clear_range(1, 2)

        copier = threading.Timer(0.005, copy_done)
        copier.start()
        assert native.pwrite_from(CLUSTER, data + data)  # waited, then native
        copier.join()
        assert pending.waits <= 2  # (2, unless the copy beat the write to it)
        assert path.read_bytes()[CLUSTER:3 * CLUSTER] == data + data
        pending.set_range(4, 1)  # a pending cluster beside one neither copied nor pending
        assert not native.pwrite_from(4 * CLUSTER, data + data)


def test_a_guarded_extent_ends_at_its_first_copied_cluster(tmp_path: Path) -> None:
    if not NATIVE:  # the route is compiled only
        return
    from fleece._fast.bitmap import ClusterBitmap

    with _file_route(tmp_path, os.O_RDONLY) as (native, fd, _):
        done = ClusterBitmap(8)
        assert native.add(native.generation, 0, 8 * CLUSTER, fd, 0, done, CLUSTER)
        buf = bytearray(CLUSTER)
        assert native.mapped_until(0, 8 * CLUSTER) == 8 * CLUSTER
        assert native.pread_into(3 * CLUSTER, buf)
        done.set_range(3, 1)
        assert native.mapped_until(0, 8 * CLUSTER) == 3 * CLUSTER  # learn from there
        assert not native.pread_into(3 * CLUSTER, buf)  # the target has it now
        assert not native.pread_into(2 * CLUSTER, bytearray(CLUSTER + 1))
        assert native.pread_into(4 * CLUSTER, buf)
        with pytest.raises(ValueError):
            native.add(native.generation, 0, CLUSTER, fd, 0, done, 0)  # no cluster size


def _per_byte(extents: list[tuple[int, int]], start: int) -> dict[int, int]:
    """Each cluster's flags, from a block status reply starting at ``start``."""
    status: dict[int, int] = {}
    pos = start
    for length, flags in extents:
        for cluster in range(pos // CLUSTER, (pos + length) // CLUSTER):
            status[cluster] = flags
        pos += length
    return status


def test_block_status_answers_like_the_graph(storage: Storage, tmp_path: Path) -> None:
    """base:allocation alone is answered by the plane where the route knows the data; the
    oracle is a second client that also chose allocation-depth (which only Python answers).
    Clusters copied since the route learned its read-through mapping (one of them zeroes)
    are answered as the target has them."""
    sock, _ = _fleecing(storage, tmp_path)
    device = storage.device("virtio0")
    device.pwrite(5 * CLUSTER, bytes(CLUSTER))  # data that reads as zeroes
    storage.execute("block-export-add", {"type": "nbd", "id": "oracle", "name": "oracle",
                                         "node-name": "pit0", "allocation-depth": True})
    with NBDClient.connect_unix(sock, "pit0") as client, NBDClient.connect_unix(
            sock, "oracle", contexts=("base:allocation", "qemu:allocation-depth")) as oracle:
        client.pread(0, SIZE)  # teaches the route (guarded: the source's clusters)
        device.pwrite(5 * CLUSTER, b"\x07" * CLUSTER)  # copies cluster 5 (zeroes) first
        device.pwrite(9 * CLUSTER, b"\x07" * CLUSTER)  # and cluster 9 (data)
        before = dataplane.native_requests()
        for start in (0, 4 * CLUSTER, 5 * CLUSTER, 8 * CLUSTER, 10 * CLUSTER):
            got = _per_byte(client.block_status(start, SIZE - start), start)
            want = _per_byte(oracle.block_status(start, SIZE - start), start)
            assert got and all(want[c] == flags for c, flags in got.items()), start
        assert _grew(before) is NATIVE
