"""fleece daemon side by side with qemu-storage-daemon: the fleecing scenario of issue #8.

Both daemons run the same scenario one after the other in this run, driven through the same
QMP commands (``blockdev-add``, ``block-export-add``, ``blockdev-backup sync=none`` into a qcow2
target whose backing is the source node) and measured with the same peers (fio with
``ioengine=nbd``, nbdcopy). Scenario, per daemon and repeat, on a fresh copy of a qcow2 source
filled with random data:

1. export the source writable (``live``, the guest's path); nbdcopy it to ``null:``; fio
   sequential 64 KiB writes (iodepth 8) over the first half; fio random 4 KiB writes over the
   second half for ``--fio-seconds``;
2. add the target ``pit0`` (``qemu-img create -f qcow2 -b SRC -F qcow2``, opened with
   ``backing=src``), start ``blockdev-backup sync=none``, export ``pit0`` read-only (``snap``)
   and time until its first byte arrives;
3. with fleecing active: sequential 64 KiB writes over the first half (no cluster copied yet),
   nbdcopy of ``snap`` (half served from the target, half from the source), fio random 4 KiB
   reads of ``snap``, random 4 KiB writes over the second half; then, with the copied
   clusters of the second half scattered by those writes, fio random 256 KiB reads of that
   half of ``snap`` and nbdcopy of the whole snapshot again;
4. the daemon's peak RSS (``VmHWM``).

The nbdcopy of ``snap`` in step 3 runs with ``-C 4`` (multi-conn: both daemons advertise it
on a read-only export, so nbdcopy opens up to 4 connections), right after with ``-C 1``, then
with ``-C 4`` again; the row ``multi-conn: -C 4 / -C 1`` divides the third by the second and
says how much more than one connection's worth a daemon serves. (The first copy pays for
fleece's native routes learning the snapshot's mapping, the later ones find it learned: the
first is the figure compared with QEMU, the later two compare like with like.)

A push scenario (issue #16, push backup with fleecing), per daemon and repeat, on a fresh copy
of the same source: the filter scheme (``blockdev-add`` ``copy-before-write`` ``fl`` with
``file=src`` and ``target`` a fresh local qcow2 fleecing image, ``snapshot-access`` ``acc`` over
it), the filter exported writable for the guest (``guest``), a local ``qemu-nbd`` serving a
fresh raw image on a unix socket as the backup server (``blockdev-add driver=nbd``), then
``blockdev-backup device=acc target=push sync=full`` while fio writes 64 KiB sequentially
(iodepth 8) through ``guest`` from right after the command until ``BLOCK_JOB_COMPLETED`` (fio is
stopped by SIGINT then, so its figure covers the push only). Figures: the push throughput (source
size / time from ``blockdev-backup`` to ``BLOCK_JOB_COMPLETED``) and the guest's write
throughput during it. On the first repeat the pushed image is compared (``qemu-img compare``)
with the source as it was when the filter went in: the guest's writes must not appear in it.

A second check fleeces a sparse 1 TiB source the same way, reads and writes a few MiB, and
reports the peak RSS (fleece's must stay under 100 MiB). Run::

    python benchmarks/compare_qemu.py [--size 1G] [--repeat 2] [--runs 1] [--fio-seconds 3]
                                      [--json] [--plot docs/compare_qemu.png]
                                      [--only fleece|qemu] [--no-push] [--no-rss-1t]

Prints, for each figure, the best of ``--repeat`` repeats for each daemon and the ratio fleece /
QEMU (for times and memory, a ratio above 1 means fleece is better too: it is QEMU / fleece),
and, for each figure that moves bytes, each daemon's CPU seconds per GiB moved: user + system
time of the daemon process (all its threads, from ``/proc/PID/stat``) across that figure's
measurement, divided by the bytes nbdcopy or fio moved (the lowest of the repeats). With
``--runs N`` the whole comparison runs N times and each figure, ratio and CPU figure is the
median of the runs (ratios are taken within a run, then the median of those); issue #14's
"median of 3 runs" is ``--repeat 1 --runs 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from fleece.nbd.client import NBDClient
from fleece.units import parse_size

PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
MiB = 1 << 20
GiB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DAEMONS = ("fleece", "qemu")
RSS_LIMIT_MIB = 100.0


@dataclass(frozen=True)
class Figure:
    """One figure of the table: how to pick the best repeat and what ratio issue #8 wants."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    target: float | None = None  # the ratio (oriented so that higher is better) to reach


