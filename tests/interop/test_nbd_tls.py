"""NBD over TLS (``tls-creds-x509`` + ``nbd-server-start tls-creds=``) against libnbd.

The certificates are made with GnuTLS's ``certtool`` (package gnutls-bin) in QEMU's layout for
the server (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``) and libnbd's for clients
(``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``). A missing tool fails the test.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleece.errors import GenericError
from fleece.nbd.client import NBDClient, NegotiationError
from fleece.storage import Storage
from tests.peers import PEER_ENV, require

pytestmark = [pytest.mark.interop, pytest.mark.timeout(20)]

CONTENT = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def tls_server(tmp_path: Path, certs: dict[str, Path]) -> Iterator[tuple[Storage, str]]:
    image = tmp_path / "disk.raw"
    image.write_bytes(CONTENT)
    storage = Storage()
    sock = str(tmp_path / "tls.sock")
    try:
        storage.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                       "dir": str(certs["server"]), "endpoint": "server",
                                       "verify-peer": True})
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "pit0",
                                         "file": {"driver": "file", "filename": str(image)}})
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                             "tls-creds": "tls0"})
        storage.execute("nbd-server-add", {"device": "pit0"})
        yield storage, sock
    finally:
        storage.close()


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    require("nbdinfo")
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=30,
                          env=PEER_ENV)


def test_tls_client_with_the_right_ca_reads(
    tls_server: tuple[Storage, str], certs: dict[str, Path], tmp_path: Path
) -> None:
    _, sock = tls_server
    uri = f"nbds+unix:///pit0?socket={sock}&tls-certificates={certs['client']}"
    proc = nbdinfo("--json", uri)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == len(CONTENT)
    out = tmp_path / "copy.raw"
    require("nbdcopy")
    copy = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True,
                          timeout=30, env=PEER_ENV)
    assert copy.returncode == 0, copy.stderr
    assert out.read_bytes() == CONTENT


def test_python_client_over_tls(tls_server: tuple[Storage, str], certs: dict[str, Path]) -> None:
    _, sock = tls_server
    context = ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))
    context.load_cert_chain(str(certs["client"] / "client-cert.pem"),
                            str(certs["client"] / "client-key.pem"))
    with NBDClient.connect_unix(sock, "pit0", tls=context, server_hostname="localhost") as client:
        assert client.pread(4096, 512) == CONTENT[4096:4608]
    with pytest.raises(NegotiationError, match="0x80000005"):  # NBD_REP_ERR_TLS_REQD
        NBDClient.connect_unix(sock, "pit0")


def test_plain_client_is_refused(tls_server: tuple[Storage, str]) -> None:
    _, sock = tls_server
    proc = nbdinfo(f"nbd+unix:///pit0?socket={sock}")
    assert proc.returncode != 0, proc.stdout


def test_wrong_ca_fails(tls_server: tuple[Storage, str], certs: dict[str, Path]) -> None:
    _, sock = tls_server
    proc = nbdinfo(f"nbds+unix:///pit0?socket={sock}&tls-certificates={certs['wrong']}")
    assert proc.returncode != 0
    uri = f"nbds+unix:///pit0?socket={sock}&tls-certificates={certs['client']}"
    proc = nbdinfo("--size", uri)
    assert proc.stdout.strip() == str(len(CONTENT)), proc.stderr  # still serving


def test_tls_object_lifetime(tls_server: tuple[Storage, str]) -> None:
    storage, _ = tls_server
    with pytest.raises(GenericError, match="in use"):
        storage.execute("object-del", {"id": "tls0"})
    with pytest.raises(GenericError, match="duplicate"):
        storage.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/x",
                                       "endpoint": "server"})
    with pytest.raises(GenericError, match=r"ca-cert\.pem"):
        storage.execute("object-add", {"qom-type": "tls-creds-x509", "id": "t1",
                                       "dir": "/nonexistent", "endpoint": "server"})
    storage.execute("nbd-server-stop")
    storage.execute("object-del", {"id": "tls0"})
    with pytest.raises(GenericError, match="not found"):
        storage.execute("object-del", {"id": "tls0"})
