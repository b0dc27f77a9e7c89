"""The native NBD data plane against the Python path: the same request streams, the same answers.

Issue #14 keeps the Python path as the oracle of the native data plane (``fleece/_fast/
dataplane.pyx``, switched by :mod:`fleece.nbd.dataplane`). Hypothesis draws one stream of
operations and it runs twice, each time on a fresh :class:`~fleece.storage.Storage` over fresh
images made from the same seed: once as the user gets it (the native plane, unless
``FLEECE_NO_EXTENSIONS`` turns it off) and once with ``FLEECE_NO_DATAPLANE=1`` (the Python path).

What a stream does, on a 4 MiB source (qcow2 with 64 KiB or 16 KiB clusters, or raw; opened with
``discard=unmap`` so that trims drop data) plugged as device ``virtio0`` (``share-rw``) and exported
writable as ``live``:

- NBD requests on four connections: ``live`` and ``snap`` (the fleecing snapshot, read-only),
  each negotiated with structured replies and ``base:allocation`` and with simple replies only.
  Reads (with and without ``DF``; pipelined batches too, some with a write among them to other
  clusters, so that Python's and the plane's replies interleave), writes (``FUA`` or not), zeroes
  (``NO_HOLE``, ``FAST_ZERO``), trims, flushes and block status (``REQ_ONE`` or not), aligned,
  unaligned and past the end, and writes to the read-only export; connections dropped and made
  again (the plane is chosen at each new connection).
- Guest I/O through ``Storage.device("virtio0")``: writes, zeroes, discards, reads, flushes.
- Fleecing starting and ending: ``drive-backup sync=none`` (the backing scheme, a new qcow2
  target), ``blockdev-backup sync=none`` into a pre-created qcow2 overlay of the source, or the
  filter scheme (``copy-before-write`` and ``snapshot-access``), exported as ``snap``; the job
  cancelled while the export stays; the session ended (export removed, job cancelled, nodes
  deleted). The filter scheme's filter stays in the graph after its session (fleece has no
  ``blockdev-reopen`` to take it out under a device), so later sessions stack on it.

What is compared, request by request: the error (the NBD error value, or the errno of a device
call; never the message), the bytes of a read (a structured read reassembled from its chunks,
since chunking may differ), and a block status as per-byte status over the range both replies
cover (merging adjacent extents: their split may differ). Then, after ``Storage.close()``, every
image file of the run (source and fleecing targets), byte for byte. Each snapshot read made while
its job runs is also checked against the device's content when the session started (the
point-in-time invariant, on both paths).

The native run must really be native: when :mod:`fleece.nbd.dataplane` says the plane is
enabled, ``native_requests()`` must grow during the native run and stay put during the Python
run, and with the extensions built and not disabled the plane must be enabled. Until that module
lands the helper falls back to running the Python path twice (see :func:`_dataplane`).

Run on the compiled extensions and with ``FLEECE_NO_EXTENSIONS=1`` (then both runs are Python:
still a determinism check of the stream). An example takes about 0.15 s on 2 cores; the default
60 examples keep a pass near 10 s (``make test`` runs it twice and must stay within 15
minutes). ``FLEECE_DP_EXAMPLES=1000`` runs more (a search for bugs, not for ``make test``);
``--hypothesis-show-statistics`` shows how many requests the plane served.
A reply lost by the server fails the example after ``REPLY_TIMEOUT`` instead of hanging the run.
"""

from __future__ import annotations

import importlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from fleece._impl import extensions_disabled
from fleece.block.qcow2 import create
from fleece.nbd.client import NBDClient, Reply
from fleece.nbd.constants import BASE_ALLOCATION, Cmd, CmdFlag
from fleece.storage import Storage
from tests.events import EventLog

pytestmark = pytest.mark.timeout(300)

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB
#: the NBD connections a stream uses: (export, structured replies)
CONNECTIONS = {
    "live": ("live", True),
    "live-simple": ("live", False),
    "snap": ("snap", True),
    "snap-simple": ("snap", False),
}
#: the source images a stream may run on: (format, cluster size)
SOURCES = (("qcow2", 64 * KiB), ("qcow2", 16 * KiB), ("raw", 0))
SCHEMES = ("drive-backup", "blockdev-backup", "filter")
#: seconds a client waits for any reply (every request here takes milliseconds)
REPLY_TIMEOUT = 3.0


