"""The ``nbd`` block driver against fleece's own NBD server (a second ``Storage``): options,
I/O, block status, zeroes and trims, threads, and reconnecting within and past
``reconnect-delay``. Real servers (qemu-nbd, nbdkit) are in ``tests/interop``."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block import route
from fleece.block.drivers.nbd import Link, NBDDriver
from fleece.block.node import BlockNode
from fleece.errors import GenericError
from fleece.nbd.client import NBDClient
from fleece.nbd.constants import Cmd, CmdFlag, TransmissionFlag
from fleece.storage import Storage
from tests.events import EventLog

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SIZE = 8 * MiB
NO_FLAGS = CmdFlag(0)


class Remote:
    """A ``Storage`` serving a sparse raw image as writable export ``disk``."""

    def __init__(self, tmp: Path) -> None:
        self.image = tmp / "remote.raw"
        with self.image.open("wb") as f:
            f.truncate(SIZE)
        self.sock = str(tmp / "remote.sock")
        self.storage: Storage | None = None
        self.start()

    def start(self) -> None:
        storage = Storage()
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk", "discard": "unmap",
                                         "file": {"driver": "file", "discard": "unmap",
                                                  "filename": str(self.image)}})
        storage.execute("nbd-server-start",
                        {"addr": {"type": "unix", "data": {"path": self.sock}}})
        storage.execute("nbd-server-add", {"device": "disk", "writable": True})
        self.storage = storage

    def stop(self) -> None:
        if self.storage is not None:
            self.storage.close()
            self.storage = None


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    server = Remote(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def local() -> Iterator[Storage]:
    with Storage() as storage:
        yield storage


def _add(storage: Storage, remote: Remote, **extra: Any) -> BlockNode:
    storage.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "export": "disk",
                                     "server": {"type": "unix", "path": remote.sock}, **extra})
    node = storage.graph.get("nbd0")
    assert isinstance(node.driver, NBDDriver)
    return node


def test_read_write_size_and_filename(remote: Remote, local: Storage) -> None:
    node = _add(local, remote)
    assert node.size == SIZE
    node.pwrite(MiB, b"\xab" * 65536)
    assert node.pread(MiB - 4, 8) == b"\0" * 4 + b"\xab" * 4
    big = bytes(range(256)) * (3 * MiB // 256)
    node.pwrite(2 * MiB, big)
    assert node.pread(2 * MiB, len(big)) == big
    node.flush()
    with remote.image.open("rb") as f:
        f.seek(2 * MiB)
        assert f.read(len(big)) == big
    assert node.driver.filename() == f"nbd+unix:///disk?socket={remote.sock}"
    info = local.execute("query-named-block-nodes", {})
    assert any(n["node-name"] == "nbd0" and n["drv"] == "nbd" for n in info)


def test_block_status_zeroes_and_trim(remote: Remote, local: Storage) -> None:
    node = _add(local, remote, discard="unmap")
    first = node.block_status(0, SIZE)
    assert first.zero and first.allocated  # a sparse image: the server says hole + zero
    node.pwrite(0, b"x" * 65536)
    status = node.block_status(0, SIZE)
    assert status.data and not status.zero and status.length >= 65536
    node.pwrite(MiB, b"y" * MiB)
    node.pwrite_zeroes(MiB, MiB, may_unmap=True)
    assert node.pread(MiB, MiB) == bytes(MiB)
    assert node.block_status(MiB, MiB).zero
    node.pwrite(4 * MiB, b"z" * MiB)
    node.pdiscard(4 * MiB, MiB)  # a trim: the server may drop it; reads are then zeroes
    assert node.block_status(4 * MiB, MiB).zero
    assert isinstance(node.driver, NBDDriver)
    node.pwrite(6 * MiB, b"w" * MiB)
    assert node.driver.try_fast_zero(6 * MiB, MiB) in (True, False)  # the server decides
    if node.pread(6 * MiB, 1) == b"\0":
        assert node.pread(6 * MiB, MiB) == bytes(MiB)


def test_threads_share_the_connection(remote: Remote, local: Storage) -> None:
    node = _add(local, remote)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(16):
                node.pwrite((i * 16 + j) * 65536, bytes([i + 1]) * 65536)
                assert node.pread((i * 16 + j) * 65536, 65536) == bytes([i + 1]) * 65536
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        assert node.pread(i * 16 * 65536, 16 * 65536) == bytes([i + 1]) * 16 * 65536


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "Parameter 'server' is missing"),
        ({"server": {"type": "unix"}}, "Parameter 'server.path' is missing"),
        ({"server": {"type": "inet", "host": "127.0.0.1"}}, "Parameter 'server.port' is missing"),
        ({"server": {"type": "vsock", "cid": "1", "port": "2"}}, "not supported"),
        ({"server": {"type": "unix", "path": "/nonexistent/s", "x": 1}},
         "Parameter 'server.x' is unexpected"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}},
         "Failed to connect to '/nonexistent/s': No such file or directory"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "tls-hostname": "h"},
         "tls-hostname is set but tls-creds is not"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "tls-creds": "nope"},
         "No TLS credentials with id 'nope'"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "reconnect-delay": -1},
         "at least 0"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "bogus": 1},
         "Parameter 'bogus' is unexpected"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "x-request-timeout": -1},
         "Parameter 'x-request-timeout' expects a value of at least 0"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "multi-conn": 0},
         "Parameter 'multi-conn' expects an integer from 1 to 16, got 0"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "multi-conn": 17},
         "Parameter 'multi-conn' expects an integer from 1 to 16, got 17"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "multi-conn": "auto"},
         "Invalid parameter type for 'multi-conn', expected: integer"),
        ({"server": {"type": "unix", "path": "/nonexistent/s"}, "multi-conn": True},
         "Invalid parameter type for 'multi-conn', expected: integer"),
    ],
)
def test_bad_options(local: Storage, options: dict[str, Any], message: str) -> None:
    with pytest.raises(GenericError, match=message.replace(".", r"\.")):
        local.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", **options})
    assert local.graph.find("nbd0") is None


def test_unknown_export_and_read_only_export(remote: Remote, local: Storage) -> None:
    with pytest.raises(GenericError, match="Failed to connect"):
        local.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "export": "nope",
                                       "server": {"type": "unix", "path": remote.sock}})
    assert remote.storage is not None
    remote.storage.execute("blockdev-add", {"driver": "null-co", "node-name": "ro",
                                            "size": SIZE})
    remote.storage.execute("nbd-server-add", {"device": "ro", "writable": False})
    with pytest.raises(GenericError, match="read-only"):
        local.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "export": "ro",
                                       "server": {"type": "unix", "path": remote.sock}})
    local.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "export": "ro",
                                   "read-only": True,
                                   "server": {"type": "unix", "path": remote.sock}})
    assert local.graph.get("nbd0").pread(0, 4) == bytes(4)


def test_open_timeout_waits_for_the_server(local: Storage, tmp_path: Path) -> None:
    server = Remote(tmp_path)
    server.stop()
    starter = threading.Timer(0.4, server.start)
    starter.start()
    try:
        node = _add(local, server, **{"open-timeout": 10})
        assert node.size == SIZE
    finally:
        starter.join()
        server.stop()


def test_reconnect_within_the_delay(remote: Remote, local: Storage) -> None:
    node = _add(local, remote, **{"reconnect-delay": 10})
    node.pwrite(0, b"a" * 65536)
    remote.stop()
    restarter = threading.Timer(0.5, remote.start)
    restarter.start()
    started = time.monotonic()
    node.pwrite(65536, b"b" * 65536)  # waits for the server, then goes through
    restarter.join()
    assert time.monotonic() - started >= 0.3
    assert node.pread(0, 131072) == b"a" * 65536 + b"b" * 65536
    assert isinstance(node.driver, NBDDriver) and node.driver.link is Link.CONNECTED


def test_past_the_delay_requests_fail_with_eio(remote: Remote, local: Storage) -> None:
    node = _add(local, remote, **{"reconnect-delay": 1})
    remote.stop()
    started = time.monotonic()
    with pytest.raises(OSError) as failed:
        node.pwrite(0, b"a" * 4096)
    assert failed.value.errno == errno.EIO
    assert 0.9 <= time.monotonic() - started < 5
    assert isinstance(node.driver, NBDDriver) and node.driver.link is Link.FAILED
    started = time.monotonic()
    with pytest.raises(OSError) as again:  # failed: at once, no waiting
        node.pread(0, 4096)
    assert again.value.errno == errno.EIO and time.monotonic() - started < 0.5
    remote.start()  # back: the next request connects again
    node.pwrite(0, b"c" * 4096)
    assert node.pread(0, 4096) == b"c" * 4096


def test_without_reconnect_delay_a_lost_server_fails_at_once(remote: Remote,
                                                             local: Storage) -> None:
    node = _add(local, remote)
    remote.stop()
    with pytest.raises(OSError) as failed:
        node.pread(0, 4096)
    assert failed.value.errno == errno.EIO


def test_server_errors_are_not_connection_losses(remote: Remote, local: Storage) -> None:
    node = _add(local, remote, **{"reconnect-delay": 5})
    assert isinstance(node.driver, NBDDriver)
    driver = node.driver
    started = time.monotonic()
    with pytest.raises(OSError) as failed:  # past the end: the server says EINVAL
        driver._call(NBDClient.pread, SIZE - 4096, 8192)
    assert failed.value.errno == errno.EINVAL
    assert time.monotonic() - started < 1 and driver.link is Link.CONNECTED


def test_blockdev_del_closes_the_connection(remote: Remote, local: Storage) -> None:
    node = _add(local, remote)
    local.execute("blockdev-del", {"node-name": "nbd0"})
    assert node.closed
    assert isinstance(node.driver, NBDDriver) and node.driver.link is Link.CLOSED


def test_discard_source_is_refused_for_a_disk_the_guest_writes(local: Storage,
                                                               tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(SIZE)
    local.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                   "file": {"driver": "file", "filename": str(disk)}})
    local.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
    local.execute("blockdev-add", {"driver": "null-co", "node-name": "sink", "size": SIZE})
    with pytest.raises(GenericError, match="discard-source needs a source nothing else writes"):
        local.execute("blockdev-backup", {"device": "src", "target": "sink", "sync": "full",
                                          "discard-source": True})
    assert not local.jobs


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Cmd, CmdFlag, int, int]]:
    """Every request the driver's clients send, as ``(command, flags, offset, length)``."""
    sent: list[tuple[Cmd, CmdFlag, int, int]] = []
    submit = NBDClient.submit

    def recording(self: NBDClient, command: Cmd, offset: int = 0, length: int = 0,
                  flags: CmdFlag = NO_FLAGS, payload: Any = None) -> int:
        sent.append((Cmd(command), CmdFlag(flags), offset,
                     len(payload) if payload is not None else length))
        return submit(self, command, offset, length, flags, payload)

    monkeypatch.setattr(NBDClient, "submit", recording)
    return sent


