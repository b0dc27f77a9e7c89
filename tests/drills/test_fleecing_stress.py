"""Stress drill for issue 13: the snapshot is the point in time under load, in every sync mode.

Each scenario runs in one process, through the public interfaces only (``Storage.execute``,
``Storage.device`` and fleece's NBD client):

- **The disk.** ``base.qcow2 <- top.qcow2`` (64 MiB, 256 MiB with ``--long-drills``); base holds
  data in half its clusters, top holds data over base data and over base holes, zero clusters
  over base data, and unallocated clusters over both, so reads see data, zero clusters and
  holes. ``top`` is opened with ``discard=unmap`` (discards really drop clusters), attached as
  device ``virtio0`` (``share-rw``) and exported writable over NBD as ``live``.
- **The guest.** 16 threads (12 through the device, 4 through their own NBD connection to
  ``live``) write, zero (with and without unmap) and discard random ranges, aligned and not,
  512 B to 1 MiB, before, during and after the command that takes the snapshot, through the
  job's cancel or completion, and after it. They pause a little between requests (so that first
  touches of clusters go on through the run), except from 0.1 s before the snapshot command
  until it returns and around the job's end, when they write flat out. The GIL switch interval
  is 0.1 ms while a scenario runs, for more interleavings. 0 guest requests may fail.
- **The instant** is when the snapshot command returns. It is made exact by a model of the disk
  and a logical clock: a guest thread reserves its range (no two requests in flight overlap, as a
  real guest's never do), takes a tick ``start``, does the I/O, then, under the model's lock,
  takes a tick ``end`` and applies what the range now holds (the data written; zeroes; for a
  discard, or a request that failed, what the range reads back while still reserved). The test
  takes tick ``T0`` and a copy of the model under that lock just before calling the command,
  and ``T1`` just after it returns. A request with ``end < T0`` is in the snapshot; one with
  ``start > T1`` is not; one that overlaps ``[T0, T1]`` is *ambiguous*. While the command runs a
  finished ambiguous request keeps its range reserved, so ambiguous requests never overlap and
  each one's pre-state is the copy at ``T0``: over its range the snapshot must hold either its
  pre-state or its post-state, whole. The first read that tells them apart fixes the answer for
  the rest of the scenario (a later read that disagrees counts as differing bytes), and at the
  end the answers must be explained by one instant: no request is "after" while one that ended
  before it started is "before". Right after the command returns (the snapshot exported at
  once), the ranges of the requests still in flight are read: a request that slipped past the
  snapshot's start and lands later makes these reads disagree with the later ones.
- **The checks.** 4 readers connect to the snapshot export. Each reads its quarter in 1 MiB
  structured reads (the server sends holes as ``OFFSET_HOLE`` chunks from 128 KiB on) and walks
  it with ``NBD_CMD_BLOCK_STATUS`` (``base:allocation``), then (snapshots only) keeps issuing
  random reads of 4 KiB to 2 MiB and block status queries, pipelined, while the guest writes.
  Every byte read must be the instant's; every extent reported ``ZERO`` must be all zeroes at
  the instant (a ``HOLE`` without ``ZERO`` promises nothing and is not checked).

The scenarios and what the snapshot or target must be:

- ``none``: ``drive-backup sync=none target-id=pit0`` (the backing scheme) started under load,
  ``pit0`` exported read-only and read during the run, then ``block-job-cancel`` under load.
- ``filter``: ``blockdev-add copy-before-write`` over ``top`` (raw target) under load, then
  ``snapshot-access`` exported and read; the export and the access node are removed under load.
- ``full``: ``drive-backup sync=full`` to completion under load; the finished target, exported
  and read over NBD while the guest goes on, is the instant.
- ``top``: ``drive-backup sync=top``: the target's backing is base; read through it the finished
  target is the instant (its own layer holds what top held at the instant: top's data and
  top's zero clusters over base data, which would otherwise show base through).
- ``incremental``: ``block-dirty-bitmap-add b0`` on ``top`` after the disk is built, before the
  guest starts; ``blockdev-backup sync=incremental bitmap=b0`` into a fresh qcow2 without
  backing. The exact expectation is what a restore needs: a cluster the target holds is the
  instant's; a cluster it lacks (reads zeroes) must be one whose content at the instant equals
  its content when the bitmap was added (it is taken from the previous full backup). Every
  cluster the guest changed before the instant is therefore in the target with its instant data.
- ``full-cancel``, ``top-cancel``, ``bitmap-cancel`` (``sync=bitmap bitmap-mode=on-success``):
  the same backups at a limited speed, cancelled under load mid-run; the partial target's own
  layer (opened afterwards without backing) holds, per cluster, zeroes or the instant's data.

A scenario fails with one message listing every problem: bytes differing from the instant,
extents misreported, guest requests failed, instant inconsistencies, request errors, jobs that
did not end. Each prints a ``DRILL`` line with the counts and the request totals.
"""

from __future__ import annotations

import bisect
import itertools
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pytest

