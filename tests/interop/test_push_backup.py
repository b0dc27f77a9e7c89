"""Push backup with fleecing (#16) against real NBD servers: qemu-nbd, nbdkit memory and a
second fleece ``Storage``.

The scheme is QEMU's: the guest writes through a ``copy-before-write`` filter whose target is a
local fleecing image, and a backup job copies the ``snapshot-access`` node over the filter to an
``nbd`` node on the remote server. A guest thread writes throughout; the pushed image must equal,
byte for byte (``qemu-img compare``), the disk's content at the instant the filter went in.
The remote server is killed and restarted mid-job within ``reconnect-delay`` (the job
completes) and left dead past it (the job fails; the guest never sees an error). TLS uses client
certificates made by certtool.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.qcow2 import create
from fleece.jobs.backup import DEFAULT_MAX_WORKERS
from fleece.storage import Storage
from tests.events import EventLog
from tests.peers import PEER_ENV, require

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

MiB = 1 << 20
SIZE = 32 * MiB
CLUSTER = 64 * 1024  # the fleecing filter's, and the push job's, cluster size


class Guest:
    """A thread writing 4 KiB blocks of random data through device virtio0 until stopped;
    ``pause()`` holds it between two writes."""

    def __init__(self, storage: Storage) -> None:
        self.device = storage.device("virtio0")
        self.errors: list[BaseException] = []
        self.writes = 0
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(16)
        while not self._stop.is_set():
            if not self._go.is_set():
                self._idle.set()
                self._go.wait()
                continue
            self._idle.clear()
            try:
                self.device.pwrite(rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096))
                self.writes += 1
            except BaseException as exc:
                self.errors.append(exc)
                return
            time.sleep(0.0005)

    def pause(self) -> None:
        self._go.clear()
        self._idle.wait(5)

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join(10)


class Local:
    """The fleecing side: a qcow2 disk with data as device virtio0, a guest writing to it, and
    the filter scheme set up at :meth:`snapshot` (whose content is saved to ``expected.raw``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.storage = Storage()
        self.log = EventLog()
        self.storage.subscribe(self.log)
        disk = str(tmp / "disk.qcow2")
        create(disk, SIZE)
        self.x("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                "file": {"driver": "file", "filename": disk}})
        self.x("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
        device = self.storage.device("virtio0")
        rng = random.Random(7)
        for offset in range(0, SIZE, 2 * MiB):  # half data, half never written (zeroes)
            device.pwrite(offset, rng.randbytes(MiB))
        self.guest = Guest(self.storage)
        self.expected = tmp / "expected.raw"

    def x(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self.storage.execute(command, args or {})

    def snapshot(self) -> None:
        """The point in time: the guest held, its content saved, the filter and
        snapshot-access added (fleecing image: a sparse raw file), the guest let go."""
        fleecing = sparse_raw(self.tmp / "fleecing.raw")
        self.guest.pause()
        try:
            self.expected.write_bytes(self.storage.device("virtio0").pread(0, SIZE))
            self.x("blockdev-add", {"driver": "raw", "node-name": "fl-img", "discard": "unmap",
                                    "file": {"driver": "file", "filename": str(fleecing),
                                             "discard": "unmap"}})
            self.x("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                    "file": "src", "target": "fl-img"})
            self.x("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                    "file": "fl"})
        finally:
            self.guest.resume()

    def add_nbd(self, sock: str, **extra: Any) -> None:
        self.x("blockdev-add", {"driver": "nbd", "node-name": "push",
                                "server": {"type": "unix", "path": sock}, **extra})

    def push(self, **extra: Any) -> None:
        self.x("blockdev-backup", {"device": "acc", "target": "push", "sync": "full",
                                   "job-id": "push0", **extra})

    def wait_done(self, timeout: float = 30) -> dict[str, Any]:
        return self.log.wait("BLOCK_JOB_COMPLETED", timeout, device="push0")

    def push_whole(self, sock: str, **nbd_options: Any) -> None:
        """Push the snapshot to the server on ``sock`` with a fresh ``nbd`` node, which goes
        once the job completed without error."""
        self.add_nbd(sock, **nbd_options)
        self.push()
        assert "error" not in self.wait_done()
        self.x("blockdev-del", {"node-name": "push"})

    def end_discarding_push(self) -> None:
        """After a push with ``discard-source`` that completed: the guest wrote meanwhile, what
        was pushed left the fleecing image (at most 2 MiB of it stays allocated), and the
        ``nbd`` node goes."""
        assert self.guest.writes > 0
        fleecing = os.stat(self.tmp / "fleecing.raw").st_blocks * 512
        assert fleecing <= 2 * MiB, fleecing
        self.x("blockdev-del", {"node-name": "push"})

    def close(self) -> None:
        self.guest.stop()
        self.storage.close()
        assert not self.guest.errors, self.guest.errors


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    side = Local(tmp_path)
    try:
        yield side
    finally:
        side.close()


class Server:
    """A peer NBD server process on a unix socket, restartable on the same socket."""

    def __init__(self, argv: list[str], sock: str) -> None:
        self.argv = argv
        self.sock = sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=PEER_ENV)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"{self.argv[0]} did not start: {err}")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def sparse_raw(path: Path) -> Path:
    """A sparse raw file of ``SIZE`` bytes at ``path``."""
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


def qemu_nbd(image: Path, sock: str, fmt: str, *extra: str) -> Server:
    return Server([require("qemu-nbd"), "-t", "-f", fmt, "-k", sock, *extra, str(image)], sock)


def compare(expected: Path, target: str, fmt: str) -> None:
    result = subprocess.run(
        [require("qemu-img"), "compare", "-f", "raw", "-F", fmt, str(expected), target],
        capture_output=True, text=True, env=PEER_ENV, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_push_to_qemu_nbd_qcow2_with_discard_source(local: Local, tmp_path: Path) -> None:
    image = tmp_path / "backup.qcow2"
    subprocess.run([require("qemu-img"), "create", "-q", "-f", "qcow2", str(image), str(SIZE)],
                   check=True, env=PEER_ENV)
    server = qemu_nbd(image, str(tmp_path / "q.sock"), "qcow2")
    try:
        local.snapshot()
        local.add_nbd(server.sock)
        local.push(**{"discard-source": True, "speed": 64 * MiB})
        jobs = local.x("query-block-jobs")
        assert [j["device"] for j in jobs] == ["push0"] and jobs[0]["len"] == SIZE
        assert "error" not in local.wait_done()
        local.end_discarding_push()
    finally:
        server.stop()
    compare(local.expected, str(image), "qcow2")
    # zero ranges went as write-zeroes: the backup's half never written is not allocated
    info = subprocess.run([require("qemu-img"), "info", "--output=json", str(image)],
                          capture_output=True, text=True, env=PEER_ENV, check=True).stdout
    import json

    assert json.loads(info)["actual-size"] < SIZE * 3 // 4


def test_push_to_nbdkit_memory(local: Local, tmp_path: Path) -> None:
    sock = str(tmp_path / "k.sock")
    server = Server([require("nbdkit"), "-f", "-U", sock, "memory", str(SIZE)], sock)
    try:
        local.snapshot()
        local.push_whole(sock)
        compare(local.expected, f"nbd+unix:///?socket={sock}", "raw")
    finally:
        server.stop()


def test_push_to_fleece_and_incremental(local: Local, tmp_path: Path) -> None:
    image = sparse_raw(tmp_path / "remote.raw")
    remote = Storage()
    sock = str(tmp_path / "f.sock")
    try:
        remote.execute("blockdev-add", {"driver": "raw", "node-name": "r",
                                        "file": {"driver": "file", "filename": str(image)}})
        remote.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        remote.execute("nbd-server-add", {"device": "r", "writable": True})
        # a full push, with bitmap b0 tracking the guest from the same instant
        local.guest.pause()
        local.x("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        local.snapshot()
        local.guest.resume()
        local.add_nbd(sock)
        local.push()
        assert "error" not in local.wait_done()
        compare(local.expected, str(image), "raw")
        # then an incremental push of what the guest wrote since, from a new snapshot
        local.guest.pause()
        local.x("blockdev-del", {"node-name": "acc"})
        local.x("device_del", {"id": "virtio0"})  # the filter goes once nobody is on it
        for node in ("fl", "fl-img"):
            local.x("blockdev-del", {"node-name": node})
        local.x("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
        local.guest.device = local.storage.device("virtio0")
        local.snapshot()
        local.guest.pause()
        local.x("blockdev-backup", {"device": "acc", "target": "push", "sync": "incremental",
                                    "bitmap": "b0", "job-id": "push1", "auto-dismiss": False})
        local.guest.resume()
        done = local.log.wait("BLOCK_JOB_COMPLETED", 30, device="push1")
        assert "error" not in done
        (job,) = local.x("query-block-jobs")
        copied = job["fleecing"]["copied-bytes"]  # only what the guest dirtied since b0
        assert 0 < copied < SIZE // 4, copied
        local.x("job-dismiss", {"id": "push1"})
        compare(local.expected, str(image), "raw")
    finally:
        local.close()
        remote.close()


def push_then_kill_the_server(local: Local, tmp_path: Path, reconnect_delay: int,
                              multi_conn: int = 1) -> tuple[Path, Server]:
    """A speed-limited push to qemu-nbd (``reconnect-delay`` and ``multi-conn`` as given),
    whose server is killed mid-job; the pushed image and the (dead) server."""
    image = sparse_raw(tmp_path / "backup.raw")
    server = qemu_nbd(image, str(tmp_path / "q.sock"), "raw", "-e", str(multi_conn))
    try:
        local.snapshot()
        local.add_nbd(server.sock, **{"reconnect-delay": reconnect_delay,
                                      "multi-conn": multi_conn})
        local.push(speed=16 * MiB)
        time.sleep(0.5)
        assert local.storage.jobs.get("push0") is not None  # mid-job
        server.kill()
    except BaseException:
        server.stop()
        raise
    return image, server


@pytest.mark.parametrize("multi_conn", [1, 4])
def test_remote_restarted_within_reconnect_delay(local: Local, tmp_path: Path,
                                                 multi_conn: int) -> None:
    image, server = push_then_kill_the_server(local, tmp_path, reconnect_delay=10,
                                              multi_conn=multi_conn)
    try:
        time.sleep(0.7)
        server.start()
        assert "error" not in local.wait_done()
        local.x("blockdev-del", {"node-name": "push"})
    finally:
        server.stop()
    compare(local.expected, str(image), "raw")


def test_remote_gone_past_reconnect_delay(local: Local, tmp_path: Path) -> None:
    _, server = push_then_kill_the_server(local, tmp_path, reconnect_delay=1)
    try:
        done = local.wait_done()
        assert "error" in done and done["offset"] < SIZE
        writes = local.guest.writes
        time.sleep(0.2)
        assert local.guest.writes > writes and not local.guest.errors  # the guest goes on
        snapshot = local.storage.graph.get("acc").pread(0, SIZE)  # the snapshot is intact
        assert snapshot == local.expected.read_bytes()
    finally:
        server.stop()


def test_push_over_tls_with_client_certificates(local: Local, tmp_path: Path,
                                                certs: dict[str, Path]) -> None:
    image = sparse_raw(tmp_path / "backup.raw")
    server = qemu_nbd(
        image, str(tmp_path / "t.sock"), "raw",
        "--object", f"tls-creds-x509,id=tls0,dir={certs['server']},endpoint=server,"
                    "verify-peer=on",
        "--tls-creds", "tls0",
    )
    try:
        local.x("object-add", {"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "client",
                               "dir": str(certs["wrong"])})
        with pytest.raises(Exception, match="Failed to connect"):
            local.add_nbd(server.sock, **{"tls-creds": "bad"})
        with pytest.raises(Exception, match="Failed to connect"):  # TLS is required
            local.add_nbd(server.sock)
        local.x("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "client",
                               "dir": str(certs["client"])})
        local.snapshot()
        local.push_whole(server.sock, **{"tls-creds": "tls0"})
    finally:
        server.stop()
    compare(local.expected, str(image), "raw")


def nbdkit_requests(log: Path) -> list[tuple[str, int, dict[str, str], str]]:
    """The data requests an nbdkit ``--filter=log`` log file shows, in order of their calls:
    ``(action, count, call fields, result)`` where the result is ``"0"`` or the error name."""
    calls: dict[tuple[str, str], tuple[str, int, dict[str, str]]] = {}
    order: list[tuple[str, str]] = []
    results: dict[tuple[str, str], str] = {}
    for line in log.read_text().splitlines():
        words = line.split()[2:]  # after the date and time
        if len(words) < 3 or not words[0].startswith("connection="):
            continue
        conn, action = words[0], words[1]
        fields = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        key = (conn, fields.get("id", ""))
        if action in ("Write", "Zero", "Trim"):
            calls[key] = (action, int(fields["count"], 16), fields)
            order.append(key)
        elif action.lstrip(".") in ("Write", "Zero", "Trim"):
            results[key] = fields.get("error", fields.get("return", "?"))
    return [(*calls[key], results.get(key, "?")) for key in order]


@pytest.mark.parametrize("fastzeromode", ["default", "slow"])
def test_zero_ranges_go_as_write_zeroes(local: Local, tmp_path: Path,
                                        fastzeromode: str) -> None:
    """The never-written half of the disk is pushed as WRITE_ZEROES, tried with FAST_ZERO
    first; a server that refuses fast zeroes (``slow``) gets plain ones after its refusal."""
    sock, log = str(tmp_path / "k.sock"), tmp_path / "nbdkit.log"
    server = Server([require("nbdkit"), "-f", "-U", sock, "--filter=log", "--filter=nozero",
                     "memory", str(SIZE), f"logfile={log}", "zeromode=plugin",
                     f"fastzeromode={fastzeromode}"], sock)
    try:
        local.snapshot()
        local.push_whole(sock)
        compare(local.expected, f"nbd+unix:///?socket={sock}", "raw")
    finally:
        server.stop()
    requests = nbdkit_requests(log)
    written = sum(n for action, n, _, result in requests if action == "Write" and result == "0")
    zeroed = sum(n for action, n, _, result in requests if action == "Zero" and result == "0")
    # The data half, and the clusters of the other half the guest wrote before the snapshot
    # (it writes from the start: how many depends on the machine's load), went as data.
    point_in_time = local.expected.read_bytes()
    data = CLUSTER * sum(1 for at in range(0, SIZE, CLUSTER)
                         if point_in_time[at:at + CLUSTER].count(0) < CLUSTER)
    assert data < SIZE * 3 // 4, data  # most of the never-written half is still zeroes
    assert written <= data + MiB, (written, data)  # only those went as data
    assert zeroed >= SIZE - data - MiB, (zeroed, data)
    fast = [(f["fast"], result) for action, _, f, result in requests if action == "Zero"]
    if fastzeromode == "default":  # the memory plugin zeroes fast: every zero went so
        assert fast and all(f == ("1", "0") for f in fast), fast
    else:  # refused to each zero the workers had in flight by then, then plain zeroes only
        refused = [i for i, f in enumerate(fast) if f == ("1", "ENOTSUP")]
        assert 1 <= len(refused) <= DEFAULT_MAX_WORKERS and ("1", "0") not in fast, fast
        assert refused[-1] < 2 * DEFAULT_MAX_WORKERS, fast  # all of them near the start
        after = fast[refused[-1] + 1:]
        assert after and all(f == ("0", "0") for f in after), fast


def nbdkit_calls(log: Path) -> dict[str, list[str]]:
    """The calls (``Connect``, ``Write``, ``Flush``, ...) an nbdkit ``--filter=log`` log file
    shows, per connection, in order."""
    calls: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        words = line.split()[2:]
        if len(words) >= 2 and words[0].startswith("connection=") and words[1][0] != ".":
            calls.setdefault(words[0], []).append(words[1])
    return calls


def test_multi_conn_push_to_nbdkit_memory(local: Local, tmp_path: Path) -> None:
    """``multi-conn: 4`` to a server that offers it: four connections carry the push, each
    flushed at its end, and the pushed image is the point in time."""
    sock, log = str(tmp_path / "k.sock"), tmp_path / "nbdkit.log"
    server = Server([require("nbdkit"), "-f", "-U", sock, "--filter=log", "memory", str(SIZE),
                     f"logfile={log}"], sock)
    try:
        local.snapshot()
        local.add_nbd(sock, **{"multi-conn": 4})
        assert local.storage.graph.get("push").driver.connections == 4  # type: ignore[attr-defined]
        local.push()
        assert "error" not in local.wait_done()
        local.x("blockdev-del", {"node-name": "push"})
        compare(local.expected, f"nbd+unix:///?socket={sock}", "raw")
    finally:
        server.stop()
    calls = nbdkit_calls(log)
    writers = {conn for conn, actions in calls.items() if "Write" in actions}
    assert len(writers) == 4, calls.keys()
    for conn in writers:  # every connection's writes were flushed after the last of them
        actions = calls[conn]
        assert "Flush" in actions[len(actions) - actions[::-1].index("Write"):], conn


def test_multi_conn_push_to_qemu_nbd(local: Local, tmp_path: Path) -> None:
    image = sparse_raw(tmp_path / "backup.raw")
    server = qemu_nbd(image, str(tmp_path / "q.sock"), "raw", "-e", "4")
    try:
        local.snapshot()
        local.add_nbd(server.sock, **{"multi-conn": 4})
        assert local.storage.graph.get("push").driver.connections == 4  # type: ignore[attr-defined]
        local.push()
        assert "error" not in local.wait_done()
        local.x("blockdev-del", {"node-name": "push"})
    finally:
        server.stop()
    compare(local.expected, str(image), "raw")


def test_request_timeout_against_a_server_that_hangs(local: Local, tmp_path: Path) -> None:
    """A server that takes connections but never answers a write in time (nbdkit's delay
    filter: 5 s per write, over ``x-request-timeout: 1``): each write times out, is sent once
    more on a new connection, times out again and fails with EIO; the job reports it, the
    guest never sees it, and nothing waits forever."""
    sock = str(tmp_path / "k.sock")
    server = Server([require("nbdkit"), "-f", "-U", sock, "--filter=delay", "memory",
                     str(SIZE), "delay-write=5"], sock)
    try:
        local.snapshot()
        local.add_nbd(sock, **{"x-request-timeout": 1})
        started = time.monotonic()
        local.push()
        done = local.wait_done(timeout=20)
        assert "error" in done and done["offset"] < SIZE, done
        assert time.monotonic() - started < 10
        writes = local.guest.writes
        time.sleep(0.2)
        assert local.guest.writes > writes and not local.guest.errors  # the guest goes on
        local.x("blockdev-del", {"node-name": "push"})
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 8])
def test_parallel_push_with_discard_source(local: Local, tmp_path: Path, workers: int) -> None:
    """``x-perf.max-workers`` copies pieces at once over four connections while the guest
    writes: the pushed image is the point in time, progress reaches ``len``, and what each
    worker pushed left the fleecing image."""
    image = sparse_raw(tmp_path / "backup.raw")
    server = qemu_nbd(image, str(tmp_path / "q.sock"), "raw", "-e", "4")
    try:
        local.snapshot()
        local.add_nbd(server.sock, **{"multi-conn": 4})
        local.push(**{"discard-source": True, "x-perf": {"max-workers": workers}})
        done = local.wait_done()
        assert "error" not in done and done["offset"] == done["len"] == SIZE
        local.end_discarding_push()
    finally:
        server.stop()
    compare(local.expected, str(image), "raw")


def test_parallel_push_stops_once_and_resumes(local: Local, tmp_path: Path) -> None:
    """``on-target-error: stop`` with eight workers and the server killed mid-push: one
    ``BLOCK_JOB_ERROR`` (the first error wins, the other workers stop), the job pauses, the
    guest goes on; with the server back, resume finishes the push and the image is the point
    in time. The disk holds data everywhere first: a failed write of zeroes to the target
    (``skip_zeroes``) fails the job whatever the policy, with one worker as with eight."""
    image = sparse_raw(tmp_path / "backup.raw")
    server = qemu_nbd(image, str(tmp_path / "q.sock"), "raw", "-e", "4")
    try:
        device = local.storage.device("virtio0")
        rng = random.Random(8)
        for offset in range(MiB, SIZE, 2 * MiB):
            device.pwrite(offset, rng.randbytes(MiB))
        local.snapshot()
        local.add_nbd(server.sock, **{"multi-conn": 4})
        local.push(speed=16 * MiB, **{"on-target-error": "stop",
                                      "x-perf": {"max-workers": 8}})
        time.sleep(0.5)
        server.kill()
        error = local.log.wait("BLOCK_JOB_ERROR", 10, device="push0")
        assert error == {"device": "push0", "operation": "write", "action": "stop"}
        local.log.wait_status("push0", "paused")
        assert len(local.log.data("BLOCK_JOB_ERROR")) == 1
        writes = local.guest.writes
        time.sleep(0.2)
        assert local.guest.writes > writes and not local.guest.errors
        server.start()
        local.x("block-job-set-speed", {"device": "push0", "speed": 0})
        local.x("block-job-resume", {"device": "push0"})
        done = local.wait_done()
        assert "error" not in done and done["offset"] == SIZE
        local.x("blockdev-del", {"node-name": "push"})
    finally:
        server.stop()
    compare(local.expected, str(image), "raw")