FIGURES = (
    Figure("seq_write", "seq 64k writes, no fleecing", "MiB/s", target=0.8),
    Figure("seq_write_fleece", "seq 64k writes, fleecing", "MiB/s", target=1.0),
    Figure("rand_write", "rand 4k writes, no fleecing", "IOPS", target=0.7),
    Figure("rand_write_fleece", "rand 4k writes, fleecing", "IOPS", target=0.7),
    Figure("copy_snapshot", "nbdcopy snapshot (half copied)", "MiB/s", target=1.0),
    Figure("copy_snapshot_1conn", "nbdcopy -C 1 of that snapshot", "MiB/s"),
    Figure("copy_snapshot_again", "nbdcopy -C 4 of it again", "MiB/s"),
    Figure("copy_live", "nbdcopy live export", "MiB/s"),
    Figure("rand_read_snapshot", "rand 4k reads, snapshot", "IOPS", target=0.7),
    Figure("read_scattered", "rand 256k reads, scattered snapshot", "MiB/s", target=1.0),
    Figure("copy_scattered", "nbdcopy snapshot (scattered)", "MiB/s", target=1.0),
    Figure("push", "push backup (guest writing)", "MiB/s", target=1.0),
    Figure("push_guest_write", "seq 64k writes during push", "MiB/s", target=1.0),
    Figure("first_byte", "blockdev-backup to 1st byte", "ms", higher_is_better=False),
    Figure("rss", "peak RSS (1 GiB scenario)", "MiB", higher_is_better=False),
    Figure("rss_1t", "peak RSS (1 TiB fleeced)", "MiB", higher_is_better=False),
)


# -- peers -----------------------------------------------------------------------------------
def run(argv: list[str]) -> str:
    """Run a peer; its stdout. ``CalledProcessError`` (with stderr shown) on failure."""
    done = subprocess.run(argv, capture_output=True, text=True, env=PEER_ENV)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        done.check_returncode()
    return done.stdout


def nbd_uri(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def nbdcopy_rate(sock: Path, export: str, size: int, connections: int | None = None) -> float:
    """MiB/s of ``nbdcopy`` from the export to ``null:``; ``connections`` is its ``-C`` (at
    most that many connections when the export advertises multi-conn; nbdcopy's default is
    4)."""
    argv = ["nbdcopy", nbd_uri(sock, export), "null:"]
    if connections is not None:
        argv[1:1] = [f"--connections={connections}", f"--threads={connections}"]
    start = time.perf_counter()
    run(argv)
    return size / (time.perf_counter() - start) / MiB


def fio(sock: Path, export: str, rw: str, bs: str, iodepth: int, offset: int, size: int,
        seconds: int = 0) -> dict[str, Any]:
    """One fio job over the export (``ioengine=nbd``); the job's read or write section."""
    argv = ["fio", "--name=job", "--ioengine=nbd", f"--uri={nbd_uri(sock, export)}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}", f"--offset={offset}",
            f"--size={size}", "--output-format=json"]
    if seconds:
        argv += [f"--runtime={seconds}", "--time_based"]
    out = run(argv)
    section: dict[str, Any] = json.loads(out[out.index("{"):])["jobs"][0]
    return section["write" if "write" in rw else "read"]  # type: ignore[no-any-return]


def vm_hwm_mib(pid: int) -> float:
    """The process's peak resident set size (``VmHWM``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far, all its threads (``utime`` and
    ``stime`` of ``/proc/PID/stat``, in clock ticks: 10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Figures:
    """One daemon's figures from one step, and its CPU seconds per GiB for those that move
    bytes."""

    values: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def measure(self, pid: int, key: str, step: Callable[[], tuple[float, int]]) -> None:
        """Run ``step``, which returns its figure and the bytes it moved; record the figure
        as ``key`` and the CPU seconds per GiB that process ``pid`` spent during it."""
        before = cpu_seconds(pid)
        value, moved = step()
        used = cpu_seconds(pid) - before
        self.values[key] = value
        if moved:
            self.cpu[key] = used / (moved / GiB)


def mib_per_s(section: dict[str, Any]) -> tuple[float, int]:
    """A fio section's bandwidth in MiB/s, and its bytes."""
    return section["bw_bytes"] / MiB, section["io_bytes"]


def iops(section: dict[str, Any]) -> tuple[float, int]:
    """A fio section's IOPS, and its bytes."""
    return section["iops"], section["io_bytes"]


def make_random_qcow2(path: Path, size: int, work: Path) -> None:
    """A fully allocated qcow2 image of random data (a random raw file, converted)."""
    raw = work / "random.raw"
    with raw.open("wb") as f:
        chunk = os.urandom(4 * MiB)
        left = size
        while left:
            # Vary each chunk a little so no two clusters are equal.
            piece = chunk[: min(left, len(chunk))]
            f.write(os.urandom(16) + piece[16:])
            left -= len(piece)
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()


# -- daemons ---------------------------------------------------------------------------------
class QMP:
    """Both daemons are driven through QEMU's own client library (``qemu.qmp``'s synchronous
    ``QEMUMonitorProtocol``); ``execute`` takes the arguments as one dict, as the schema spells
    them. It costs about 0.4 ms more per command than fleece's former hand-written client
    (0.76 vs 0.38 ms per round trip to ``fleece daemon``, 0.63 vs 0.30 ms to
    qemu-storage-daemon): the ``first_byte`` figure, two commands long, includes it for both
    (qemu-storage-daemon's went from 1.8 to 2.9-3.7 ms with it)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._qmp = QEMUMonitorProtocol(str(path), nickname="compare_qemu")
        self._qmp.connect()
        self._qmp.settimeout(timeout)

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's return value; ``qemu.qmp.ExecuteError`` when it fails."""
        return self._qmp.cmd(name, **(arguments or {}))

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data has the items ``data`` (events before it are
        dropped); ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} {data} within {timeout} s")
            try:
                # a float: qemu.qmp's legacy client takes an int (or True) as "wait forever"
                event = self._qmp.pull_event(wait=float(left))
            except TimeoutError:  # asyncio.TimeoutError since Python 3.11
                continue
            if event is None or event.get("event") != name:
                continue
            got: dict[str, Any] = event.get("data") or {}
            if all(got.get(key) == value for key, value in data.items()):
                return got

    def close(self) -> None:
        self._qmp.close()


