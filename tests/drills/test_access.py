"""Access drills: TLS with and without client certificates, socket modes, connection limits,
bounded names and messages, exports reachable only by name.

- **TLS** (certificates made by ``certtool``): with ``verify-peer=true`` a client without a
  certificate, and one whose certificate another CA signed, are refused and the server keeps
  serving; a client certificate signed by the CA reads. With ``verify-peer=false`` a client
  without a certificate reads. A plain client gets ``NBD_REP_ERR_TLS_REQD``.
- **Unix sockets**: the daemon's QMP and NBD sockets are mode 0600.
- **max-connections=2**: a third client is dropped; once one leaves, a new one gets in.
- **Bounds**: a 5000-byte export name in ``NBD_OPT_GO`` gets ``NBD_REP_ERR_TOO_BIG`` (in
  ``NBD_OPT_EXPORT_NAME``: a disconnect); a 17 MiB QMP message gets an error and the daemon
  keeps answering on the same connection; ``nbd-server-add`` refuses a 5000-byte name.
- **Names**: a wrong name gets ``NBD_REP_ERR_UNKNOWN``; ``NBD_OPT_LIST`` shows the exports; the
  default (empty) name works only while there is one export.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleece.block.qcow2 import create
from fleece.errors import GenericError
from fleece.nbd.client import NBDClient, NegotiationError
from fleece.nbd.constants import IHAVEOPT, Opt, Rep
from fleece.storage import Storage
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

CONTENT = pattern(1 * MiB, seed=21)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    good = make_ca(root / "ca", "fleece drills CA")
    other = make_ca(root / "other", "another CA")
    dirs = {"server": root / "server", "client": root / "client", "wrong": root / "wrong"}
    make_cert(dirs["server"], good, "server")
    make_cert(dirs["client"], good, "client")
    make_cert(dirs["wrong"], other, "client")
    return dirs


def serve(tmp: Path, *, exports: tuple[str, ...] = ("pit0",), tls: dict[str, object] | None = None,
          max_connections: int = 0) -> tuple[Storage, str]:
    image = tmp / "disk.raw"
    image.write_bytes(CONTENT)
    sock = str(tmp / "nbd.sock")
    storage = Storage()
    start: dict[str, object] = {"addr": {"type": "unix", "data": {"path": sock}}}
    if tls is not None:
        storage.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", **tls})
        start["tls-creds"] = "tls0"
    if max_connections:
        start["max-connections"] = max_connections
    storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk0", "read-only": True,
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.execute("nbd-server-start", start)
    for name in exports:
        storage.execute("nbd-server-add", {"device": "disk0", "name": name})
    return storage, sock


def client_context(ca_dir: Path, cert_dir: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_dir / "ca-cert.pem"))
    if cert_dir is not None:
        context.load_cert_chain(str(cert_dir / "client-cert.pem"),
                                str(cert_dir / "client-key.pem"))
    return context


def tls_read(sock: str, context: ssl.SSLContext) -> bytes:
    with NBDClient.connect_unix(sock, "pit0", tls=context, server_hostname="localhost") as client:
        return client.pread(4096, 4096)


@pytest.fixture
def verify_server(tmp_path: Path, certs: dict[str, Path]) -> Iterator[str]:
    storage, sock = serve(tmp_path, tls={"dir": str(certs["server"]), "endpoint": "server",
                                         "verify-peer": True})
    try:
        yield sock
    finally:
        storage.close()


def test_tls_verify_peer_requires_a_client_certificate(
    verify_server: str, certs: dict[str, Path]
) -> None:
    sock = verify_server
    ca = certs["client"]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_read(sock, client_context(ca, None))  # no certificate
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_read(sock, client_context(ca, certs["wrong"]))  # signed by another CA
    with pytest.raises(NegotiationError, match="0x80000005"):  # NBD_REP_ERR_TLS_REQD
        NBDClient.connect_unix(sock, "pit0")
    assert tls_read(sock, client_context(ca, certs["client"])) == CONTENT[4096:8192]


def test_tls_without_verify_peer(tmp_path: Path, certs: dict[str, Path]) -> None:
    storage, sock = serve(tmp_path, tls={"dir": str(certs["server"]), "endpoint": "server",
                                         "verify-peer": False})
    try:
        assert tls_read(sock, client_context(certs["client"], None)) == CONTENT[4096:8192]
        with pytest.raises(NegotiationError, match="0x80000005"):
            NBDClient.connect_unix(sock, "pit0")
    finally:
        storage.close()


def test_daemon_sockets_are_owner_only(tmp_path: Path) -> None:
    image = tmp_path / "src.qcow2"
    create(str(image), 1 * MiB)
    qmp, nbd = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
    old = os.umask(0o000)  # a permissive umask must not leak into the socket modes
    try:
        daemon = fleece_daemon(qmp, ["--drive", f"id=virtio0,file={image},format=qcow2",
                                     "--nbd-server", f"addr.type=unix,addr.path={nbd}"], tmp_path)
    finally:
        os.umask(old)
    try:
        daemon.wait_socket()
        for path in (qmp, nbd):
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode), path
            assert stat.S_IMODE(mode) == 0o600, f"{path.name}: {oct(stat.S_IMODE(mode))}"
    finally:
        daemon.stop()


def test_max_connections(tmp_path: Path) -> None:
    storage, sock = serve(tmp_path, max_connections=2)
    try:
        first = NBDClient.connect_unix(sock, "pit0")
        second = NBDClient.connect_unix(sock, "pit0")
        with pytest.raises((ConnectionError, OSError)):
            third = NBDClient.connect_unix(sock, "pit0")
            third.pread(0, 512)
        assert first.pread(0, 512) == second.pread(0, 512) == CONTENT[:512]
        first.close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the first one left
            try:
                with NBDClient.connect_unix(sock, "pit0") as again:
                    assert again.pread(512, 512) == CONTENT[512:1024]
                break
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        second.close()
    finally:
        storage.close()


# -- names and lengths --------------------------------------------------------------------------
def raw_handshake(sock_path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(sock_path)
    assert len(recv_exact(sock, 18)) == 18
    sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    return sock


def option_replies(sock: socket.socket, opt: int, data: bytes) -> list[tuple[int, bytes]]:
    sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    replies: list[tuple[int, bytes]] = []
    while True:
        _, _, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
        replies.append((rep, recv_exact(sock, length)))
        if rep != Rep.SERVER and rep != Rep.INFO and rep != Rep.META_CONTEXT:
            return replies


def test_long_names_are_bounded(tmp_path: Path) -> None:
    storage, sock = serve(tmp_path)
    try:
        name = b"n" * 5000
        with raw_handshake(sock) as s:
            replies = option_replies(s, Opt.GO, struct.pack(">I", len(name)) + name
                                     + struct.pack(">H", 0))
            assert replies[-1][0] == Rep.ERR_TOO_BIG, replies
            # The connection is still usable: the right name works.
            replies = option_replies(s, Opt.GO, struct.pack(">I", 4) + b"pit0"
                                     + struct.pack(">H", 0))
            assert replies[-1][0] == Rep.ACK, replies
        with raw_handshake(sock) as s:
            s.sendall(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, len(name)) + name)
            with contextlib.suppress(OSError):
                assert s.recv(1) == b""  # EXPORT_NAME cannot be answered: a disconnect
        with pytest.raises(GenericError, match="too long"):
            storage.execute("nbd-server-add", {"device": "disk0", "name": "x" * 5000})
        assert NBDClient.connect_unix(sock, "pit0").pread(0, 16) == CONTENT[:16]
    finally:
        storage.close()


def test_exports_reachable_only_by_name(tmp_path: Path) -> None:
    storage, sock = serve(tmp_path, exports=("pit0", "other"))
    try:
        for wrong in ("pit", "PIT0", "pit0 ", "", "../pit0"):
            with pytest.raises(NegotiationError, match="0x80000006"):  # NBD_REP_ERR_UNKNOWN
                NBDClient.connect_unix(sock, wrong, structured=False)
        with raw_handshake(sock) as s:
            replies = option_replies(s, Opt.LIST, b"")
            names = sorted(d[4:4 + struct.unpack(">I", d[:4])[0]].decode()
                           for rep, d in replies if rep == Rep.SERVER)
            assert names == ["other", "pit0"] and replies[-1][0] == Rep.ACK
        with NBDClient.connect_unix(sock, "pit0") as client:
            assert client.pread(0, 4096) == CONTENT[:4096]
        storage.execute("nbd-server-remove", {"name": "other"})
        with NBDClient.connect_unix(sock, "") as client:  # the only export is the default
            assert client.pread(0, 16) == CONTENT[:16]
    finally:
        storage.close()


def test_huge_qmp_message_gets_an_error_and_the_daemon_stays(tmp_path: Path) -> None:
    qmp = tmp_path / "qmp.sock"
    daemon = fleece_daemon(qmp, [], tmp_path)
    try:
        daemon.wait_socket()
        monitor = RawQMP(qmp, timeout=30)
        monitor.negotiate()
        huge = (b'{"execute": "query-version", "arguments": {"x": "' + b"a" * (17 * MiB)
                + b'"}}{"execute": "query-version", "id": "after"}')
        # Sent from a thread while replies are read here: a client that does not read while
        # it writes could fill the socket both ways.
        sender = threading.Thread(target=monitor.sock.sendall, args=(huge,), daemon=True)
        sender.start()
        errors = 0
        while True:
            reply = monitor.reply()
            if reply.get("id") == "after":
                assert "return" in reply, reply
                break
            assert "error" in reply, reply
            errors += 1
        sender.join(30)
        assert errors >= 1
        print(f"\nDRILL access: a 17 MiB QMP message got {errors} error replies")
        assert daemon.alive()
        monitor.close()
    finally:
        daemon.stop()