def test_write_zeroes_try_fast_zero_first(remote: Remote, local: Storage,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    node = _add(local, remote)
    sent = _record(monkeypatch)
    node.pwrite(0, b"q" * (2 * MiB))
    sent.clear()
    # may unmap: fleece's server zeroes fast (a hole), so the fast request is the only one
    node.pwrite_zeroes(0, MiB, may_unmap=True)
    assert sent == [(Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, 0, MiB)]
    assert node.pread(0, MiB) == bytes(MiB)
    sent.clear()
    # no hole allowed: the server answers the fast request ENOTSUP; a plain one follows
    node.pwrite_zeroes(MiB, 65536, may_unmap=False)
    assert sent == [(Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE, MiB, 65536),
                    (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, MiB, 65536)]
    assert node.pread(MiB, 65536 + 4) == bytes(65536) + b"q" * 4
    sent.clear()
    # the refusal is remembered: no second fast try for the same kind of request
    node.pwrite_zeroes(MiB + 65536, 65536, may_unmap=False)
    assert sent == [(Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, MiB + 65536, 65536)]
    sent.clear()
    node.pwrite_zeroes(2 * MiB, 65536, may_unmap=True)  # still fast where it was fast
    assert sent == [(Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, 2 * MiB, 65536)]


def test_write_zeroes_without_fast_zero_is_plain(remote: Remote, local: Storage,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    node = _add(local, remote)
    assert isinstance(node.driver, NBDDriver)
    node.driver.flags &= ~TransmissionFlag.SEND_FAST_ZERO  # as a server not advertising it
    sent = _record(monkeypatch)
    node.pwrite_zeroes(0, MiB, may_unmap=True)
    assert sent == [(Cmd.WRITE_ZEROES, NO_FLAGS, 0, MiB)]


def test_multi_conn_spreads_requests_over_connections(remote: Remote, local: Storage,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only export of fleece's server advertises CAN_MULTI_CONN: ``multi-conn: 4``
    opens four connections and the requests of threads go over all of them."""
    assert remote.storage is not None
    remote.storage.execute("nbd-server-add", {"device": "disk", "name": "ro",
                                              "writable": False})
    node = remote.storage.graph.get("disk")
    node.pwrite(0, bytes(range(256)) * 4096)
    local.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "export": "ro",
                                   "read-only": True, "multi-conn": 4,
                                   "server": {"type": "unix", "path": remote.sock}})
    nbd = local.graph.get("nbd0")
    assert isinstance(nbd.driver, NBDDriver) and nbd.driver.connections == 4
    used: set[int] = set()
    submit = NBDClient.submit

    def recording(self: NBDClient, *args: Any, **kwargs: Any) -> int:
        used.add(id(self))
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(NBDClient, "submit", recording)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for i in range(16):
                assert nbd.pread(i * 65536, 65536) == bytes(range(256)) * 256
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(used) == 4
    local.execute("blockdev-del", {"node-name": "nbd0"})
    assert nbd.driver.connections == 0


def test_multi_conn_needs_the_server_to_offer_it(remote: Remote, local: Storage) -> None:
    """A writable export of fleece's server does not advertise CAN_MULTI_CONN: one
    connection, as asked for or not."""
    node = _add(local, remote, **{"multi-conn": 4})
    assert isinstance(node.driver, NBDDriver) and node.driver.connections == 1
    node.pwrite(0, b"m" * 4096)
    node.flush()
    assert node.pread(0, 4096) == b"m" * 4096


class Proxy:
    """A unix socket in front of ``remote``'s, forwarding both ways; :meth:`hang` makes the
    connections open at that moment stop answering (a hung server: the socket stays open,
    no reply comes), while new connections go through; ``hang(everything=True)`` hangs new
    ones too, until :meth:`wake`."""

    def __init__(self, remote: Remote, tmp: Path) -> None:
        self.remote = remote
        self.sock = str(tmp / "proxy.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.sock)
        self._listener.listen(16)
        self._hung: set[int] = set()
        self._all_hung = False
        self._links: list[tuple[int, socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.remote.sock)
            with self._lock:
                key = len(self._links)
                self._links.append((key, client, server))
            threading.Thread(target=self._pump, args=(key, client, server, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(key, server, client, True),
                             daemon=True).start()

    def _pump(self, key: int, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        while True:
            try:
                data = src.recv(1 << 20)
                if not data:
                    return
                if replies and (key in self._hung or self._all_hung):
                    continue  # swallowed: the client waits for a reply that never comes
                dst.sendall(data)
            except OSError:
                return

    def hang(self, everything: bool = False) -> None:
        with self._lock:
            self._hung.update(key for key, _, _ in self._links)
            self._all_hung = everything

    def wake(self) -> None:
        """New connections answer again (hung ones stay hung)."""
        self._all_hung = False

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for _, a, b in self._links:
                a.close()
                b.close()


@pytest.fixture
def proxy(remote: Remote, tmp_path: Path) -> Iterator[Proxy]:
    front = Proxy(remote, tmp_path)
    try:
        yield front
    finally:
        front.close()


def _link(node: BlockNode) -> Link:
    assert isinstance(node.driver, NBDDriver)
    return node.driver.link


def _add_via(storage: Storage, proxy: Proxy, **extra: Any) -> BlockNode:
    storage.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd0", "export": "disk",
                                     "server": {"type": "unix", "path": proxy.sock}, **extra})
    return storage.graph.get("nbd0")


def test_request_timeout_fails_a_request_the_server_never_answers(proxy: Proxy,
                                                                   local: Storage) -> None:
    node = _add_via(local, proxy, **{"x-request-timeout": 1})
    node.pwrite(0, b"t" * 4096)
    proxy.hang(everything=True)  # sockets stay open; the server says nothing more
    started = time.monotonic()
    with pytest.raises(OSError) as failed:  # the request, then the one reconnect, time out
        node.pread(0, 4096)
    assert failed.value.errno == errno.EIO
    assert 1.8 <= time.monotonic() - started < 4
    assert _link(node) is Link.FAILED
    proxy.wake()
    assert node.pread(0, 4096) == b"t" * 4096  # a new connection answers
    assert _link(node) is Link.CONNECTED


def test_request_timeout_resends_on_a_new_connection(proxy: Proxy, local: Storage) -> None:
    """Without reconnect-delay a timed-out request still gets its one reconnect: a server
    whose one connection hung but that takes new ones answers it there."""
    node = _add_via(local, proxy, **{"x-request-timeout": 1})
    node.pwrite(0, b"u" * 4096)
    proxy.hang()
    started = time.monotonic()
    assert node.pread(0, 4096) == b"u" * 4096
    assert 0.9 <= time.monotonic() - started < 3


def test_request_timeout_then_reconnect_within_the_delay(proxy: Proxy,
                                                         local: Storage) -> None:
    node = _add_via(local, proxy, **{"x-request-timeout": 1, "reconnect-delay": 10})
    node.pwrite(0, b"r" * 4096)
    proxy.hang()
    started = time.monotonic()
    node.pwrite(4096, b"s" * 4096)  # times out, reconnects, is sent again
    assert 0.9 <= time.monotonic() - started < 5
    assert node.pread(0, 8192) == b"r" * 4096 + b"s" * 4096
    assert isinstance(node.driver, NBDDriver) and node.driver.link is Link.CONNECTED


def test_request_timeout_is_off_by_default(proxy: Proxy, local: Storage) -> None:
    """The default is 0: no timeout, as QEMU's nbd driver (which has no such option)."""
    node = _add_via(local, proxy)
    assert isinstance(node.driver, NBDDriver) and node.driver.request_timeout == 0
    node.pwrite(0, b"w" * 4096)
    assert node.pread(0, 4096) == b"w" * 4096


def test_threads_keep_requests_in_flight_together_and_resend_them_all(
        proxy: Proxy, local: Storage, remote: Remote) -> None:
    """Four threads' writes reach the server together on one connection, before any reply
    (a backup job's workers keep the server busy so). When that connection is lost with all
    four in flight (here its replies never come and the request timeout fires), each is sent
    again on the new connection and completes."""
    node = _add_via(local, proxy, **{"x-request-timeout": 3, "reconnect-delay": 10})
    node.pwrite(0, b"\0" * 4096)  # connected and answering
    proxy.hang()  # from now on the server executes this connection's requests, says nothing
    errors: list[BaseException] = []
    done: list[int] = []

    def writer(i: int) -> None:
        try:
            node.pwrite(i * MiB, bytes([i + 1]) * 65536)
            done.append(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def arrived() -> int:
        with remote.image.open("rb") as f:
            return sum(1 for i in range(4)
                       if f.seek(i * MiB) >= 0 and f.read(65536) == bytes([i + 1]) * 65536)

    deadline = time.monotonic() + 2  # before the request timeout
    while arrived() < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert arrived() == 4, "the writes did not reach the server together"
    assert not done  # no reply has come to any of them
    for t in threads:
        t.join(20)
    assert not errors and sorted(done) == [0, 1, 2, 3]
    assert _link(node) is Link.CONNECTED
    for i in range(4):
        assert node.pread(i * MiB, 65536) == bytes([i + 1]) * 65536


def test_a_push_sends_the_fleecing_images_clusters_with_sendfile(
        remote: Remote, local: Storage, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A push from ``snapshot-access`` to an ``nbd`` node: the clusters the fleecing image
    holds go from its file to the server's socket with ``sendfile`` (they are copied and
    settled: nothing rewrites them), the clusters still in the live disk through memory (a
    guest write could change their pages before the server read them). Either way the
    pushed image is the point in time. (The pure build copies through memory only.)"""
    src = tmp_path / "src.raw"
    at_the_instant = bytes(range(256)) * (SIZE // 256)
    src.write_bytes(at_the_instant)
    fleecing = tmp_path / "fleecing.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleecing), str(SIZE)],
                   check=True)
    local.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                   "file": {"driver": "file", "filename": str(src)}})
    local.execute("blockdev-add", {"driver": "qcow2", "node-name": "fl-img",
                                   "file": {"driver": "file", "filename": str(fleecing)}})
    local.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                   "file": "src", "target": "fl-img"})
    local.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                   "file": "fl"})
    guest = local.graph.get("fl")
    guest.pwrite(0, b"\xee" * (SIZE // 2))  # the first half is copied into fl-img first
    sent: list[int] = []
    real = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)
    _add(local, remote)
    log = EventLog()
    local.subscribe(log)
    local.execute("blockdev-backup", {"device": "acc", "target": "nbd0", "sync": "full",
                                      "job-id": "push"})
    assert "error" not in log.wait("BLOCK_JOB_COMPLETED", device="push")
    if route.available():
        assert SIZE // 4 <= sum(sent) <= SIZE // 2
    else:
        assert not sent
    local.execute("blockdev-del", {"node-name": "nbd0"})  # flushed
    assert remote.image.read_bytes() == at_the_instant