@dataclass
class Daemon:
    kind: str
    pid: int
    qmp: QMP
    nbd: Path


@contextmanager
def daemon(kind: str, work: Path) -> Iterator[Daemon]:
    """Start ``fleece daemon`` or ``qemu-storage-daemon`` with a QMP socket and an NBD server
    on unix sockets in ``work``; quit it through QMP when done."""
    qmp_sock, nbd_sock, pidfile = work / f"{kind}.qmp", work / f"{kind}.nbd", work / f"{kind}.pid"
    for path in (qmp_sock, nbd_sock, pidfile):
        with suppress(FileNotFoundError):
            path.unlink()
    nbd_server = f"addr.type=unix,addr.path={nbd_sock}"
    if kind == "fleece":
        argv = [sys.executable, "-m", "fleece", "daemon", "--qmp", f"unix:{qmp_sock}",
                "--nbd-server", nbd_server, "--pidfile", str(pidfile)]
    else:
        argv = ["qemu-storage-daemon",
                "--chardev", f"socket,id=qmp0,path={qmp_sock},server=on,wait=off",
                "--monitor", "chardev=qmp0", "--nbd-server", nbd_server,
                "--pidfile", str(pidfile)]
    proc = subprocess.Popen(argv, env=PEER_ENV)
    client: QMP | None = None
    try:
        deadline = time.monotonic() + 30
        while not (qmp_sock.exists() and pidfile.exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{kind} daemon did not start")
            time.sleep(0.02)
        client = QMP(qmp_sock, timeout=120)
        yield Daemon(kind, proc.pid, client, nbd_sock)
    finally:
        if client is not None:
            with suppress(Exception):
                client.execute("quit")
            with suppress(Exception):  # the daemon may have gone first
                client.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def add_qcow2(qmp: QMP, name: str, path: Path, backing: str | None = None) -> None:
    options: dict[str, Any] = {"driver": "qcow2", "node-name": name,
                               "file": {"driver": "file", "filename": str(path)}}
    if backing is not None:
        options["backing"] = backing
    qmp.execute("blockdev-add", options)


def export(qmp: QMP, name: str, node: str, writable: bool) -> None:
    qmp.execute("block-export-add", {"type": "nbd", "id": name, "node-name": node,
                                     "name": name, "writable": writable})


def start_fleecing(d: Daemon, target: Path) -> float:
    """Add ``pit0`` over ``target``, start the backup and export ``snap``; the seconds from
    ``blockdev-backup`` until the snapshot's first bytes were read over NBD."""
    add_qcow2(d.qmp, "pit0", target, backing="src")
    start = time.perf_counter()
    d.qmp.execute("blockdev-backup", {"device": "src", "target": "pit0", "sync": "none",
                                      "job-id": "fleece"})
    export(d.qmp, "snap", "pit0", writable=False)
    with NBDClient.connect_unix(str(d.nbd), "snap") as client:
        client.pread(0, 4096)
    return time.perf_counter() - start


# -- the scenarios ---------------------------------------------------------------------------
def scenario(kind: str, work: Path, base: Path, size: int, seconds: int) -> Figures:
    """The 1 GiB scenario on one daemon; its figures."""
    source, target = work / f"{kind}-src.qcow2", work / f"{kind}-pit0.qcow2"
    shutil.copyfile(base, source)
    with suppress(FileNotFoundError):
        target.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(source), "-F", "qcow2",
         str(target)])
    half = size // 2
    out = Figures()
    with daemon(kind, work) as d:
        measure = partial(out.measure, d.pid)
        add_qcow2(d.qmp, "src", source)
        export(d.qmp, "live", "src", writable=True)
        measure("copy_live", lambda: (nbdcopy_rate(d.nbd, "live", size), size))
        measure("seq_write", lambda: mib_per_s(fio(d.nbd, "live", "write", "64k", 8, 0, half)))
        measure("rand_write", lambda: iops(fio(d.nbd, "live", "randwrite", "4k", 16, half,
                                               size - half, seconds)))
        out.values["first_byte"] = start_fleecing(d, target) * 1000
        measure("seq_write_fleece",
                lambda: mib_per_s(fio(d.nbd, "live", "write", "64k", 8, 0, half)))
        measure("copy_snapshot", lambda: (nbdcopy_rate(d.nbd, "snap", size, 4), size))
        measure("copy_snapshot_1conn", lambda: (nbdcopy_rate(d.nbd, "snap", size, 1), size))
        measure("copy_snapshot_again", lambda: (nbdcopy_rate(d.nbd, "snap", size, 4), size))
        measure("rand_read_snapshot",
                lambda: iops(fio(d.nbd, "snap", "randread", "4k", 16, 0, size, seconds)))
        measure("rand_write_fleece", lambda: iops(fio(d.nbd, "live", "randwrite", "4k", 16,
                                                      half, size - half, seconds)))
        # The random writes scattered the copied clusters of the second half, as guests do
        # while a backup runs: the snapshot reads now alternate between target and source.
        measure("read_scattered", lambda: mib_per_s(fio(d.nbd, "snap", "randread", "256k", 16,
                                                        half, size - half, seconds)))
        measure("copy_scattered", lambda: (nbdcopy_rate(d.nbd, "snap", size, 4), size))
        out.values["rss"] = vm_hwm_mib(d.pid)
    source.unlink()
    target.unlink()
    return out