from fleece.block.qcow2 import create
from fleece.events import Event
from fleece.nbd.client import NBDClient
from fleece.nbd.constants import AllocationFlag, Cmd, CmdFlag
from fleece.storage import Storage
from tests.drills.support import KiB, MiB, pattern, scale

Bytes = npt.NDArray[np.uint8]

SIZE = scale(64, 256) * MiB
CLUSTER = 64 * KiB
DEVICE_GUESTS = 12
NBD_GUESTS = 4
READERS = 4
WARMUP = 0.3  # seconds the guest writes before the snapshot command
PAUSE = 0.04  # a guest thread's mean pause between requests (so that the run does not copy
#               the whole disk at once: first touches of clusters go on through the run)
BURST = 0.1  # seconds of writing without pause before and around the command and the job's end
RUN = float(scale(3, 20))  # seconds the readers keep checking a live snapshot
AFTER = 0.3  # seconds the guest goes on after the job's end
WAIT = float(scale(30, 120))  # the longest a job's end, a settle or a join may take
CANCEL_SPEED = SIZE // 16  # bytes/s: a backup that is cancelled is still running
REPORT = 12  # problems quoted in the failure message
SWITCH_INTERVAL = 1e-4  # seconds between GIL hand-overs while a scenario runs (default 5e-3)

pytestmark = pytest.mark.timeout(scale(90, 900))


def _zeroes(length: int) -> Bytes:
    return np.zeros(length, dtype=np.uint8)


def _view(data: bytes | bytearray) -> Bytes:
    return np.frombuffer(data, dtype=np.uint8)


# -- the guest's model of its disk ----------------------------------------------------------------
@dataclass(eq=False)
class Op:
    """One guest request: the range, what it holds afterwards (None: zeroes), its clock ticks."""

    kind: str
    offset: int
    length: int
    start: int
    guest: str
    post: bytes | None = None
    end: int = -1
    failed: bool = False

    @property
    def stop(self) -> int:
        return self.offset + self.length

    def describe(self) -> str:
        return (f"{self.guest} {self.kind} {self.offset:#x}+{self.length:#x} "
                f"(ticks {self.start}..{self.end})")


