"""Hostile-client drills (issue 17): each attack a review made on the daemon over loopback, as
a bounded test against a daemon subprocess.

Every test measures the daemon's RSS (``/proc/PID/status``) after a warm-up read, during the
attack (the peak of samples every 50 ms) and after the attackers left, and checks:

- growth under attack below ``PER_ATTACKER`` (32 MiB) per attacking connection and below
  ``TOTAL`` (256 MiB) in all;
- a legitimate client reads correct data meanwhile, within the handshake timeout;
- memory back within ``SETTLE`` (16 MiB) of the baseline once the attackers left.

The attacks:

- **stalled readers**: 4 clients pipeline 1 MiB READs and never read a reply (replies through
  the direct sender); once they leave, the daemon stops working for them at once (CPU idle).
- **unread negotiation replies**: 20,000 ``NBD_OPT_LIST`` then ``GO`` then 1 MiB READs, nothing
  read (before the fix the replies went through the transport, uncounted).
- **TLS stalled readers**: the same over TLS (no direct sender: replies through asyncio's
  TLS transport).
- **replies fleece writes itself**: options without reading the answers to a TLS-only server
  with peer verification (``NBD_REP_ERR_TLS_REQD`` each), and invalid requests without reading
  the error replies in transmission.
- **idle handshakes**: 150 clients connect and say nothing; ``max-connections`` (default 100)
  refuses the rest, the handshake timeout closes the idle ones.
- **the open-file limit**: a daemon with ``RLIMIT_NOFILE`` 256 and no connection limit, 400
  idle clients: it refuses them near the limit, logs once per interval, and QMP answers.
- **WRITE headers**: 10 clients announce 32 MiB WRITEs and stall (read-only: refused at once;
  writable: the payload costs only what arrived).
- **audit lines**: one warning per rejected TLS handshake, failed peer verification, protocol
  violation and refused connection, each naming the peer.
- **drain timeout** (in-process, to shorten the timeout): a client that stops reading is
  disconnected.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleece.nbd.client import NBDClient
from fleece.nbd.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt, Rep
from fleece.storage import Storage
from tests.daemons import DaemonProcess
from tests.drills.support import (
    MiB,
    RawQMP,
    fleece_daemon,
    make_ca,
    make_cert,
    pattern,
    recv_exact,
)

pytestmark = pytest.mark.timeout(60)

SIZE = 64 * MiB
CONTENT = pattern(SIZE, seed=17)
PER_ATTACKER = 32 * MiB
TOTAL = 256 * MiB
SETTLE = 16 * MiB
HANDSHAKE = 2  # handshake-max-seconds of the drills' daemons (QEMU's default is 10)


# -- the daemon ---------------------------------------------------------------------------------
class Served:
    """A daemon subprocess exporting ``CONTENT`` as ``disk`` on ``nbd.sock`` (a raw file)."""

    def __init__(self, tmp: Path, *, server: str = "", export: str = "",
                 objects: tuple[str, ...] = (), nofile: int | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.tmp = tmp
        image = tmp / "disk.raw"
        if not image.exists():
            image.write_bytes(CONTENT)
        self.sock = str(tmp / "nbd.sock")
        self.qmp = tmp / "qmp.sock"
        self.tls = tls
        options = [
            *[arg for obj in objects for arg in ("--object", obj)],
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--nbd-server",
            f"addr.type=unix,addr.path={self.sock},handshake-max-seconds={HANDSHAKE}{server}",
            "--export", f"type=nbd,id=e0,node-name=f0,name=disk{export}",
        ]
        if nofile is None:
            self.daemon = fleece_daemon(self.qmp, options, tmp)
        else:  # the same daemon under a lower open-file limit
            code = ("import resource, runpy, sys; "
                    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                    "sys.argv = ['fleece'] + sys.argv[1:]; "
                    "runpy.run_module('fleece', run_name='__main__')")
            argv = [sys.executable, "-c", code, "daemon", "--qmp", f"unix:{self.qmp}", *options]
            self.daemon = DaemonProcess(argv, self.qmp, tmp, start_timeout=20, exit_timeout=20)
        self.daemon.wait_socket()
        for _ in range(2):  # warm up before the baseline: every I/O thread, the caches
            for thread in in_threads([self.legit_read] * 4):
                thread.join()
        time.sleep(0.3)
        self.baseline = self.rss()

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def cpu(self) -> float:
        """User + system CPU seconds of the daemon so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks

    def legit_read(self, within: float = HANDSHAKE + 3.0) -> float:
        """Connect (retrying while refused) and read 4 MiB at three places, checking the data;
        returns the seconds it took. Fails if it could not within ``within`` seconds."""
        start = time.monotonic()
        deadline = start + within
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.5, deadline - time.monotonic()))
            try:
                sock.connect(self.sock)
                client = NBDClient(sock, "disk", tls=self.tls, server_hostname="localhost")
                with client:
                    for offset in (0, SIZE // 2, SIZE - 4 * MiB):
                        data = client.pread(offset, 4 * MiB)
                        assert data == CONTENT[offset:offset + 4 * MiB], offset
                return time.monotonic() - start
            except (ConnectionError, OSError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"no legitimate read within {within} s: {exc!r}") from exc
                time.sleep(0.05)

    def measure(self, attackers: int, attack: Callable[[], None], hold: float) -> int:
        """Run ``attack()`` (which starts the attack and returns), sample RSS for ``hold``
        seconds while a legitimate client reads, and check the growth. Returns the peak."""
        peak = self.rss()
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, self.rss())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            attack()
            began = time.monotonic()
            took = self.legit_read()
            time.sleep(max(0.0, hold - (time.monotonic() - began)))
        finally:
            stop.set()
            sampler.join()
        growth = peak - self.baseline
        print(f"\nDRILL hostile: {attackers} attacker(s): RSS {self.baseline / MiB:.1f} -> peak "
              f"{peak / MiB:.1f} MiB (+{growth / MiB:.1f}); a legitimate read took {took:.2f} s")
        assert growth < PER_ATTACKER * attackers, f"+{growth / MiB:.1f} MiB"
        assert growth < TOTAL, f"+{growth / MiB:.1f} MiB"
        assert self.daemon.alive()
        return peak

    def settled(self) -> None:
        """After the attackers left: memory back within SETTLE of the baseline."""
        deadline = time.monotonic() + 5
        while True:
            now = self.rss()
            if now - self.baseline < SETTLE or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        print(f"DRILL hostile: after the attackers left: {now / MiB:.1f} MiB "
              f"({(now - self.baseline) / MiB:+.1f})")
        assert now - self.baseline < SETTLE, f"{(now - self.baseline) / MiB:+.1f} MiB"
        self.legit_read()

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    daemon = Served(tmp_path)
    try:
        yield daemon
    finally:
        daemon.stop()