# -- the operations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NbdRead:
    conn: str
    offset: int
    length: int
    df: bool = False


@dataclass(frozen=True)
class NbdReads:
    """Reads submitted together on one connection, then collected last first; with ``write``
    ``(offset, length, tag)``, a write goes out among them (the reads of the 64 KiB clusters
    it touches are left out, so that the answers do not depend on the order of execution)."""

    conn: str
    ranges: tuple[tuple[int, int], ...]
    write: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class NbdWrite:
    conn: str
    offset: int
    length: int
    tag: int
    fua: bool = False


@dataclass(frozen=True)
class NbdZero:
    conn: str
    offset: int
    length: int
    no_hole: bool = False
    fast: bool = False


@dataclass(frozen=True)
class NbdTrim:
    conn: str
    offset: int
    length: int


@dataclass(frozen=True)
class NbdFlush:
    conn: str


@dataclass(frozen=True)
class NbdStatus:
    """Block status of ``length`` bytes from ``offset``; length 0 asks to the disk's end."""

    conn: str
    offset: int
    length: int
    one: bool = False


@dataclass(frozen=True)
class Reconnect:
    conn: str


@dataclass(frozen=True)
class DevWrite:
    offset: int
    length: int
    tag: int


@dataclass(frozen=True)
class DevZero:
    offset: int
    length: int
    may_unmap: bool


@dataclass(frozen=True)
class DevDiscard:
    offset: int
    length: int


@dataclass(frozen=True)
class DevRead:
    offset: int
    length: int


@dataclass(frozen=True)
class DevFlush:
    pass


@dataclass(frozen=True)
class FleeceStart:
    scheme: str


@dataclass(frozen=True)
class FleeceCancelJob:
    """Cancel the fleecing job but keep its export (the snapshot stops being kept)."""


@dataclass(frozen=True)
class FleeceEnd:
    """Close the snapshot's clients, remove its export, cancel its job, delete its nodes."""


Op = (NbdRead | NbdReads | NbdWrite | NbdZero | NbdTrim | NbdFlush | NbdStatus | Reconnect
      | DevWrite | DevZero | DevDiscard | DevRead | DevFlush | FleeceStart | FleeceCancelJob
      | FleeceEnd)


@dataclass(frozen=True)
class Stream:
    source: tuple[str, int]
    seed: int
    ops: tuple[Op, ...]


def _offsets() -> st.SearchStrategy[int]:
    """Offsets aligned to 4 KiB or to 64 KiB, anywhere, and near the end (a request from
    there often runs past it: an error both paths must give alike)."""
    aligned = st.integers(0, SIZE // (4 * KiB) - 1).map(lambda n: n * 4 * KiB)
    return st.one_of(
        aligned,
        aligned,
        st.integers(0, SIZE // (64 * KiB) - 1).map(lambda n: n * 64 * KiB),
        st.integers(0, SIZE - 1),
        st.integers(SIZE - 96 * KiB, SIZE + 4 * KiB),
    )


def _lengths() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([1, 512, 4 * KiB, 60 * KiB, 64 * KiB, 128 * KiB, 192 * KiB, 256 * KiB,
                         512 * KiB]),
        st.integers(1, 320 * KiB),
    )


_conns = st.sampled_from(sorted(CONNECTIONS))
_tags = st.integers(0, 255)

_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(NbdRead, _conns, _offsets(), _lengths(), st.booleans()),
    st.builds(NbdReads, _conns, st.lists(st.tuples(_offsets(), _lengths()), min_size=2,
                                         max_size=6).map(tuple),
              st.none() | st.tuples(_offsets(), _lengths(), _tags)),
    st.builds(NbdWrite, _conns, _offsets(), _lengths(), _tags, st.booleans()),
    st.builds(NbdZero, _conns, _offsets(), _lengths(), st.booleans(),
              st.sampled_from([False, False, False, True])),
    st.builds(NbdTrim, _conns, _offsets(), _lengths()),
    st.builds(NbdFlush, _conns),
    st.builds(NbdStatus, _conns, _offsets(), st.one_of(_lengths(), st.just(0)), st.booleans()),
    st.builds(Reconnect, _conns),
    st.builds(DevWrite, _offsets(), _lengths(), _tags),
    st.builds(DevZero, _offsets(), _lengths(), st.booleans()),
    st.builds(DevDiscard, _offsets(), _lengths()),
    st.builds(DevRead, _offsets(), _lengths()),
    st.just(DevFlush()),
    st.builds(FleeceStart, st.sampled_from(SCHEMES)),
    st.just(FleeceCancelJob()),
    st.just(FleeceEnd()),
)

