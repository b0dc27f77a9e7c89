"""fleece's NBD server against the real peers: nbdinfo, nbdcopy, nbdsh, qemu-io, qemu-img, fio.

Every peer missing is a failure (``require``/``run`` from the conftest), never a skip. Each test
starts a ``Storage`` in process with its server on a unix socket in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleece.nbd.client import NBDClient
from fleece.nbd.constants import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt
from fleece.storage import Storage
from tests.interop.conftest import require, run

pytestmark = [pytest.mark.interop, pytest.mark.timeout(20)]

MiB = 1 << 20
PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def peer(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a peer with Debian's /usr/bin first (nbdsh imports Debian's Python)."""
    require(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=PEER_ENV)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def nbdsh(script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return peer("nbdsh", "-c", script, check=check)


class Served:
    """A Storage exporting nodes over a unix socket."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "nbd.sock")
        self.storage = Storage()
        self.storage.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.sock}}}
        )

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def add_node(self, name: str, path: Path, fmt: str = "raw") -> None:
        self.storage.execute("blockdev-add", {
            "driver": fmt, "node-name": name, "file": {"driver": "file", "filename": str(path)}
        })

    def export(self, name: str, writable: bool = False) -> str:
        self.storage.execute("nbd-server-add", {"device": name, "writable": writable})
        return self.uri(name)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.storage.close()


def pattern_image(path: Path, size: int = 8 * MiB) -> bytes:
    """A raw image with data in some places and holes elsewhere; returns its content."""
    data = bytearray(size)
    for i in range(0, size, 1 * MiB):
        data[i:i + 65536] = bytes([(i // MiB + 1) & 0xFF]) * 65536
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture
def raw_export(served: Served) -> tuple[Served, str, bytes]:
    content = pattern_image(served.tmp / "disk.raw")
    served.add_node("disk", served.tmp / "disk.raw")
    return served, served.export("disk"), content


# -- information and copying --------------------------------------------------------------------
def test_nbdinfo_json_and_list(raw_export: tuple[Served, str, bytes]) -> None:
    served, uri, content = raw_export
    info = json.loads(peer("nbdinfo", "--json", uri).stdout)
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["export-size"] == len(content)
    assert export["is_read_only"] is True and export["can_multi_conn"] is True
    assert "base:allocation" in export["contexts"]
    assert export["block_size_minimum"] == 1 and export["block_size_maximum"] == 32 * MiB
    listed = peer("nbdinfo", "--list", served.uri("")).stdout
    assert 'export="disk"' in listed


def test_nbdinfo_map_and_allocation_depth(served: Served) -> None:
    base, top = served.tmp / "base.qcow2", served.tmp / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base))
    run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 2M 1M", str(top))
    served.storage.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": str(top)},
    })
    uri = served.export("top")
    depth = peer("nbdinfo", "--map=qemu:allocation-depth", uri).stdout.split("\n")
    rows = [line.split() for line in depth if line.strip()]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
        (0, MiB, 2), (MiB, MiB, 0), (2 * MiB, MiB, 1), (3 * MiB, MiB, 0)
    ]
    alloc = peer("nbdinfo", "--map", uri).stdout
    rows = [line.split() for line in alloc.split("\n") if line.strip()]
    assert (int(rows[0][0]), int(rows[0][1]), int(rows[0][2])) == (0, MiB, 0)
    assert any(int(r[2]) == 3 for r in rows)  # hole,zero somewhere


def test_nbdcopy_multi_conn_equals_image(raw_export: tuple[Served, str, bytes]) -> None:
    served, uri, content = raw_export
    out = served.tmp / "copy.raw"
    peer("nbdcopy", "-C", "4", uri, str(out))
    assert out.read_bytes() == content


def test_qemu_io_and_qemu_img_over_nbd(raw_export: tuple[Served, str, bytes]) -> None:
    served, uri, _ = raw_export
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x01 0 64k",
              "-c", "read -P 0x02 1M 64k", "-c", "read -P 0 64k 64k", uri).stdout
    assert "failed" not in out.lower() and out.count("read 65536/65536") == 3
    run("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", uri, str(served.tmp / "disk.raw"))
    converted = served.tmp / "converted.qcow2"
    run("qemu-img", "convert", "-U", "-f", "raw", "-O", "qcow2", uri, str(converted))
    run("qemu-img", "compare", "-U", "-F", "raw", str(converted), str(served.tmp / "disk.raw"))


# -- errors by exact errno ----------------------------------------------------------------------
def test_nbdsh_errors_by_errno(raw_export: tuple[Served, str, bytes]) -> None:
    _, uri, content = raw_export
    script = f"""
import errno
h.set_strict_mode(0)
h.connect_uri({uri!r})
def err(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno]
    return "ok"
print("write", err(lambda: h.pwrite(b"x" * 512, 0)))
print("zero", err(lambda: h.zero(512, 0)))
print("trim", err(lambda: h.trim(512, 0)))
print("read-end", err(lambda: h.pread(2, {len(content)} - 1)))
print("read", h.pread(4, 0) == b"\\x01" * 4)
"""
    out = nbdsh(script).stdout.split("\n")
    assert out[:5] == ["write EPERM", "zero EPERM", "trim EPERM", "read-end EINVAL", "read True"]


def test_writable_export_enospc_and_data(served: Served) -> None:
    pattern_image(served.tmp / "rw.raw", 1 * MiB)
    served.add_node("rw", served.tmp / "rw.raw")
    uri = served.export("rw", writable=True)
    script = f"""
import errno
h.set_strict_mode(0)
h.connect_uri({uri!r})
h.pwrite(b"\\xab" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.zero(4096, 0)
h.flush()
def past_end(name, call):
    try:
        call()
        print(name, "no error")
    except nbd.Error as e:
        print(name, e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno])
past_end("write", lambda: h.pwrite(b"x" * 8, {MiB} - 4))
past_end("zero", lambda: h.zero(8, {MiB} - 4))
past_end("trim", lambda: h.trim(8, {MiB} - 4))  # the NBD spec: EINVAL, not ENOSPC
print(h.pread(4096, 8192) == b"\\xab" * 4096, h.pread(4096, 0) == bytes(4096))
"""
    assert nbdsh(script).stdout.split("\n")[:4] == ["write ENOSPC", "zero ENOSPC", "trim EINVAL",
                                                    "True True"]
    data = (served.tmp / "rw.raw").read_bytes()
    assert data[8192:12288] == b"\xab" * 4096 and data[:4096] == bytes(4096)


def test_old_client_without_fixed_newstyle(raw_export: tuple[Served, str, bytes]) -> None:
    _, uri, content = raw_export
    script = f"""
h.set_handshake_flags(0)
h.connect_uri({uri!r})
print(h.get_protocol(), h.get_structured_replies_negotiated(), h.get_size())
print(h.pread(4, {MiB}) == b"\\x02" * 4)
"""
    out = nbdsh(script).stdout.split("\n")
    assert out[0] == f"newstyle False {len(content)}"
    assert out[1] == "True"


# -- load ---------------------------------------------------------------------------------------
def test_fio_nbd_engine(served: Served) -> None:
    pattern_image(served.tmp / "fio.raw", 16 * MiB)
    served.add_node("fio", served.tmp / "fio.raw")
    uri = served.export("fio", writable=True)
    proc = peer("fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw",
                "--bs=4k", "--iodepth=16", "--size=16M", "--time_based", "--runtime=2",
                "--output-format=json")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0


def test_64_requests_in_flight_with_nbdsh_aio(raw_export: tuple[Served, str, bytes]) -> None:
    _, uri, _ = raw_export
    script = f"""
h.connect_uri({uri!r})
bufs = [nbd.Buffer(65536) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], i * 131072) for i in range(64)]
print(h.aio_in_flight())
while h.aio_in_flight():
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)
ok = all(bufs[i].to_bytearray() == bytes([(i // 8 + 1)]) * 65536 if i % 8 == 0 else True
         for i in range(64))
print(ok)
"""
    out = nbdsh(script).stdout.split("\n")
    assert int(out[0]) > 1 and out[1] == "True"


# -- robustness ---------------------------------------------------------------------------------
def still_serves(uri: str) -> None:
    assert peer("nbdinfo", "--size", uri).stdout.strip().isdigit()


def handshake(sock_path: str, name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(sock_path)
    sock.recv(18)
    sock.sendall(struct.pack(">I", 3))
    raw = name.encode()
    sock.sendall(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, len(raw)) + raw)
    got = b""
    while len(got) < 10:
        chunk = sock.recv(10 - len(got))
        assert chunk
        got += chunk
    return sock


def test_garbage_and_bad_magic_disconnect(raw_export: tuple[Served, str, bytes]) -> None:
    served, uri, _ = raw_export
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(served.sock)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
    sock.recv(18)
    assert sock.recv(100) == b""  # dropped
    sock.close()
    sock = handshake(served.sock, "disk")
    sock.sendall(b"\x00" * 28)
    assert sock.recv(100) == b""
    sock.close()
    still_serves(uri)


def test_disconnect_mid_write_changes_nothing(served: Served) -> None:
    content = pattern_image(served.tmp / "w.raw", 1 * MiB)
    served.add_node("w", served.tmp / "w.raw")
    uri = served.export("w", writable=True)
    sock = handshake(served.sock, "w")
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 1 * MiB)
    sock.sendall(header + b"\xee" * (MiB // 2))
    sock.close()
    time.sleep(0.2)
    with NBDClient.connect_unix(served.sock, "w") as client:
        assert client.pread(0, MiB) == content
    assert (served.tmp / "w.raw").read_bytes() == content
    still_serves(uri)


def test_thousand_connections_opened_and_dropped(raw_export: tuple[Served, str, bytes]) -> None:
    served, uri, _ = raw_export
    for i in range(1000):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(served.sock)
        if i % 2:
            sock.recv(18)
            sock.sendall(struct.pack(">I", 3))
        sock.close()
    still_serves(uri)
    server = served.storage.nbd_server
    assert server is not None
    deadline = time.monotonic() + 5
    while len(server.connections) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.connections) == 0


# -- fleecing -----------------------------------------------------------------------------------
def test_fleecing_export_serves_the_point_in_time(served: Served) -> None:
    storage, tmp = served.storage, served.tmp
    src = tmp / "src.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(src), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5d 0 64k", str(src))
    storage.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": str(src)},
    })
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
    storage.execute("drive-backup", {"device": "virtio0", "format": "qcow2", "sync": "none",
                                     "target": str(tmp / "pit0.qcow2"), "target-id": "pit0"})
    storage.execute("nbd-server-add", {"device": "pit0", "writable": False})
    uri = served.uri("pit0")
    storage.device("virtio0").pwrite(0, b"\xa5" * 65536)
    assert storage.device("virtio0").pread(0, 4) == b"\xa5" * 4

    def reads_old() -> None:
        out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5d 0 64k", uri).stdout
        assert "read 65536/65536" in out and "fail" not in out.lower()

    reads_old()
    storage.execute("block-job-cancel", {"device": "virtio0"})
    deadline = time.monotonic() + 10
    while storage.execute("query-block-jobs") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.execute("query-block-jobs") == []
    reads_old()
    names = {n["node-name"] for n in storage.execute("query-named-block-nodes")}
    assert "pit0" in names
    storage.execute("nbd-server-stop")
    names = {n["node-name"] for n in storage.execute("query-named-block-nodes")}
    assert "pit0" not in names