# -- raw client pieces --------------------------------------------------------------------------
def raw(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str) -> bytes:
    return struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)


def request(kind: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, kind, cookie, offset, length)


def go(sock: socket.socket, name: str = "disk") -> None:
    """Greeting, flags, GO (simple replies); the sock is in transmission after it."""
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3) + option(Opt.GO, go_data(name)))
    while True:
        _, _, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
        recv_exact(sock, length)
        if rep == Rep.ACK:
            return
        assert rep == Rep.INFO, hex(rep)


def flood(sock: socket.socket, chunk: bytes, seconds: float) -> int:
    """Send ``chunk`` again and again, never reading, until the server stops taking it (a
    send blocks for 0.5 s) or ``seconds`` passed. Returns the bytes sent."""
    sock.settimeout(0.5)
    sent = 0
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


def reads(count: int, length: int = 1 * MiB) -> bytes:
    return b"".join(request(Cmd.READ, i + 1, (i * length) % (SIZE - length), length)
                    for i in range(count))


def in_threads(jobs: list[Callable[[], object]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    return threads


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


# -- the attacks -----------------------------------------------------------------------------------
def test_stalled_readers(served: Served) -> None:
    socks: list[socket.socket] = []

    def attack() -> None:
        for _ in range(4):
            sock = raw(served.sock)
            go(sock)
            socks.append(sock)
        in_threads([lambda s=s: flood(s, reads(64), 3.0) for s in socks])  # type: ignore[misc]

    served.measure(4, attack, hold=3.0)
    close_all(socks)
    time.sleep(0.5)
    before = served.cpu()
    time.sleep(1.0)
    idle = served.cpu() - before
    print(f"DRILL hostile: CPU in the second after the stalled readers left: {idle:.2f} s")
    assert idle < 0.3, "the daemon still works for clients that left"
    served.settled()


def test_unread_negotiation_replies_then_reads(served: Served) -> None:
    socks: list[socket.socket] = []

    def one() -> None:
        sock = raw(served.sock)
        socks.append(sock)
        recv_exact(sock, 18)
        stream = (struct.pack(">I", 3) + option(Opt.LIST) * 20_000 + option(Opt.GO, go_data("disk"))
                  + reads(400))
        flood(sock, stream, 3.0)

    def attack() -> None:
        in_threads([one, one])

    served.measure(2, attack, hold=3.0)
    close_all(socks)
    served.settled()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    good = make_ca(root / "ca", "fleece hostile CA")
    other = make_ca(root / "other", "another CA")
    dirs = {"server": root / "server", "client": root / "client", "wrong": root / "wrong"}
    make_cert(dirs["server"], good, "server")
    make_cert(dirs["client"], good, "client")
    make_cert(dirs["wrong"], other, "client")
    return dirs


def client_context(certs: dict[str, Path], who: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))
    if who is not None:
        context.load_cert_chain(str(certs[who] / "client-cert.pem"),
                                str(certs[who] / "client-key.pem"))
    return context


@pytest.fixture
def tls_served(tmp_path: Path, certs: dict[str, Path]) -> Iterator[Served]:
    daemon = Served(tmp_path, server=",tls-creds=tls0",
                    objects=(f"tls-creds-x509,id=tls0,dir={certs['server']},endpoint=server,"
                             "verify-peer=on",),
                    tls=client_context(certs, "client"))
    try:
        yield daemon
    finally:
        daemon.stop()


def tls_go(path: str, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = raw(path)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3) + option(Opt.STARTTLS))
    _, _, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert rep == Rep.ACK and length == 0
    tls = context.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(option(Opt.GO, go_data("disk")))
    while True:
        _, _, rep, length = struct.unpack(">QIII", recv_exact(tls, 20))
        recv_exact(tls, length)
        if rep == Rep.ACK:
            return tls
        assert rep == Rep.INFO, hex(rep)