streams = st.builds(
    Stream,
    st.sampled_from(SOURCES),
    st.integers(0, 2**32 - 1),
    # fleecing starts early in most streams, so that most requests meet it
    st.tuples(st.sampled_from(SCHEMES).map(FleeceStart), st.lists(_ops, min_size=5, max_size=60))
    .map(lambda t: (t[0], *t[1])) | st.lists(_ops, min_size=5, max_size=60).map(tuple),
)


def payload(tag: int, length: int) -> bytes:
    """The data of a write tagged ``tag``: zeroes for tag 0 (a write that reads as a hole),
    else bytes no other tag writes."""
    if tag == 0:
        return bytes(length)
    return random.Random(tag * 7919 + length).randbytes(length)


# -- the outcomes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    """A block status reply as runs ``(start, end, flags)``, adjacent equal flags merged."""

    error: int
    runs: tuple[tuple[int, int, int], ...]

    @property
    def covered(self) -> int:
        return self.runs[-1][1] if self.runs else 0

    def clipped(self, end: int) -> tuple[tuple[int, int, int], ...]:
        return tuple((s, min(e, end), f) for s, e, f in self.runs if s < end)


Outcome = tuple[Any, ...] | Status


def _status(reply: Reply, offset: int) -> Status:
    runs: list[tuple[int, int, int]] = []
    at = offset
    for length, flags in reply.extents.get(BASE_ALLOCATION, []):
        if runs and runs[-1][2] == flags:
            runs[-1] = (runs[-1][0], at + length, flags)
        else:
            runs.append((at, at + length, flags))
        at += length
    return Status(reply.error, tuple(runs))


def _same(a: Outcome, b: Outcome) -> bool:
    if isinstance(a, Status) and isinstance(b, Status):
        if a.error != b.error:
            return False
        if a.error:
            return True
        common = min(a.covered, b.covered)
        return common > 0 and a.clipped(common) == b.clipped(common)
    return a == b


def _show(outcome: Outcome) -> str:
    if isinstance(outcome, Status):
        return repr(outcome)
    return repr(tuple(
        f"<{len(x)} bytes, first {bytes(x[:16]).hex()}>" if isinstance(x, bytes) else x
        for x in outcome
    ))


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"lengths differ: {len(got)} != {len(want)}"
    bad = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
    if not len(bad):
        return "equal"
    at = int(bad[0])
    return f"{len(bad)} bytes differ, the first at {at:#x}: {got[at]:#04x} != {want[at]:#04x}"


# -- the data plane switch -------------------------------------------------------------------------
def _dataplane() -> ModuleType | None:
    """:mod:`fleece.nbd.dataplane`, or None while it does not exist yet.

    Until the native data plane lands the test runs the Python path twice (a determinism check
    of the stream); once the module exists, the native-plane assertions below are made and
    never skipped. Any other import failure is an error.
    """
    try:
        return importlib.import_module("fleece.nbd.dataplane")
    except ModuleNotFoundError as exc:
        if exc.name != "fleece.nbd.dataplane":
            raise
        return None


def _native_requests(plane: ModuleType | None) -> int:
    return int(plane.native_requests()) if plane is not None else 0


# -- one run of a stream -------------------------------------------------------------------------
@dataclass
class Session:
    scheme: str
    number: int
    job: str | None
    nodes: list[str]  # monitor-owned nodes to delete at the end, in order
    point_in_time: bytes
    job_running: bool = True