@contextmanager
def qemu_nbd(image: Path, sock: Path) -> Iterator[None]:
    """A local ``qemu-nbd`` serving the raw ``image`` (export ``""``) on ``sock``."""
    with suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(image)],
                            env=PEER_ENV)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.01)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fio_until(sock: Path, export: str, rw: str, bs: str, iodepth: int, size: int,
              done: Callable[[], None], limit: int = 120) -> dict[str, Any]:
    """fio over the export (``ioengine=nbd``, looping over ``size`` bytes) from now until
    ``done()`` returns, then stopped with SIGINT (fio then reports what it did until then);
    the job's read or write section."""
    argv = ["fio", "--name=job", "--ioengine=nbd", f"--uri={nbd_uri(sock, export)}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}",
            f"--runtime={limit}", "--time_based", "--output-format=json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=PEER_ENV)
    try:
        done()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    if "{" not in out:
        sys.stderr.write(err)
        raise RuntimeError(f"fio exited {proc.returncode} without a report")
    section: dict[str, Any] = json.loads(out[out.index("{"):])["jobs"][0]
    return section["write" if "write" in rw else "read"]  # type: ignore[no-any-return]


def push(kind: str, work: Path, base: Path, size: int, verify: bool) -> Figures:
    """The push scenario on one daemon (see the module's docstring); its two figures (their
    CPU per GiB: the daemon's CPU over the push, per GiB pushed and written by the guest). With
    ``verify``, ``qemu-img compare`` checks the pushed image against ``base`` (the source's
    content when the filter went in) and raises ``CalledProcessError`` if it differs."""
    source, fleecing = work / f"{kind}-push-src.qcow2", work / f"{kind}-fleecing.qcow2"
    backup, sock = work / f"{kind}-backup.raw", work / f"{kind}-backup.sock"
    shutil.copyfile(base, source)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleecing), str(size)])
    run(["qemu-img", "create", "-q", "-f", "raw", str(backup), str(size)])
    out = Figures()
    try:
        with qemu_nbd(backup, sock), daemon(kind, work) as d:
            add_qcow2(d.qmp, "src", source)
            add_qcow2(d.qmp, "fl-img", fleecing)
            d.qmp.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                           "file": "src", "target": "fl-img"})
            d.qmp.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                           "file": "fl"})
            export(d.qmp, "guest", "fl", writable=True)
            d.qmp.execute("blockdev-add", {"driver": "nbd", "node-name": "push",
                                           "server": {"type": "unix", "path": str(sock)},
                                           "export": ""})
            finished = 0.0

            def wait_push() -> None:
                nonlocal finished
                got = d.qmp.wait_event("BLOCK_JOB_COMPLETED", 300, device="push0")
                finished = time.perf_counter()
                if "error" in got:
                    raise RuntimeError(f"{kind}: the push failed: {got['error']}")

            cpu_before = cpu_seconds(d.pid)
            start = time.perf_counter()
            d.qmp.execute("blockdev-backup", {"device": "acc", "target": "push",
                                              "sync": "full", "job-id": "push0"})
            w = fio_until(d.nbd, "guest", "write", "64k", 8, size, wait_push)
            cpu = (cpu_seconds(d.pid) - cpu_before) / ((size + w["io_bytes"]) / GiB)
            out.values["push"] = size / (finished - start) / MiB
            out.values["push_guest_write"] = w["bw_bytes"] / MiB
            out.cpu["push"] = out.cpu["push_guest_write"] = cpu
            if w["io_bytes"] == 0:
                raise RuntimeError(f"{kind}: the guest wrote nothing during the push")
            d.qmp.execute("blockdev-del", {"node-name": "push"})  # flushes, disconnects
        if verify:
            run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(base),
                 str(backup)])
            print(f"{kind}: the pushed image equals the source at the instant (qemu-img "
                  f"compare); push {finished - start:.2f} s, fio wrote for "
                  f"{w['runtime'] / 1000:.2f} s of it", file=sys.stderr)
    finally:
        for path in (source, fleecing, backup):
            with suppress(FileNotFoundError):
                path.unlink()
    return out