def test_tls_stalled_readers(tls_served: Served, certs: dict[str, Path]) -> None:
    socks: list[socket.socket] = []

    def attack() -> None:
        for _ in range(2):
            socks.append(tls_go(tls_served.sock, client_context(certs, "client")))
        in_threads([lambda s=s: flood(s, reads(64), 3.0) for s in socks])  # type: ignore[misc]

    tls_served.measure(2, attack, hold=3.0)
    close_all(socks)
    tls_served.settled()


def test_options_without_reading_before_tls(tls_served: Served) -> None:
    """A client with no certificate sends options (each answered NBD_REP_ERR_TLS_REQD) and
    never reads; the handshake timeout closes it."""
    socks: list[socket.socket] = []

    def one() -> None:
        sock = raw(tls_served.sock)
        socks.append(sock)
        recv_exact(sock, 18)
        sock.sendall(struct.pack(">I", 3))
        flood(sock, option(Opt.LIST) * 4096, 3.0)

    def attack() -> None:
        in_threads([one] * 4)

    tls_served.measure(4, attack, hold=3.0)
    for sock in socks:  # closed by the server by now (handshake timeout)
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while sock.recv(1 << 20):
                pass
    close_all(socks)
    tls_served.settled()


def test_invalid_requests_without_reading(served: Served) -> None:
    socks: list[socket.socket] = []
    bad = request(Cmd.READ, 9, SIZE, 4096) * 4096  # past the end: an error reply each

    def attack() -> None:
        for _ in range(4):
            sock = raw(served.sock)
            go(sock)
            socks.append(sock)
        in_threads([lambda s=s: flood(s, bad, 3.0) for s in socks])  # type: ignore[misc]

    served.measure(4, attack, hold=3.0)
    close_all(socks)
    served.settled()


def test_idle_handshakes_and_the_default_connection_limit(served: Served) -> None:
    """150 clients connect and stay silent: 100 (the default max-connections) hold a slot for
    the handshake timeout, the rest are refused; then every one of them is closed and a
    legitimate client gets in within the handshake timeout."""
    socks: list[socket.socket] = []
    failed = 0

    def attack() -> None:
        nonlocal failed
        for _ in range(150):
            try:
                socks.append(raw(served.sock, timeout=HANDSHAKE + 5))
            except OSError:  # the listen backlog was full for a moment
                failed += 1

    # The legitimate client is refused while the slots are full, and retries.
    served.measure(1, attack, hold=1.0)
    greeted = refused = 0
    for sock in socks:
        try:
            data = sock.recv(18)
        except OSError:
            data = b""
        if data:
            greeted += 1
            with contextlib.suppress(OSError):
                assert sock.recv(1) == b""  # closed at the handshake timeout
        else:
            refused += 1
    print(f"DRILL hostile: 150 idle clients: {greeted} greeted then closed, {refused} refused, "
          f"{failed} could not connect")
    assert greeted <= 100 and refused + failed >= 50
    close_all(socks)
    served.settled()
    err = served.daemon.stderr
    assert "refused: 100 connections is the limit" in err and "unix:pid=" in err
    assert "handshake not finished within 2 s" in err


