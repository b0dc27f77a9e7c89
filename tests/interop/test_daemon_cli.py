"""``fleece daemon`` started with qemu-storage-daemon's own command lines, unchanged.

The command line is put together from qemu-storage-daemon(1) (docs/tools/qemu-storage-daemon.rst
of QEMU 7.2): its QMP monitor example, its NBD export example and ``--pidfile``. The same line
is given to both daemons; each serves the export (read by nbdinfo and qemu-img) and the QMP
monitor, writes its pid file once started, and goes on SIGTERM (``kill -SIGTERM
$(<path/to/qsd.pid)``, as the manual says), taking the pid file with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemons import RawQMP, fleece_argv
from tests.peers import PEER_ENV, run

START_TIMEOUT = 30.0

#: qemu-storage-daemon(1): "Launch the daemon with QMP monitor socket qmp.sock ..." and "Export
#: raw image file disk.img over NBD UNIX domain socket nbd.sock", with the manual's --pidfile
DOCUMENTED = [
    "--chardev", "socket,path=qmp.sock,server=on,wait=off,id=char1",
    "--monitor", "chardev=char1",
    "--blockdev", "driver=file,node-name=disk,filename=disk.img",
    "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
    "--export", "type=nbd,id=export,node-name=disk,writable=on",
    "--pidfile", "qsd.pid",
]


def _wait_pidfile(path: Path, proc: subprocess.Popen[str] | None) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if path.exists() and path.read_text().endswith("\n"):
            return int(path.read_text())
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the daemon exited {proc.returncode}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail("no pid file")
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _check_serving(folder: Path) -> None:
    """The export reads as the image, with nbdinfo and qemu-img; QMP answers on qmp.sock."""
    uri = f"nbd+unix:///disk?socket={folder / 'nbd.sock'}"
    info = run("nbdinfo", "--json", uri).stdout
    assert '"export-size": 4194304' in info, info
    assert '"is_read_only": false' in info, info
    assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                                         str(folder / "disk.img"), uri).stdout
    qmp = RawQMP(folder / "qmp.sock")
    try:
        qmp.negotiate()
        exports = qmp.ok("query-block-exports")
        assert exports == [{"type": "nbd", "id": "export", "node-name": "disk",
                            "shutting-down": False}]
    finally:
        qmp.close()


def _image(folder: Path) -> None:
    folder.mkdir()
    run("qemu-img", "create", "-f", "raw", str(folder / "disk.img"), "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 3M 64k",
        str(folder / "disk.img"))


@pytest.mark.parametrize("daemon", ["qemu-storage-daemon", "fleece"])
def test_documented_command_line_serves_the_export(tmp_path: Path, daemon: str) -> None:
    folder = tmp_path / daemon
    _image(folder)
    argv = ["qemu-storage-daemon", *DOCUMENTED] if daemon != "fleece" else fleece_argv(
        *DOCUMENTED)
    with subprocess.Popen(argv, cwd=folder, env=PEER_ENV, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            pid = _wait_pidfile(folder / "qsd.pid", proc)
            assert pid == proc.pid
            _check_serving(folder)
            os.kill(pid, signal.SIGTERM)  # the manual's way to stop it
            assert proc.wait(START_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "Traceback" not in proc.communicate()[1]
    assert not (folder / "qsd.pid").exists()


def test_daemonize_returns_once_started(tmp_path: Path) -> None:
    """``--daemonize``: the command returns 0 once the daemon serves; the pid file names the
    daemon, which goes on SIGTERM."""
    folder = tmp_path / "fleece"
    _image(folder)
    proc = subprocess.run(fleece_argv(*DOCUMENTED, "--daemonize"), cwd=folder, env=PEER_ENV,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "nbd.sock").exists() and (folder / "qmp.sock").exists()
    pid = _wait_pidfile(folder / "qsd.pid", None)
    try:
        _check_serving(folder)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + START_TIMEOUT
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert not (folder / "qsd.pid").exists()


def test_daemonize_failing_start_exits_1(tmp_path: Path) -> None:
    proc = subprocess.run(fleece_argv("--daemonize", "--blockdev", "file,node-name=f",
                                      "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/n"),
                          cwd=tmp_path, env=PEER_ENV, capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr == ("fleece daemon: --blockdev file,node-name=f: Parameter 'filename' "
                           "is missing\n")


def _query_ro(folder: Path, *options: str) -> bool:
    argv = fleece_argv("--qmp", f"unix:{folder / 'q.sock'}", *options, "--pidfile",
                       str(folder / "d.pid"))
    with subprocess.Popen(argv, cwd=folder, env=PEER_ENV, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            _wait_pidfile(folder / "d.pid", proc)
            qmp = RawQMP(folder / "q.sock")
            try:
                qmp.negotiate()
                nodes = qmp.ok("query-named-block-nodes")
            finally:
                qmp.close()
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(START_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    ro = {node["node-name"]: node["ro"] for node in nodes}
    assert len(set(ro.values())) == 1, ro
    return bool(next(iter(ro.values())))


@pytest.mark.parametrize(("flag", "read_only"), [("readonly=on", True), ("readonly=off", False),
                                                 ("readonly=yes", True)])
def test_drive_readonly_is_honoured(tmp_path: Path, flag: str, read_only: bool) -> None:
    _image(tmp_path / "f")
    disk = tmp_path / "f" / "disk.img"
    assert _query_ro(tmp_path / "f", "--drive", f"id=v,file={disk},format=raw,{flag}") is read_only


def test_drive_readonly_1_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(fleece_argv("--qmp", f"unix:{tmp_path}/q.sock", "--drive",
                                      f"id=v,file={tmp_path}/x,readonly=1"),
                          env=PEER_ENV, capture_output=True, text=True, timeout=START_TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.endswith(": Parameter 'readonly' expects 'on' or 'off'\n")


def test_cache_direct_off_and_json_form_open(tmp_path: Path) -> None:
    """``cache.direct=off`` (what fleece does) is accepted, in both syntaxes."""
    _image(tmp_path / "f")
    disk = tmp_path / "f" / "disk.img"
    assert _query_ro(
        tmp_path / "f",
        "--blockdev", f"file,node-name=a,filename={disk},cache.direct=off,read-only=on",
        "--blockdev", '{"driver": "raw", "node-name": "b", "file": "a", '
                      '"cache": {"direct": false}, "read-only": true}') is True


def test_help_has_the_options_and_examples() -> None:
    proc = subprocess.run(fleece_argv("-h"), capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert proc.returncode == 0
    for option in ("--blockdev", "--chardev", "--daemonize", "--export", "--monitor",
                   "--nbd-server", "--object", "--pidfile", "--trace", "--version", "--qmp",
                   "--drive", "Examples:"):
        assert option in proc.stdout
    version = subprocess.run(fleece_argv("-V"), capture_output=True, text=True,
                             timeout=START_TIMEOUT)
    assert version.returncode == 0
    assert version.stdout.startswith("fleece daemon version ")


@pytest.mark.parametrize("daemon", ["qemu-storage-daemon", "fleece"])
def test_blockdev_nbd_serves_a_remote_disk(tmp_path: Path, daemon: str) -> None:
    """``--blockdev nbd,...`` (a node on a remote NBD server, qemu-nbd here) exported again:
    what a client writes through the daemon lands in the remote image, on both daemons."""
    remote = tmp_path / "remote.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(remote), "4M")
    server = subprocess.Popen(["qemu-nbd", "-t", "-k", str(tmp_path / "remote.sock"),
                               "-f", "qcow2", "-x", "rem", str(remote)], env=PEER_ENV)
    proc: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (tmp_path / "remote.sock").exists():
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        options = [
            "--blockdev", f"nbd,node-name=n,server.type=unix,"
                          f"server.path={tmp_path / 'remote.sock'},export=rem",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
            "--export", "nbd,id=e,node-name=n,writable=on",
            "--pidfile", str(tmp_path / "d.pid"),
        ]
        argv = ["qemu-storage-daemon", *options] if daemon == "qemu-storage-daemon" \
            else fleece_argv(*options)
        proc = subprocess.Popen(argv, env=PEER_ENV, text=True)
        _wait_pidfile(tmp_path / "d.pid", proc)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 64k 1M",
            f"nbd+unix:///n?socket={tmp_path / 'nbd.sock'}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(START_TIMEOUT)
        server.send_signal(signal.SIGTERM)
        server.wait(START_TIMEOUT)
    assert "read 1048576/1048576" in run("qemu-io", "-f", "qcow2", "-c", "read -P 0x6b 64k 1M",
                                         str(remote)).stdout