def rss_1t(kind: str, work: Path) -> float:
    """Peak RSS (MiB) of a daemon fleecing and exporting a sparse 1 TiB qcow2 source while a
    few MiB are read from the snapshot and written by the guest across the disk."""
    source, target = work / f"{kind}-1t.qcow2", work / f"{kind}-1t-pit0.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "1T"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(source), "-F", "qcow2",
         str(target)])
    try:
        with daemon(kind, work) as d:
            add_qcow2(d.qmp, "src", source)
            export(d.qmp, "live", "src", writable=True)
            start_fleecing(d, target)
            spots = [i * (1 << 40) // 16 for i in range(16)]
            with NBDClient.connect_unix(str(d.nbd), "live") as live, \
                    NBDClient.connect_unix(str(d.nbd), "snap") as snap:
                data = os.urandom(256 * 1024)
                for spot in spots:
                    snap.pread(spot, len(data))
                    live.pwrite(spot, data)
                    snap.pread(spot, len(data))
                live.flush()
            return vm_hwm_mib(d.pid)
    finally:
        source.unlink()
        target.unlink()


def rss_1t_figures(kind: str, work: Path) -> Figures:
    return Figures(values={"rss_1t": rss_1t(kind, work)})


# -- reporting -------------------------------------------------------------------------------
def best(figure: Figure, values: list[float]) -> float:
    if figure.key.startswith("rss"):
        return max(values)  # memory: the worst run counts
    return max(values) if figure.higher_is_better else min(values)


def ratio(figure: Figure, ours: float, theirs: float) -> float:
    """fleece / QEMU, oriented so that above 1 means fleece is better."""
    if figure.higher_is_better:
        return ours / theirs if theirs else float("inf")
    return theirs / ours if ours else float("inf")


def judge(row: dict[str, Any]) -> None:
    """Set the row's ``ratio`` (from its two values, unless derived), ``target`` and
    ``held`` from what it holds."""
    key, ours = row["figure"], row["fleece"]
    figure = next((f for f in FIGURES if f.key == key), None)
    if figure is not None and figure.target is not None and row.get("ratio") is not None:
        row["target"] = figure.target
        row["held"] = row["ratio"] >= figure.target
    elif key == "rss_1t" and ours is not None:
        row["target"] = f"< {RSS_LIMIT_MIB:.0f} MiB"
        row["held"] = ours < RSS_LIMIT_MIB
    elif key == "fleece_fleecing_over_plain" and ours is not None:
        row["target"] = 0.5
        row["held"] = ours >= 0.5
    elif key == "multi_conn" and ours is not None:
        row["target"] = "> 1.0"
        row["held"] = ours > 1.0


def table(results: dict[str, dict[str, float]],
          cpu: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The rows of one run: each figure of both daemons, its ratio, target, whether it held,
    and each daemon's CPU seconds per GiB (``fleece_cpu``, ``qemu_cpu``)."""
    rows: list[dict[str, Any]] = []
    for figure in FIGURES:
        row: dict[str, Any] = {"figure": figure.key, "label": figure.label, "unit": figure.unit}
        for kind in DAEMONS:
            row[kind] = results.get(kind, {}).get(figure.key)
        for kind in DAEMONS:
            row[f"{kind}_cpu"] = cpu.get(kind, {}).get(figure.key)
        if row["fleece"] is not None and row["qemu"] is not None:
            row["ratio"] = ratio(figure, row["fleece"], row["qemu"])
        rows.append(row)

    def derived(key: str, label: str, over: str, under: str) -> None:
        values = {kind: results[kind][over] / results[kind][under]
                  for kind in DAEMONS
                  if over in results.get(kind, {}) and under in results.get(kind, {})}
        if "fleece" in values:
            rows.append({"figure": key, "label": label, "unit": "ratio",
                         "fleece": values["fleece"], "qemu": values.get("qemu")})

    derived("fleece_fleecing_over_plain", "fleece: fleecing / no fleecing",
            "seq_write_fleece", "seq_write")
    derived("multi_conn", "multi-conn: -C 4 / -C 1 (snapshot)",
            "copy_snapshot_again", "copy_snapshot_1conn")
    for row in rows:
        judge(row)
    return rows


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of several runs merged: each value, ratio and CPU figure the median of the
    runs (a ratio is taken within each run first); ``ratios`` lists each run's ratio."""
    merged: list[dict[str, Any]] = []
    for same in zip(*runs, strict=True):
        row = {key: same[0][key] for key in ("figure", "label", "unit")}
        for key in ("fleece", "qemu", "ratio", "fleece_cpu", "qemu_cpu"):
            values = [r[key] for r in same if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["ratios"] = [r.get("ratio") for r in same]
        judge(row)
        merged.append(row)
    return merged


def show(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a text table; CPU in seconds per GiB moved; each run's ratio when there
    were several."""
    print(f"{'figure':<36}{'unit':>6}{'fleece':>11}{'qemu':>11}{'ratio':>7}"
          f"{'target':>12}{'held':>6}{'cpu s/GiB: fleece':>19}{'qemu':>6}"
          f"{'  ratio per run' if rows and 'ratios' in rows[0] else ''}")
    for row in rows:
        digits = 2 if row["unit"] == "ratio" else (1 if row["unit"] in ("ms", "MiB") else 0)
        target = row.get("target")
        target_text = f">= {target}" if isinstance(target, float) else show(target)
        ratios = row.get("ratios", [])
        runs = " / ".join(show(r, 2) for r in ratios) if any(ratios) else ""
        print(f"{row['label']:<36}{row['unit']:>6}{show(row['fleece'], digits):>11}"
              f"{show(row['qemu'], digits):>11}{show(row.get('ratio'), 2):>7}"
              f"{target_text:>12}{show(row.get('held')):>6}"
              f"{show(row.get('fleece_cpu'), 2):>19}{show(row.get('qemu_cpu'), 2):>6}"
              f"{'  ' + runs if runs else ''}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A bar chart of the ratios (fleece / QEMU, higher is better) with their targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("ratio") is not None]
    labels = [r["label"] for r in shown]
    ratios = [r["ratio"] for r in shown]
    colours = ["#999" if "held" not in r else "#2a7" if r["held"] else "#d44" for r in shown]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.5))
    y = list(range(len(shown)))
    ax.barh(y, ratios, color=colours)
    for i, r in enumerate(shown):
        ax.text(r["ratio"] + 0.02, i, f"{r['ratio']:.2f}", va="center", fontsize=8)
        target = r.get("target")
        if isinstance(target, float):
            ax.plot([target, target], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("fleece / qemu-storage-daemon (higher is better; black bar: target)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(args: argparse.Namespace, work: Path, base: Path,
            kinds: tuple[str, ...]) -> dict[str, Any]:
    """One run of the comparison: each daemon's best figures of ``--repeat`` repeats, their
    CPU per GiB (the lowest of the repeats) and the rows."""
    cpu_samples: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    value_samples: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    started = time.monotonic()
    steps: list[tuple[str, Callable[[], Figures]]] = []
    for _ in range(args.repeat):  # interleaved, so drift hits both alike
        for kind in kinds:
            steps.append((kind, partial(scenario, kind, work, base, args.size,
                                        args.fio_seconds)))
    if not args.no_push:
        for repeat in range(args.repeat):
            for kind in kinds:
                steps.append((kind, partial(push, kind, work, base, args.size,
                                            verify=repeat == 0)))
    if not args.no_rss_1t:
        for kind in kinds:
            steps.append((kind, partial(rss_1t_figures, kind, work)))
    for kind, step in steps:
        got = step()
        for key, value in got.values.items():
            value_samples[kind].setdefault(key, []).append(value)
        for key, value in got.cpu.items():
            cpu_samples[kind].setdefault(key, []).append(value)
        print(f"[{time.monotonic() - started:6.1f} s] {kind} done", file=sys.stderr)
    results = {kind: {key: best(next(f for f in FIGURES if f.key == key), values)
                      for key, values in figures.items()}
               for kind, figures in value_samples.items()}
    cpu = {kind: {key: min(values) for key, values in figures.items()}
           for kind, figures in cpu_samples.items()}
    return {"results": results, "cpu_s_per_gib": cpu, "rows": table(results, cpu)}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"),
                        help="the source disk's size (default 1G)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="repeats per daemon within a run (best counts)")
    parser.add_argument("--runs", type=int, default=1,
                        help="whole runs; with more than one, the median of the runs counts")
    parser.add_argument("--fio-seconds", type=int, default=3,
                        help="length of each time-based fio run")
    parser.add_argument("--only", choices=DAEMONS, help="run one daemon only")
    parser.add_argument("--no-rss-1t", action="store_true", help="skip the 1 TiB RSS check")
    parser.add_argument("--no-push", action="store_true", help="skip the push scenario")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart of the ratios here")
    parser.add_argument("--workdir", type=Path, help="where images go (default: a temp dir)")
    args = parser.parse_args()
    for tool in ("nbdcopy", "fio", "qemu-storage-daemon", "qemu-img", "qemu-nbd"):
        if shutil.which(tool, path=PEER_ENV["PATH"]) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    kinds = (args.only,) if args.only else DAEMONS
    with tempfile.TemporaryDirectory(prefix="fleece-compare-", dir=args.workdir) as tmp:
        work = Path(tmp)
        base = work / "base.qcow2"
        make_random_qcow2(base, args.size, work)
        runs = []
        for number in range(args.runs):
            if args.runs > 1:
                print(f"run {number + 1} of {args.runs}", file=sys.stderr)
            runs.append(compare(args, work, base, kinds))
    rows = runs[0]["rows"] if args.runs == 1 else median_rows([r["rows"] for r in runs])
    if args.json:
        report: dict[str, Any] = {"size": args.size, "repeat": args.repeat, "runs": args.runs,
                                  "fio_seconds": args.fio_seconds}
        if args.runs == 1:
            report.update(runs[0])
        else:
            report.update(rows=rows, per_run=runs)
        print(json.dumps(report, indent=2))
    else:
        print_table(rows)
    if args.plot is not None:
        how = f"best of {args.repeat}"
        if args.runs > 1:
            how = f"median of {args.runs} runs" + (f" ({how})" if args.repeat > 1 else "")
        plot(rows, args.plot, f"fleece vs qemu-storage-daemon, {args.size // MiB} MiB qcow2, "
                              f"{how}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