def test_open_file_limit(tmp_path: Path) -> None:
    """RLIMIT_NOFILE 256 and no connection limit: 400 silent clients. The daemon refuses those
    past its reserve, logs it once per interval, QMP answers, and it serves again after."""
    served = Served(tmp_path, server=",max-connections=0", nofile=256)
    socks: list[socket.socket] = []
    try:
        def attack() -> None:
            for _ in range(400):
                for _ in range(100):  # the listen backlog may be full for a moment
                    try:
                        socks.append(raw(served.sock, timeout=HANDSHAKE + 5))
                        break
                    except BlockingIOError:
                        time.sleep(0.01)

        served.measure(1, attack, hold=0.5)
        monitor = RawQMP(served.qmp)
        monitor.negotiate()
        assert "return" in monitor.command("query-version")
        monitor.close()
        close_all(socks)
        served.settled()
        err = served.daemon.stderr
        lines = [line for line in err.splitlines() if "open-file limit" in line]
        print(f"DRILL hostile: open-file limit: {len(lines)} log line(s), {len(err)} bytes of "
              "stderr")
        assert 1 <= len(lines) <= 2 and len(err) < 16 * 1024, err[-2000:]
    finally:
        served.stop()


@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_write_headers(tmp_path: Path, writable: bool) -> None:
    """10 clients announce 32 MiB WRITEs and stall (a writable export gets 1 MiB of each
    payload first): no 32 MiB buffer per header. On a read-only export the error comes at
    once, before the payload."""
    served = Served(tmp_path, export=",writable=on" if writable else "")
    socks: list[socket.socket] = []
    try:
        def attack() -> None:
            for i in range(10):
                sock = raw(served.sock)
                go(sock)
                sock.sendall(request(Cmd.WRITE, i + 1, 0, 32 * MiB))
                if writable:
                    sock.sendall(b"\xa5" * MiB)
                else:
                    _, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
                    assert (error, cookie) == (1, i + 1)  # EPERM, before any payload
                socks.append(sock)

        served.measure(10, attack, hold=2.0)
        close_all(socks)
        served.settled()
    finally:
        served.stop()


def test_audit_lines(tls_served: Served, certs: dict[str, Path]) -> None:
    """One warning per rejected TLS handshake, failed peer verification and protocol
    violation, each naming the peer."""
    for who in (None, "wrong"):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            sock = raw(tls_served.sock)
            try:
                NBDClient(sock, "disk", tls=client_context(certs, who),
                          server_hostname="localhost").pread(0, 512)
            finally:
                sock.close()
    with raw(tls_served.sock) as sock:  # a protocol violation: a bad option magic
        recv_exact(sock, 18)
        sock.sendall(struct.pack(">I", 3) + b"\x00" * 16)
        with contextlib.suppress(OSError):
            assert sock.recv(1) == b""
    tls_served.legit_read()
    deadline = time.monotonic() + 5
    while True:
        err = tls_served.daemon.stderr
        verification = [line for line in err.splitlines() if "peer verification failed" in line]
        violation = [line for line in err.splitlines() if "protocol violation" in line]
        if (len(verification) >= 2 and violation) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(verification) == 2 and all("unix:pid=" in line for line in verification), err
    assert len(violation) == 1 and "unix:pid=" in violation[0] and "magic" in violation[0], err


def test_client_that_stops_reading_is_disconnected(tmp_path: Path) -> None:
    """In-process, with a 1 s drain timeout: a client that never reads its replies is
    disconnected, and the server forgets it."""
    image = tmp_path / "disk.raw"
    image.write_bytes(CONTENT[:8 * MiB])
    path = str(tmp_path / "nbd.sock")
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "file", "node-name": "f0",
                                         "filename": str(image)})
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
        storage.execute("nbd-server-add", {"device": "f0", "name": "disk"})
        server = storage.nbd_server
        assert server is not None
        server.drain_timeout = 1.0
        sock = raw(path)
        go(sock)
        flood(sock, b"".join(request(Cmd.READ, i + 1, (i % 7) * MiB, MiB) for i in range(64)),
              1.0)
        deadline = time.monotonic() + 6
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.connections, "the stalled client is still connected"
        sock.close()