@dataclass
class Run:
    """One run of a stream in ``folder``: the Storage, its clients, the outcomes in order."""

    folder: Path
    stream: Stream
    storage: Storage = field(init=False)
    log: EventLog = field(init=False)
    sock: str = field(init=False)
    clients: dict[str, NBDClient] = field(default_factory=dict)
    session: Session | None = None
    sessions: int = 0
    filters: int = 0
    outcomes: list[tuple[Op | str, Outcome]] = field(default_factory=list)

    def start(self) -> None:
        fmt, cluster = self.stream.source
        src = str(self.folder / f"src.{fmt}")
        if fmt == "qcow2":
            create(src, SIZE, cluster_size=cluster)
            options: dict[str, Any] = {"driver": "qcow2", "node-name": "src", "discard": "unmap",
                                       "file": {"driver": "file", "filename": src,
                                                "discard": "unmap"}}
        else:
            with open(src, "wb") as f:
                f.truncate(SIZE)
            options = {"driver": "raw", "node-name": "src",
                       "file": {"driver": "file", "filename": src, "discard": "unmap"}}
        self.storage = Storage()
        self.log = EventLog()
        self.storage.subscribe(self.log)
        self.storage.execute("blockdev-add", options)
        self.storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                            "drive": "src", "share-rw": True})
        device = self.storage.device("virtio0")
        rng = random.Random(self.stream.seed)
        device.pwrite(0, rng.randbytes(MiB))  # the first MiB is data (see the opening reads)
        for cluster_no in range(MiB // (64 * KiB), SIZE // (64 * KiB)):  # about half hold data
            kind = rng.random()
            if kind < 0.45:
                device.pwrite(cluster_no * 64 * KiB, rng.randbytes(64 * KiB))
            elif kind < 0.55:
                device.pwrite(cluster_no * 64 * KiB + rng.randrange(60 * KiB),
                              rng.randbytes(4 * KiB))
            elif kind < 0.6:
                device.pwrite_zeroes(cluster_no * 64 * KiB, 64 * KiB)
        device.flush()
        self.sock = str(self.folder / "nbd.sock")
        self.storage.execute("nbd-server-start",
                             {"addr": {"type": "unix", "data": {"path": self.sock}}})
        self.storage.execute("nbd-server-add", {"device": "src", "name": "live",
                                                "writable": True})
        self.connect("live")
        self.connect("live-simple")
        # The opening reads: the whole disk on both connections, before anything else. The
        # first MiB is allocated data on a plain node: the native plane, when on, serves some
        # of those reads itself whatever the stream does next.
        for conn in ("live", "live-simple"):
            client = self.clients[conn]
            for offset in range(0, SIZE, 512 * KiB):
                reply = client.wait(client.submit(Cmd.READ, offset, 512 * KiB))
                self.record(f"opening read {conn}", ("read", reply.error, reply.data))

    def connect(self, conn: str) -> None:
        export, structured = CONNECTIONS[conn]
        client = NBDClient.connect_unix(self.sock, export, structured=structured)
        client.sock.settimeout(REPLY_TIMEOUT)  # a lost reply fails the example, not the run
        self.clients[conn] = client

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        self.storage.close()

    def record(self, op: Op | str, outcome: Outcome) -> None:
        self.outcomes.append((op, outcome))

    # -- NBD ---------------------------------------------------------------------------------
    def _read_outcome(self, conn: str, offset: int, length: int, reply: Reply) -> Outcome:
        data = reply.data if not reply.error else None
        session = self.session
        if (data is not None and conn.startswith("snap") and session is not None
                and session.job_running):
            want = session.point_in_time[offset:offset + length]
            assert data == want, (
                f"snapshot read {offset:#x}+{length:#x} on {conn} is not the point in time: "
                f"{first_difference(data, want)}"
            )
        return ("read", reply.error, data)

    def nbd(self, op: Op) -> None:
        conn: str = getattr(op, "conn")  # noqa: B009 (every NBD op has one)
        client = self.clients.get(conn)
        if client is None:
            self.record(op, ("no connection",))
            return
        if isinstance(op, NbdRead):
            reply = client.wait(client.submit(Cmd.READ, op.offset, op.length,
                                              CmdFlag.DF if op.df else CmdFlag(0)))
            self.record(op, self._read_outcome(conn, op.offset, op.length, reply))
        elif isinstance(op, NbdReads):
            ranges = list(op.ranges)
            write_cookie = None
            if op.write is not None:
                w_offset, w_length, tag = op.write
                start = w_offset // (64 * KiB) * 64 * KiB
                end = -(-(w_offset + w_length) // (64 * KiB)) * 64 * KiB
                ranges = [(o, n) for o, n in ranges if o + n <= start or o >= end]
            cookies = []
            for i, (offset, length) in enumerate(ranges):
                if op.write is not None and i == len(ranges) // 2:
                    write_cookie = client.submit(Cmd.WRITE, w_offset,
                                                 payload=payload(tag, w_length))
                cookies.append(client.submit(Cmd.READ, offset, length))
            if op.write is not None and write_cookie is None:
                write_cookie = client.submit(Cmd.WRITE, w_offset, payload=payload(tag, w_length))
            replies = {cookie: client.wait(cookie) for cookie in reversed(cookies)}
            for (offset, length), cookie in zip(ranges, cookies, strict=True):
                self.record(op, self._read_outcome(conn, offset, length, replies[cookie]))
            if write_cookie is not None:
                self.record(op, ("write", client.wait(write_cookie).error))
        elif isinstance(op, NbdWrite):
            reply = client.wait(client.submit(Cmd.WRITE, op.offset,
                                              flags=CmdFlag.FUA if op.fua else CmdFlag(0),
                                              payload=payload(op.tag, op.length)))
            self.record(op, ("write", reply.error))
        elif isinstance(op, NbdZero):
            flags = CmdFlag(0)
            if op.no_hole:
                flags |= CmdFlag.NO_HOLE
            if op.fast:
                flags |= CmdFlag.FAST_ZERO
            reply = client.wait(client.submit(Cmd.WRITE_ZEROES, op.offset, op.length, flags))
            self.record(op, ("zero", reply.error))
        elif isinstance(op, NbdTrim):
            reply = client.wait(client.submit(Cmd.TRIM, op.offset, op.length))
            self.record(op, ("trim", reply.error))
        elif isinstance(op, NbdFlush):
            reply = client.wait(client.submit(Cmd.FLUSH))
            self.record(op, ("flush", reply.error))
        elif isinstance(op, NbdStatus):
            flags = CmdFlag.REQ_ONE if op.one else CmdFlag(0)
            length = op.length or max(SIZE - op.offset, 1)
            reply = client.wait(client.submit(Cmd.BLOCK_STATUS, op.offset, length, flags))
            status = _status(reply, op.offset)
            if not reply.error:
                assert status.runs, f"{op}: a block status reply without extents"
                if op.one:
                    assert len(reply.extents[BASE_ALLOCATION]) == 1, f"{op}: REQ_ONE: {status}"
            self.record(op, status)

    # -- the device ----------------------------------------------------------------------------
    def dev(self, op: Op) -> None:
        device = self.storage.device("virtio0")
        try:
            if isinstance(op, DevWrite):
                device.pwrite(op.offset, payload(op.tag, op.length))
            elif isinstance(op, DevZero):
                device.pwrite_zeroes(op.offset, op.length, op.may_unmap)
            elif isinstance(op, DevDiscard):
                device.pdiscard(op.offset, op.length)
            elif isinstance(op, DevRead):
                self.record(op, ("dev", 0, device.pread(op.offset, op.length)))
                return
            elif isinstance(op, DevFlush):
                device.flush()
        except OSError as exc:
            self.record(op, ("dev", exc.errno))
            return
        self.record(op, ("dev", 0))

    # -- fleecing --------------------------------------------------------------------------------
    def fleece_start(self, scheme: str) -> None:
        if self.session is not None:
            self.record(FleeceStart(scheme), ("already fleecing",))
            return
        n = self.sessions
        self.sessions += 1
        device = self.storage.device("virtio0")
        point_in_time = device.pread(0, SIZE)
        below = device.node.name  # src, or a filter scheme's filter left from a past session
        job: str | None = None
        nodes: list[str] = []
        if scheme == "drive-backup":
            job, snapshot = f"job{n}", f"pit{n}"
            self.storage.execute("drive-backup", {
                "device": "virtio0", "job-id": job, "sync": "none", "format": "qcow2",
                "target": str(self.folder / f"pit{n}.qcow2"), "target-id": snapshot})
        elif scheme == "blockdev-backup":
            job, snapshot = f"job{n}", f"tgt{n}"
            fmt, _ = self.stream.source
            path = str(self.folder / f"tgt{n}.qcow2")
            create(path, SIZE, backing_file=str(self.folder / f"src.{fmt}"), backing_format=fmt)
            self.storage.execute("blockdev-add", {
                "driver": "qcow2", "node-name": snapshot, "backing": below,
                "file": {"driver": "file", "filename": path}})
            self.storage.execute("blockdev-backup", {"device": "virtio0", "target": snapshot,
                                                     "sync": "none", "job-id": job})
            nodes = [snapshot]
        else:
            path = str(self.folder / f"fltgt{n}.qcow2")
            create(path, SIZE)
            self.storage.execute("blockdev-add", {
                "driver": "qcow2", "node-name": f"fltgt{n}",
                "file": {"driver": "file", "filename": path}})
            self.storage.execute("blockdev-add", {"driver": "copy-before-write",
                                                  "node-name": f"fl{n}", "file": below,
                                                  "target": f"fltgt{n}"})
            snapshot = f"acc{n}"
            self.storage.execute("blockdev-add", {"driver": "snapshot-access",
                                                  "node-name": snapshot, "file": f"fl{n}"})
            nodes = [snapshot]
        self.storage.execute("nbd-server-add", {"device": snapshot, "name": "snap"})
        self.session = Session(scheme, n, job, nodes, point_in_time)
        self.connect("snap")
        self.connect("snap-simple")
        self.record(FleeceStart(scheme), ("started", below))

    def _cancel(self, session: Session) -> None:
        if session.job is not None and session.job_running:
            self.storage.execute("block-job-cancel", {"device": session.job})
            self.log.wait("BLOCK_JOB_CANCELLED", device=session.job)
            session.job_running = False

    def fleece_cancel_job(self) -> None:
        session = self.session
        if session is None or session.job is None or not session.job_running:
            self.record(FleeceCancelJob(), ("no job",))
            return
        self._cancel(session)
        self.record(FleeceCancelJob(), ("cancelled", session.job))

    def fleece_end(self) -> None:
        session = self.session
        if session is None:
            self.record(FleeceEnd(), ("not fleecing",))
            return
        for conn in ("snap", "snap-simple"):
            client = self.clients.pop(conn, None)
            if client is not None:
                client.close()
        self.storage.execute("nbd-server-remove", {"name": "snap", "mode": "hard"})
        self._cancel(session)
        for node in session.nodes:
            self.storage.execute("blockdev-del", {"node-name": node})
        self.session = None
        self.record(FleeceEnd(), ("ended", session.scheme))

    # -- the stream ----------------------------------------------------------------------------
    def play(self) -> None:
        for op in self.stream.ops:
            if isinstance(op, Reconnect):
                client = self.clients.pop(op.conn, None)
                if client is not None:
                    client.close()
                if op.conn.startswith("live") or self.session is not None:
                    self.connect(op.conn)
                self.record(op, ("reconnected", op.conn in self.clients))
            elif isinstance(op, NbdRead | NbdReads | NbdWrite | NbdZero | NbdTrim | NbdFlush
                            | NbdStatus):
                self.nbd(op)
            elif isinstance(op, DevWrite | DevZero | DevDiscard | DevRead | DevFlush):
                self.dev(op)
            elif isinstance(op, FleeceStart):
                self.fleece_start(op.scheme)
            elif isinstance(op, FleeceCancelJob):
                self.fleece_cancel_job()
            else:
                self.fleece_end()
        # the end: the whole disk read over NBD (native when the plane is on), then the device
        client = self.clients["live"]
        for offset in range(0, SIZE, 512 * KiB):
            reply = client.wait(client.submit(Cmd.READ, offset, 512 * KiB, CmdFlag.DF))
            self.record("final read", ("read", reply.error, reply.data))
        self.record("final device", ("dev", 0, self.storage.device("virtio0").pread(0, SIZE)))


def play(stream: Stream, folder: Path) -> tuple[list[tuple[Op | str, Outcome]], dict[str, bytes]]:
    """Run ``stream`` in ``folder`` (made for the run, removed after it): its outcomes, and
    every file it left. Both runs use the same folder, so that the backing file names written
    into qcow2 headers are the same too."""
    folder.mkdir()
    try:
        run = Run(folder, stream)
        run.start()
        try:
            run.play()
        finally:
            run.close()
        images = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    finally:
        shutil.rmtree(folder)
    return run.outcomes, images


@pytest.fixture
def python_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The environment switch: the tests set and clear ``FLEECE_NO_DATAPLANE`` through it."""
    monkeypatch.delenv("FLEECE_NO_DATAPLANE", raising=False)
    yield monkeypatch


@settings(max_examples=int(os.environ.get("FLEECE_DP_EXAMPLES", "60")), deadline=None,
          phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),  # no "explain"
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(stream=streams)
def test_native_and_python_paths_answer_alike(stream: Stream,
                                              python_path: pytest.MonkeyPatch) -> None:
    plane = _dataplane()
    with tempfile.TemporaryDirectory(prefix="fleece-dp-") as tmp:
        # The native run: as the user gets it (native unless FLEECE_NO_EXTENSIONS).
        python_path.delenv("FLEECE_NO_DATAPLANE", raising=False)
        native_on = bool(plane.enabled()) if plane is not None else False
        if plane is not None:
            # With the extensions built and wanted the plane must be on (test_build fails
            # when they did not build; here the switch itself is checked).
            assert native_on == (not extensions_disabled()), (
                f"fleece.nbd.dataplane.enabled() is {native_on} with FLEECE_NO_EXTENSIONS="
                f"{os.environ.get('FLEECE_NO_EXTENSIONS')!r} and FLEECE_NO_DATAPLANE unset"
            )
        before = _native_requests(plane)
        native, native_images = play(stream, Path(tmp) / "run")
        served_natively = _native_requests(plane) - before
        event("native plane served", "none" if served_natively == 0 else
              "the opening reads at most" if served_natively <= 16 else "more than 16")

        # The Python run: the oracle.
        python_path.setenv("FLEECE_NO_DATAPLANE", "1")
        if plane is not None:
            assert not plane.enabled(), "FLEECE_NO_DATAPLANE=1 must turn the native plane off"
        before = _native_requests(plane)
        oracle, oracle_images = play(stream, Path(tmp) / "run")
        assert _native_requests(plane) == before, (
            "the native plane served requests with FLEECE_NO_DATAPLANE=1"
        )

    assert len(native) == len(oracle), (len(native), len(oracle))
    for i, ((op, got), (_, want)) in enumerate(zip(native, oracle, strict=True)):
        assert _same(got, want), (
            f"step {i} {op}: native {_show(got)} != python {_show(want)}"
            + (f" ({first_difference(got[2], want[2])})"
               if isinstance(got, tuple) and isinstance(want, tuple) and len(got) == 3
               and isinstance(got[2], bytes) and isinstance(want[2], bytes) else "")
        )
    assert sorted(native_images) == sorted(oracle_images)
    for name, data in native_images.items():
        assert data == oracle_images[name], (
            f"image {name}: native != python: {first_difference(data, oracle_images[name])}"
        )
    if native_on:
        # the opening reads alone are 16 requests the plane can serve
        assert served_natively > 0, "the native plane is enabled but served no request"
    # else: fleece.nbd.dataplane does not exist yet (both runs were the Python path), or the
    # extensions are disabled (FLEECE_NO_EXTENSIONS=1): nothing native to count.