class Model:
    """What the disk holds, updated as guest requests finish, and the logical clock.

    ``reserve`` and ``finish`` take the lock; ``open_window`` / ``close_window`` bracket the
    snapshot command (see the module docstring)."""

    def __init__(self, content: bytes) -> None:
        self.lock = threading.Lock()
        self.data = bytearray(content)
        self.clock = itertools.count(1)
        self.busy: list[tuple[int, int]] = []
        self.held: list[tuple[int, int]] = []
        self.window = False
        self.recording = False
        self.records: list[Op] = []
        self.inflight: dict[str, Op] = {}
        self.last: dict[int, Op] = {}  # cluster -> the last request that finished there

    def reserve(self, kind: str, offset: int, length: int, guest: str) -> Op | None:
        """The request's Op with its start tick, or None when its range overlaps one in flight
        (or one held by the window)."""
        stop = offset + length
        with self.lock:
            for start, end in itertools.chain(self.busy, self.held):
                if start < stop and offset < end:
                    return None
            self.busy.append((offset, stop))
            op = Op(kind, offset, length, next(self.clock), guest)
            self.inflight[guest] = op
            return op

    def finish(self, op: Op) -> None:
        with self.lock:
            op.end = next(self.clock)
            if op.post is None:
                self.data[op.offset:op.stop] = bytes(op.length)
            else:
                self.data[op.offset:op.stop] = op.post
            self.busy.remove((op.offset, op.stop))
            for cluster in range(op.offset // CLUSTER, (op.stop - 1) // CLUSTER + 1):
                self.last[cluster] = op
            if self.window:
                self.held.append((op.offset, op.stop))
            if self.recording:
                self.records.append(op)
            del self.inflight[op.guest]

    def open_window(self) -> tuple[int, bytes, dict[int, Op]]:
        """Tick T0, the content every request that ended before it made, and the last of
        them in each cluster."""
        with self.lock:
            self.window = self.recording = True
            self.records = []
            return next(self.clock), bytes(self.data), dict(self.last)

    def close_window(self) -> int:
        """Tick T1."""
        with self.lock:
            self.window = False
            self.held.clear()
            return next(self.clock)

    def settle(self, t1: int, timeout: float) -> list[Op] | None:
        """Once every request started before ``t1`` has finished: the ambiguous ones (those
        that ended after T0 and started before T1). None if that takes over ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if all(op.start > t1 for op in self.inflight.values()):
                    self.recording = False
                    return [op for op in self.records if op.start < t1]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)


def _fill(tick: int, length: int) -> bytes:
    """Data no other request writes: 8-byte words numbered from the request's tick."""
    words = np.arange(-(-length // 8), dtype="<u8") + np.uint64(tick << 32)
    return words.tobytes()[:length]


class GuestIO(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...
    def zero(self, offset: int, length: int, unmap: bool) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...


class DeviceIO:
    """Requests through ``Storage.device``."""

    def __init__(self, storage: Storage) -> None:
        self.device = storage.device("virtio0")

    def write(self, offset: int, data: bytes) -> None:
        self.device.pwrite(offset, data)

    def zero(self, offset: int, length: int, unmap: bool) -> None:
        self.device.pwrite_zeroes(offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        self.device.pdiscard(offset, length)


class ExportIO:
    """Requests through a connection to the writable export of the source."""

    def __init__(self, client: NBDClient) -> None:
        self.client = client

    def write(self, offset: int, data: bytes) -> None:
        self.client.pwrite(offset, data)

    def zero(self, offset: int, length: int, unmap: bool) -> None:
        self.client.zero(offset, length, CmdFlag(0) if unmap else CmdFlag.NO_HOLE)

    def discard(self, offset: int, length: int) -> None:
        self.client.trim(offset, length)


WRITE_LENGTHS = (512, 4 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 68 * KiB, 256 * KiB)
ZERO_LENGTHS = (4 * KiB, 64 * KiB, 128 * KiB, 512 * KiB, 1 * MiB)
ALIGNMENTS = (1, 512, 4 * KiB, CLUSTER, CLUSTER)


class Guest(threading.Thread):
    """A vCPU: writes (70 %), zeroes (15 %) and discards (15 %) random ranges until stopped."""

    def __init__(self, name: str, model: Model, io: GuestIO, readback: Callable[[int, int], bytes],
                 stop: threading.Event, burst: threading.Event, seed: int) -> None:
        super().__init__(name=name, daemon=True)
        self.model, self.io, self.readback, self.stop_event = model, io, readback, stop
        self.burst = burst
        self.rng = random.Random(seed)
        self.counts = {"write": 0, "zero": 0, "discard": 0}
        self.failures: list[str] = []
        self.lost = False  # a failed request whose range could not even be read back

    def run(self) -> None:
        rng = self.rng
        while not self.stop_event.is_set() and not self.lost:
            kind = rng.choices(("write", "zero", "discard"), (70, 15, 15))[0]
            length = rng.choice(WRITE_LENGTHS if kind == "write" else ZERO_LENGTHS)
            align = rng.choice(ALIGNMENTS)
            offset = rng.randrange(0, SIZE - length + 1) // align * align
            op = self.model.reserve(kind, offset, length, self.name)
            if op is None:
                time.sleep(0.0002)
                continue
            try:
                if kind == "write":
                    data = _fill(op.start, length)
                    self.io.write(offset, data)
                    op.post = data
                elif kind == "zero":
                    self.io.zero(offset, length, rng.random() < 0.5)
                else:
                    self.io.discard(offset, length)
                    op.post = self.readback(offset, length)
            except Exception as exc:  # counted and reported by the scenario
                op.failed = True
                self.failures.append(f"{op.describe()}: {exc!r}")
                try:
                    op.post = self.readback(offset, length)
                except Exception as again:
                    self.failures.append(f"{op.describe()}: read back failed too: {again!r}")
                    self.lost = True
            self.model.finish(op)
            self.counts[kind] += 1
            if not self.burst.is_set():
                time.sleep(rng.uniform(0, 2 * PAUSE))


# -- what the snapshot must hold ------------------------------------------------------------------
class Expectation(Protocol):
    def check(self, offset: int, got: Bytes, commit: bool = True) -> tuple[int, int]:
        """(bytes that no instant explains, the first such offset or -1)."""
        ...


class Instant:
    """The content at the instant: the copy at T0 and the ambiguous requests, each of which the
    snapshot holds entirely before or entirely after (answers fixed as reads tell them)."""

    def __init__(self, pre: bytes, ambiguous: list[Op], t0: int, t1: int,
                 last: dict[int, Op] | None = None) -> None:
        self.pre = _view(pre)
        self.last = last or {}
        self.ops = sorted(ambiguous, key=lambda op: op.offset)
        self.stops = [op.stop for op in self.ops]  # sorted too: the ranges never overlap
        self.posts = [_zeroes(op.length) if op.post is None else _view(op.post)
                      for op in self.ops]
        self.t0, self.t1 = t0, t1
        self.answer: dict[int, str] = {}
        self.lock = threading.Lock()

    def check(self, offset: int, got: Bytes, commit: bool = True) -> tuple[int, int]:
        end = offset + len(got)
        differ = got != self.pre[offset:end]
        bad = 0
        first = -1
        with self.lock:
            index = bisect.bisect_right(self.stops, offset)
            while index < len(self.ops) and self.ops[index].offset < end:
                op = self.ops[index]
                lo, hi = max(op.offset, offset), min(op.stop, end)
                part = got[lo - offset:hi - offset]
                before = self.pre[lo:hi]
                after = self.posts[index][lo - op.offset:hi - op.offset]
                is_before = bool(np.array_equal(part, before))
                is_after = bool(np.array_equal(part, after))
                answer = self.answer.get(index)
                if is_before and (answer != "after" or is_after):
                    if commit and not is_after:
                        self.answer[index] = "before"
                elif is_after and answer != "before":
                    if commit:
                        self.answer[index] = "after"
                else:
                    wrong_before = int(np.count_nonzero(part != before))
                    wrong_after = int(np.count_nonzero(part != after))
                    wrong = {"before": wrong_before, "after": wrong_after}.get(
                        answer or "", min(wrong_before, wrong_after))
                    bad += wrong
                    if wrong:
                        ref = after if answer == "after" else before
                        at = lo + int(np.flatnonzero(part != ref)[0]) if (part != ref).any() else lo
                        first = at if first < 0 else min(first, at)
                differ[lo - offset:hi - offset] = False
                index += 1
        count = int(np.count_nonzero(differ))
        if count:
            at = offset + int(np.flatnonzero(differ)[0])
            first = at if first < 0 else min(first, at)
        return bad + count, first

    def explain(self, offset: int) -> str:
        """The requests that decide the instant's byte at ``offset`` (for failure messages)."""
        last = self.last.get(offset // CLUSTER)
        words = [f"instant byte {int(self.pre[offset]):#04x} at T0={self.t0}; last request "
                 f"before T0 in its cluster: {last.describe() if last else 'none'}"]
        for index, op in enumerate(self.ops):
            if op.offset <= offset < op.stop:
                post = self.posts[index][offset - op.offset]
                words.append(f"in flight across the command (T1={self.t1}): {op.describe()}, "
                             f"byte after it {int(post):#04x}, answer "
                             f"{self.answer.get(index, 'undecided')}")
        return "; ".join(words)

    def inconsistencies(self) -> list[str]:
        """Answers no single instant explains: a request after it while one that ended before
        that one started is before it."""
        found = []
        by_time = sorted(range(len(self.ops)), key=lambda i: self.ops[i].start)
        for later in by_time:
            if self.answer.get(later) != "after":
                continue
            for earlier in by_time:
                if (self.answer.get(earlier) == "before"
                        and self.ops[earlier].end < self.ops[later].start):
                    found.append(f"{self.ops[later].describe()} is in the snapshot but "
                                 f"{self.ops[earlier].describe()} (done before it began) is not")
        return found

    def counts(self) -> tuple[int, int, int]:
        after = sum(1 for a in self.answer.values() if a == "after")
        before = sum(1 for a in self.answer.values() if a == "before")
        return len(self.ops), before, after


class TargetCheck:
    """A backup target, cluster by cluster: a cluster that reads as zeroes is absent, and
    ``absent`` says what it then stands for (None: anything, for a cancelled, partial target;
    otherwise the content when the bitmap was added); a present cluster is the instant's."""

    def __init__(self, instant: Instant, absent: bytes | None) -> None:
        self.instant = instant
        self.absent = None if absent is None else _view(absent)

    def check(self, offset: int, got: Bytes, commit: bool = True) -> tuple[int, int]:
        bad, first = 0, -1
        pos, end = offset, offset + len(got)
        while pos < end:
            stop = min((pos // CLUSTER + 1) * CLUSTER, end)
            part = got[pos - offset:stop - offset]
            wrong, at = self.instant.check(pos, part, commit=False)
            if part.any():
                if commit and not wrong:
                    self.instant.check(pos, part)
            elif wrong:  # zeroes: the cluster may be absent; it decides no request's answer
                if self.absent is None:
                    wrong = 0
                else:
                    wrong, at = self.instant.check(pos, self.absent[pos:stop], commit=False)
            if wrong:
                bad += wrong
                first = at if first < 0 else first
            pos = stop
        return bad, first


# -- the readers ----------------------------------------------------------------------------------
@dataclass
class ReadStats:
    reads: int = 0
    read_bytes: int = 0
    holes: int = 0
    statuses: int = 0
    extents: int = 0
    zero_extents: int = 0
    bytes_differ: int = 0
    misreported: int = 0
    errors: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: ReadStats) -> None:
        for name in ("reads", "read_bytes", "holes", "statuses", "extents", "zero_extents",
                     "bytes_differ", "misreported", "errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.extend(other.problems)


READ_LENGTHS = (4 * KiB, 64 * KiB, 128 * KiB, 132 * KiB, 256 * KiB, 1 * MiB, 2 * MiB)
STATUS_LENGTHS = (64 * KiB, 1 * MiB, 4 * MiB, SIZE)


class Reader(threading.Thread):
    """Reads its region of the export (1 MiB reads, then block status), then, unless ``once``,
    random reads and block status queries until stopped; checks every answer."""

    def __init__(self, index: int, sock: str, export: str, expect: Expectation,
                 stop: threading.Event, once: bool) -> None:
        super().__init__(name=f"reader{index}", daemon=True)
        self.sock, self.export, self.expect, self.stop_event = sock, export, expect, stop
        self.once = once
        quarter = SIZE // READERS
        self.region = (index * quarter, (index + 1) * quarter)
        self.rng = random.Random(1000 + index)
        self.stats = ReadStats()
        self.first_pass = threading.Event()

    def why(self, offset: int) -> str:
        instant = getattr(self.expect, "instant", self.expect)
        return f" [{instant.explain(offset)}]" if isinstance(instant, Instant) else ""

    def problem(self, text: str) -> None:
        if len(self.stats.problems) < REPORT:
            self.stats.problems.append(f"{self.name}: {text}")

    def run(self) -> None:
        try:
            with NBDClient.connect_unix(self.sock, self.export) as client:
                if client.size != SIZE:
                    self.stats.errors += 1
                    self.problem(f"export size {client.size}, expected {SIZE}")
                    return
                start, end = self.region
                for offset in range(start, end, MiB):
                    self.finish_read(client, client.submit(Cmd.READ, offset, MiB), offset, MiB)
                self.walk_status(client, start, end - start)
                self.first_pass.set()
                while not self.once and not self.stop_event.is_set():
                    self.random_batch(client)
        except Exception as exc:  # reported by the scenario
            self.stats.errors += 1
            self.problem(f"{type(exc).__name__}: {exc}")
        finally:
            self.first_pass.set()

    def random_batch(self, client: NBDClient) -> None:
        rng = self.rng
        batch: list[tuple[Cmd, int, int, int]] = []
        for _ in range(4):
            if rng.random() < 0.7:
                length = rng.choice(READ_LENGTHS)
                align = rng.choice((1, 512, 4096))
                offset = rng.randrange(0, SIZE - length + 1) // align * align
                batch.append((Cmd.READ, client.submit(Cmd.READ, offset, length), offset, length))
            else:
                length = rng.choice(STATUS_LENGTHS)
                offset = rng.randrange(0, SIZE - length + 1) // 512 * 512
                batch.append((Cmd.BLOCK_STATUS, client.submit(Cmd.BLOCK_STATUS, offset, length),
                               offset, length))
        for command, cookie, offset, length in batch:
            if command == Cmd.READ:
                self.finish_read(client, cookie, offset, length)
            else:
                self.finish_status(client, cookie, offset, length)

    def finish_read(self, client: NBDClient, cookie: int, offset: int, length: int) -> None:
        reply = client.wait(cookie)
        stats = self.stats
        stats.reads += 1
        if reply.error or reply.data is None or len(reply.data) != length:
            stats.errors += 1
            self.problem(f"read {offset:#x}+{length:#x}: error {reply.error} {reply.message}")
            return
        stats.read_bytes += length
        stats.holes += len(reply.holes)
        bad, first = self.expect.check(offset, _view(reply.data))
        if bad:
            stats.bytes_differ += bad
            got = reply.data[first - offset]
            self.problem(f"read {offset:#x}+{length:#x} ({len(reply.holes)} hole chunks): "
                         f"{bad} bytes differ from the instant, first at {first:#x} "
                         f"(cluster {first // CLUSTER}, got {got:#04x}){self.why(first)}")

    def finish_status(self, client: NBDClient, cookie: int, offset: int, length: int) -> int:
        """Checks the extents; returns how far they reach (0 on error)."""
        reply = client.wait(cookie)
        stats = self.stats
        stats.statuses += 1
        extents = next(iter(reply.extents.values()), []) if not reply.error else []
        if not extents:
            stats.errors += 1
            self.problem(f"block status {offset:#x}+{length:#x}: error {reply.error} "
                         f"{reply.message}, {len(extents)} extents")
            return 0
        pos = offset
        for ext_length, flags in extents:
            if ext_length == 0 or pos >= SIZE:
                stats.errors += 1
                self.problem(f"block status {offset:#x}+{length:#x}: bad extent "
                             f"({ext_length:#x}, {flags}) at {pos:#x}")
                return 0
            stop = min(pos + ext_length, SIZE)
            stats.extents += 1
            if flags & AllocationFlag.ZERO:
                stats.zero_extents += 1
                bad, first = self.expect.check(pos, _zeroes(stop - pos))
                if bad:
                    stats.misreported += 1
                    self.problem(f"block status {offset:#x}+{length:#x}: extent {pos:#x}+"
                                 f"{stop - pos:#x} flags {flags} (ZERO) but {bad} bytes there "
                                 f"are not zero at the instant, first at {first:#x} "
                                 f"(cluster {first // CLUSTER}){self.why(first)}")
            pos = stop
        return pos

    def walk_status(self, client: NBDClient, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            reached = self.finish_status(
                client, client.submit(Cmd.BLOCK_STATUS, offset, end - offset), offset,
                end - offset)
            if reached <= offset:
                return
            offset = reached


# -- a scenario -----------------------------------------------------------------------------------
class Events:
    """The events of one Storage, waited for by name and job id."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def find(self, names: tuple[str, ...], job: str) -> dict[str, Any] | None:
        for event in self.events:
            data = dict(event.get("data") or {})
            if event["event"] in names and data.get("device") == job:
                data["event"] = event["event"]
                return data
        return None

    def wait(self, names: tuple[str, ...], job: str, timeout: float) -> dict[str, Any] | None:
        with self.cond:
            self.cond.wait_for(lambda: self.find(names, job) is not None, timeout)
            return self.find(names, job)


def _build_chain(tmp: Path) -> tuple[str, str]:
    """base.qcow2 with data in clusters 0, 1 of every 4; top.qcow2 over it, empty."""
    base, top = str(tmp / "base.qcow2"), str(tmp / "top.qcow2")
    create(base, SIZE)
    data = pattern(SIZE, seed=7)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                         "file": {"driver": "file", "filename": base}})
        node = storage.graph.get("base")
        for c in range(SIZE // CLUSTER):
            if c % 4 in (0, 1):
                node.pwrite(c * CLUSTER, data[c * CLUSTER:(c + 1) * CLUSTER])
    create(top, SIZE, backing_file=base, backing_format="qcow2")
    return base, top


class Rig:
    """One scenario's Storage, guest and readers; ``problems`` collects what went wrong."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.tmp, self.name = tmp, name
        self.began = time.monotonic()
        _, top = _build_chain(tmp)
        self.top = top
        self.sock = str(tmp / "nbd.sock")
        self.storage = Storage()
        self.events = Events()
        self.storage.subscribe(self.events)
        self.problems: list[str] = []
        self.stop_guests = threading.Event()
        self.burst = threading.Event()
        self.guests: list[Guest] = []
        self.clients: list[NBDClient] = []
        self.stats = ReadStats()
        self.instant: Instant | None = None
        self.notes: list[str] = []
        self.halted = self.closed = False
        x = self.storage.execute
        x("blockdev-add", {"driver": "qcow2", "node-name": "top", "discard": "unmap",
                           "file": {"driver": "file", "filename": top}})
        x("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "top",
                         "share-rw": True})
        device = self.storage.device("virtio0")
        data = pattern(SIZE, seed=99)
        for c in range(SIZE // CLUSTER):
            at = c * CLUSTER
            if c % 8 in (1, 2):  # over base data, over a base hole
                device.pwrite(at, data[at:at + CLUSTER])
            elif c % 16 == 8:  # a zero cluster over base data
                device.pwrite_zeroes(at, CLUSTER, True)
            elif c % 16 == 12:  # discarded over base data: a zero cluster too
                device.pdiscard(at, CLUSTER)
        self.initial = device.pread(0, SIZE)
        x("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.sock}}})
        x("nbd-server-add", {"device": "top", "name": "live", "writable": True})
        self.model = Model(self.initial)

    # -- the guest
    def start_guests(self) -> None:
        device = self.storage.device("virtio0")
        for i in range(DEVICE_GUESTS + NBD_GUESTS):
            io: GuestIO
            if i < DEVICE_GUESTS:
                io = DeviceIO(self.storage)
                name = f"vcpu{i}"
            else:
                client = NBDClient.connect_unix(self.sock, "live")
                self.clients.append(client)
                io = ExportIO(client)
                name = f"nbd-guest{i - DEVICE_GUESTS}"
            self.guests.append(Guest(name, self.model, io, device.pread, self.stop_guests,
                                     self.burst, i))
        for guest in self.guests:
            guest.start()

    def halt_guests(self) -> None:
        if self.halted:
            return
        self.halted = True
        self.stop_guests.set()
        for guest in self.guests:
            guest.join(WAIT)
            if guest.is_alive():
                op = self.model.inflight.get(guest.name)
                self.problems.append(f"guest {guest.name} hung in "
                                     f"{op.describe() if op else 'no request'}")
        for client in self.clients:
            client.close()

    # -- the snapshot command
    def take(self, command: str, args: dict[str, Any],
             publish: Callable[[], None] | None = None) -> Instant:
        """Runs the snapshot command between T0 and T1. ``publish`` (exporting the snapshot
        as ``snap``) runs straight after; then the ranges of the requests still in flight are
        read at once, before they finish, and checked once the instant is known: a request
        that slips past the snapshot's start lands later and changes what they read."""
        self.burst.set()
        time.sleep(BURST)
        t0, pre, last = self.model.open_window()
        try:
            self.storage.execute(command, args)
        finally:
            t1 = self.model.close_window()
            self.burst.clear()
        early: list[tuple[int, int, int]] = []
        client = None
        if publish is not None:
            publish()
            with self.model.lock:
                ranges = [(op.offset, op.length) for op in self.model.inflight.values()]
            client = NBDClient.connect_unix(self.sock, "snap")
            early = [(client.submit(Cmd.READ, o, n), o, n) for o, n in ranges]
        ambiguous = self.model.settle(t1, WAIT)
        if ambiguous is None:
            pytest.fail(f"{self.name}: guest requests started before {command} returned did not "
                        f"finish within {WAIT} s: "
                        f"{[op.describe() for op in self.model.inflight.values()]}")
        self.instant = Instant(pre, ambiguous, t0, t1, last)
        if client is not None:
            checker = Reader(-1, self.sock, "snap", self.instant, self.stop_guests, once=True)
            checker.name = "early-reader"
            with client:
                for cookie, offset, length in early:
                    checker.finish_read(client, cookie, offset, length)
            self.stats.add(checker.stats)
        return self.instant

    def under_burst(self, action: Callable[[], object]) -> None:
        """``action`` (a job's end) with every guest thread writing without pause."""
        self.burst.set()
        time.sleep(BURST)
        try:
            action()
            time.sleep(BURST)
        finally:
            self.burst.clear()

    def job_end(self, job: str, expect: str) -> dict[str, Any] | None:
        """Waits for the job's BLOCK_JOB_COMPLETED/CANCELLED; records a problem if it does not
        come, is not ``expect`` when that matters, or carries an error."""
        names = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        data = self.events.wait(names, job, WAIT)
        if data is None:
            jobs = self.storage.execute("query-block-jobs")
            self.problems.append(f"job {job} did not end within {WAIT} s (waiting for {expect}); "
                                 f"query-block-jobs: {jobs}")
        elif "error" in data:
            self.problems.append(f"job {job} ended with an error: {data}")
        elif data["event"] != expect:
            self.notes.append(f"job {job}: {data['event']} instead of {expect}")
        return data

    def read(self, export: str, expect: Expectation, live: bool) -> None:
        """4 readers over ``export``: one pass, then (``live``) random requests for RUN s."""
        stop = threading.Event()
        readers = [Reader(i, self.sock, export, expect, stop, once=not live)
                   for i in range(READERS)]
        for reader in readers:
            reader.start()
        if live:
            for reader in readers:
                reader.first_pass.wait(WAIT)
            time.sleep(RUN)
        stop.set()
        for reader in readers:
            reader.join(WAIT)
            if reader.is_alive():
                self.problems.append(f"{reader.name} hung")
            self.stats.add(reader.stats)

    def check_partial(self, path: str) -> None:
        """The cancelled target's own layer: per cluster, zeroes or the instant's data."""
        assert self.instant is not None
        expect = TargetCheck(self.instant, None)
        bad = 0
        with Storage() as storage:
            storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "t", "backing": None,
                                             "read-only": True,
                                             "file": {"driver": "file", "filename": path}})
            node = storage.graph.get("t")
            for offset in range(0, SIZE, MiB):
                wrong, first = expect.check(offset, _view(node.pread(offset, MiB)))
                if wrong:
                    bad += wrong
                    self.problems.append(f"cancelled target: {wrong} bytes in {offset:#x}+1 MiB "
                                         f"neither zero nor the instant's, first at {first:#x} "
                                         f"[{self.instant.explain(first)}]")
        self.stats.bytes_differ += bad
        self.stats.reads += SIZE // MiB
        self.stats.read_bytes += SIZE

    # -- the verdict
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.halt_guests()
        closer = threading.Thread(target=self.storage.close, daemon=True)
        closer.start()
        closer.join(WAIT)
        if closer.is_alive():
            self.problems.append(f"Storage.close() did not return within {WAIT} s")

    def verdict(self) -> None:
        failed = [f for g in self.guests for f in g.failures]
        counts = {k: sum(g.counts[k] for g in self.guests) for k in ("write", "zero", "discard")}
        through_nbd = sum(sum(g.counts.values()) for g in self.guests[DEVICE_GUESTS:])
        failed_requests = sum(1 for g in self.guests for f in g.failures
                              if "read back failed" not in f)
        inconsistent = self.instant.inconsistencies() if self.instant else []
        ambiguous, before, after = self.instant.counts() if self.instant else (0, 0, 0)
        s = self.stats
        print(f"\nDRILL fleecing-stress {self.name}: {len(self.guests)} guest threads: "
              f"{counts['write']} writes, {counts['zero']} zeroes, {counts['discard']} discards "
              f"({through_nbd} through NBD), {failed_requests} failed; {ambiguous} in flight "
              f"across the command ({before} before the instant, {after} after, "
              f"{ambiguous - before - after} undecided); readers: {s.reads} reads "
              f"({s.read_bytes / MiB:.0f} MiB, {s.holes} hole chunks), {s.statuses} block status "
              f"({s.extents} extents, {s.zero_extents} ZERO); {s.bytes_differ} bytes differ, "
              f"{s.misreported} extents misreported, {len(inconsistent)} inconsistent, "
              f"{s.errors} request errors; {time.monotonic() - self.began:.1f} s"
              + "".join(f"; {n}" for n in self.notes))
        problems = (self.problems + [f"guest request failed: {f}" for f in failed[:REPORT]]
                    + s.problems + inconsistent[:REPORT])
        if s.reads == 0 or sum(counts.values()) == 0:
            problems.append("the drill did no work (no reads or no guest requests)")
        if problems or s.bytes_differ or s.misreported or failed or s.errors:
            summary = (f"{self.name}: {s.bytes_differ} bytes differ from the instant, "
                       f"{s.misreported} extents misreported, {failed_requests} guest requests "
                       f"failed, {len(inconsistent)} instant inconsistencies, {s.errors} request "
                       f"errors")
            pytest.fail(summary + "\n  " + "\n  ".join(problems[:4 * REPORT]), pytrace=False)


@pytest.fixture
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    name = str(request.node.callspec.id) if hasattr(request.node, "callspec") else "stress"
    built = Rig(tmp_path, name)
    try:
        yield built
    finally:
        built.halt_guests()
        built.close()


# -- the scenarios --------------------------------------------------------------------------------
def _snapshot_run(rig: Rig, command: str, args: dict[str, Any], export: dict[str, Any],
                  end: Callable[[], None]) -> None:
    rig.start_guests()
    time.sleep(WARMUP)
    instant = rig.take(command, args, lambda: rig.storage.execute(
        "nbd-server-add", {**export, "name": "snap", "writable": False}))
    rig.read("snap", instant, live=True)
    rig.storage.execute("nbd-server-remove", {"name": "snap", "mode": "hard"})
    rig.under_burst(end)
    time.sleep(AFTER)
    rig.halt_guests()


def _none(rig: Rig) -> None:
    def cancel() -> None:
        rig.storage.execute("block-job-cancel", {"device": "fleece"})
        rig.job_end("fleece", "BLOCK_JOB_CANCELLED")

    _snapshot_run(rig, "drive-backup",
                  {"device": "virtio0", "job-id": "fleece", "sync": "none", "format": "qcow2",
                   "target": str(rig.tmp / "pit.qcow2"), "target-id": "pit0"},
                  {"device": "pit0"}, cancel)


def _filter(rig: Rig) -> None:
    path = rig.tmp / "tgt.raw"
    with path.open("wb") as f:
        f.truncate(SIZE)
    rig.storage.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(path)}})

    def publish() -> None:
        rig.storage.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                             "file": "fl"})
        rig.storage.execute("nbd-server-add", {"device": "acc", "name": "snap",
                                               "writable": False})

    def remove_access() -> None:
        rig.storage.execute("blockdev-del", {"node-name": "acc"})

    rig.start_guests()
    time.sleep(WARMUP)
    instant = rig.take("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                        "file": "top", "target": "tgt"}, publish)
    rig.read("snap", instant, live=True)
    rig.storage.execute("nbd-server-remove", {"name": "snap", "mode": "hard"})
    rig.under_burst(remove_access)
    time.sleep(AFTER)
    rig.halt_guests()


def _backup_args(rig: Rig, sync: str) -> tuple[str, dict[str, Any]]:
    """The command and arguments of a backup named ``backup`` with target node ``tgt``."""
    path = str(rig.tmp / "backup.qcow2")
    if sync in ("incremental", "bitmap"):
        create(path, SIZE)
        rig.storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                             "file": {"driver": "file", "filename": path}})
        args: dict[str, Any] = {"device": "virtio0", "job-id": "backup", "target": "tgt",
                                "sync": sync, "bitmap": "b0"}
        if sync == "bitmap":
            args["bitmap-mode"] = "on-success"
        return "blockdev-backup", args
    return "drive-backup", {"device": "virtio0", "job-id": "backup", "sync": sync,
                            "format": "qcow2", "target": path, "target-id": "tgt"}


def _backup(rig: Rig, sync: str, cancel: bool) -> None:
    if sync in ("incremental", "bitmap"):
        rig.storage.execute("block-dirty-bitmap-add", {"node": "top", "name": "b0"})
    command, args = _backup_args(rig, sync)
    if cancel:
        args["speed"] = CANCEL_SPEED
    rig.start_guests()
    time.sleep(WARMUP)
    instant = rig.take(command, args)
    if cancel:  # nothing else holds drive-backup's target: it closes as the job ends
        time.sleep(0.5)

        def end() -> None:
            try:
                rig.storage.execute("block-job-cancel", {"device": "backup"})
            except Exception as exc:  # the job may have finished already; noted by job_end
                rig.notes.append(f"block-job-cancel: {exc}")
            rig.job_end("backup", "BLOCK_JOB_CANCELLED")

        rig.under_burst(end)
        time.sleep(AFTER)
        rig.halt_guests()
        rig.close()
        rig.check_partial(str(rig.tmp / "backup.qcow2"))
        return
    # the export holds the target: it outlives the job (drive-backup's target-id node goes with
    # the job otherwise)
    rig.storage.execute("nbd-server-add", {"device": "tgt", "name": "snap", "writable": False})
    rig.under_burst(lambda: rig.job_end("backup", "BLOCK_JOB_COMPLETED"))
    expect: Expectation = instant
    if sync in ("incremental", "bitmap"):
        expect = TargetCheck(instant, rig.initial)
    rig.read("snap", expect, live=False)  # the guest goes on meanwhile
    time.sleep(AFTER)
    rig.halt_guests()


SCENARIOS: dict[str, Callable[[Rig], None]] = {
    "none": _none,
    "filter": _filter,
    "full": lambda rig: _backup(rig, "full", cancel=False),
    "top": lambda rig: _backup(rig, "top", cancel=False),
    "incremental": lambda rig: _backup(rig, "incremental", cancel=False),
    "full-cancel": lambda rig: _backup(rig, "full", cancel=True),
    "top-cancel": lambda rig: _backup(rig, "top", cancel=True),
    "bitmap-cancel": lambda rig: _backup(rig, "bitmap", cancel=True),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fleecing_under_load(rig: Rig, scenario: str) -> None:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)  # more interleavings of the Python threads
    try:
        SCENARIOS[scenario](rig)
    finally:
        rig.halt_guests()
        sys.setswitchinterval(interval)
    rig.verdict()
