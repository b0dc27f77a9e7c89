"""A crash simulator for image files: record every write and sync, replay the crash states.

:class:`Recorder` replaces the file driver's system calls (:class:`FileOps`, the seam in
:mod:`fleece.block.drivers.file`) and the pure file writer's (the write-behind thread, which it
selects instead of the native one), so every ``pwritev``, ``fallocate``, ``ftruncate`` and
``fdatasync`` of a watched file is logged, in the order the kernel saw them (each call and its
log entry happen under one lock).

A *crash state* of a file is what a power loss at log position ``k`` may leave on the disk:
everything up to the file's last sync before ``k`` and every ``RWF_DSYNC`` write before ``k``
(durable by itself when it returned), then some of the other writes since (a prefix,
as a ``kill -9`` leaves them; any subset, as a disk cache may; and writes *torn*, each of their
512-byte sectors kept or lost on its own; a sector itself is atomic). :meth:`Recorder.states`
draws them at random; :func:`check_state` runs ``qemu-img check`` on each image (exit 0, or 3
for leaked clusters only) and reopens it in fleece, reading every byte; with a guest model
(:class:`Guest`) it also checks that what was flushed before the crash reads back unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fleece._pure.filewriter as pure_filewriter
import fleece.block.write_behind as write_behind
from fleece.block.drivers.file import FileDriver, FileOps
from fleece.storage import Storage
from tests.peers import PEER_ENV

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, SupportsLenAndGetItem

SECTOR = 512
_FALLOC_FL_KEEP_SIZE = 0x01


@dataclass(frozen=True)
class Write:
    """``data`` written at ``offset`` (``data`` None: ``length`` zeroes, a punched hole)."""

    path: str
    offset: int
    length: int
    data: bytes | None
    grows: bool = True  # False: a hole punched with KEEP_SIZE never extends the file
    durable: bool = False  # written with RWF_DSYNC: on the disk, whole, once it returned


@dataclass(frozen=True)
class Truncate:
    path: str
    size: int


@dataclass(frozen=True)
class Sync:
    path: str


@dataclass(frozen=True)
class Dirty:
    """The guest starts changing ``[offset, offset + length)`` of the image at ``path``."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class Flushed:
    """A flush of the image at ``path`` returned: it reads ``content`` from now on, except
    where a later :class:`Dirty` says otherwise."""

    path: str
    content: bytes


Event = Write | Truncate | Sync | Dirty | Flushed


@dataclass
class CrashState:
    """The files a power loss at log position ``at`` left behind, and how they came about."""

    at: int
    mode: str
    files: dict[str, bytes]
    #: per image: (what its last flush before the crash guarantees, ranges changed since)
    expect: dict[str, tuple[bytes, list[tuple[int, int]]]]
    lost: list[int] = field(default_factory=list)  # log positions of writes lost
    torn: list[int] = field(default_factory=list)  # log positions of writes torn

    def describe(self, events: Sequence[Event]) -> str:
        def show(i: int) -> str:
            e = events[i]
            assert isinstance(e, Write)
            return f"#{i} {Path(e.path).name}@{e.offset:#x}+{e.length:#x}"
        lost = ", ".join(show(i) for i in self.lost[:12]) + (" ..." if len(self.lost) > 12 else "")
        torn = ", ".join(show(i) for i in self.torn[:12]) + (" ..." if len(self.torn) > 12 else "")
        return f"crash at #{self.at} ({self.mode}); lost: [{lost}]; torn: [{torn}]"


class Recorder(FileOps):
    """Logs the writes and syncs of the watched files (see the module docstring)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.base: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._paths: dict[int, tuple[str, str | None]] = {}  # fd -> (link target, watched)

    # -- what is watched -------------------------------------------------------------------------
    def watch(self, path: Path | str) -> str:
        """Watch ``path`` (it need not exist yet: its contents then start empty)."""
        real = os.path.realpath(path)
        with self._lock:
            self.base[real] = Path(real).read_bytes() if os.path.exists(real) else b""
        return real

    def _watched(self, fd: int) -> str | None:
        link = os.readlink(f"/proc/self/fd/{fd}")  # descriptors are reused: check every time
        cached = self._paths.get(fd)
        if cached is not None and cached[0] == link:
            return cached[1]
        watched = link if link in self.base else None
        self._paths[fd] = (link, watched)
        return watched

    # -- the seam: FileOps and the pure file writer -----------------------------------------------
    def pwritev(self, fd: int, buffers: SupportsLenAndGetItem[ReadableBuffer], offset: int,
                flags: int = 0, /) -> int:
        with self._lock:
            n = os.pwritev(fd, buffers, offset, flags)
            path = self._watched(fd)
            if path is not None and n:
                data = b"".join(bytes(buffers[i]) for i in range(len(buffers)))[:n]
                self.events.append(
                    Write(path, offset, n, data, durable=bool(flags & os.RWF_DSYNC))
                )
            return n

    def fdatasync(self, fd: int, /) -> None:
        with self._lock:
            os.fdatasync(fd)
            path = self._watched(fd)
            if path is not None:
                self.events.append(Sync(path))

    def fallocate(self, fd: int, mode: int, offset: int, length: int, /) -> None:
        with self._lock:
            FileOps.fallocate(fd, mode, offset, length)
            path = self._watched(fd)
            if path is not None:
                self.events.append(
                    Write(path, offset, length, None, grows=not mode & _FALLOC_FL_KEEP_SIZE)
                )

    def ftruncate(self, fd: int, length: int, /) -> None:
        size = length
        with self._lock:
            os.ftruncate(fd, size)
            path = self._watched(fd)
            if path is not None:
                self.events.append(Truncate(path, size))

    def write_all(self, fd: int, offset: int, view: memoryview) -> int:
        """The pure file writer's write (and write-behind's synchronous one), recorded."""
        done = 0
        try:
            while done < len(view):
                done += self.pwritev(fd, [view[done:]], offset + done)
        except OSError as exc:
            return exc.errno or 5
        return 0

    def mark(self, event: Dirty | Flushed) -> None:
        with self._lock:
            self.events.append(event)

    @contextlib.contextmanager
    def recording(self) -> Iterator[Recorder]:
        """Record while inside: the file driver's calls, and the write-behind thread's (the
        pure twin is selected, so that every write goes through Python)."""
        patches: list[tuple[Any, str, Any]] = [
            (FileDriver, "ops", self),
            (write_behind, "FileWriter", pure_filewriter.FileWriter),
            (write_behind, "write_all", self.write_all),
            (pure_filewriter, "write_all", self.write_all),
        ]
        saved = [(owner, name, vars(owner)[name]) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        try:
            yield self
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)

    # -- crash states ------------------------------------------------------------------------------
    def states(self, rng: random.Random, count: int) -> Iterator[CrashState]:
        """``count`` random crash states (the last one: nothing lost, a clean stop), then two
        for each write to an image's first sector that spans more: torn after its first
        sector, and torn before it (a header rewrite is one such write, rarely drawn)."""
        n = len(self.events)
        writes = [i for i, e in enumerate(self.events) if isinstance(e, Write)]
        for i in writes:
            e = self.events[i]
            assert isinstance(e, Write)
            if e.offset < SECTOR < e.offset + e.length:
                last = (e.offset + e.length - 1) // SECTOR
                yield self.state(i + 1, "header torn", rng, {i: {0}})
                yield self.state(i + 1, "header torn", rng, {i: set(range(1, last + 1))})
        for j in range(count):
            if j == count - 1:
                yield self.state(n, "complete", rng)
                continue
            # Crash right after a write most of the time (what is lost depends on the writes).
            at = rng.choice(writes) + 1 if writes and rng.random() < 0.8 else rng.randrange(n + 1)
            mode = rng.choice(["prefix", "subset", "subset", "torn", "torn", "torn"])
            yield self.state(at, mode, rng)

    def state(self, at: int, mode: str, rng: random.Random,
              tear: dict[int, set[int]] | None = None) -> CrashState:
        """The crash state at log position ``at``: ``mode`` is ``subset`` (each write since the
        file's last sync kept or lost), ``torn`` (a subset, and the sectors of some kept writes
        kept or lost), or anything else for every write before ``at`` kept (a prefix), but
        for the writes in ``tear``, of which only the sectors given are kept."""
        events = self.events[:at]
        last_sync: dict[str, int] = {}
        for i, e in enumerate(events):
            if isinstance(e, Sync):
                last_sync[e.path] = i
        keep_p = rng.choice([0.1, 0.5, 0.9])
        tear_p = rng.choice([0.3, 1.0])
        files = {p: bytearray(b) for p, b in self.base.items()}
        st = CrashState(at, mode, {}, {})
        for i, e in enumerate(events):
            if isinstance(e, Write | Truncate):
                content = files[e.path]
                synced = i < last_sync.get(e.path, -1) or (isinstance(e, Write) and e.durable)
                if not synced and mode in ("subset", "torn") and rng.random() >= keep_p:
                    if isinstance(e, Write):
                        st.lost.append(i)
                    continue
                if isinstance(e, Truncate):
                    del content[e.size :]
                    content.extend(bytes(max(0, e.size - len(content))))
                    continue
                sectors = None
                if tear is not None and i in tear:
                    sectors = tear[i]
                    st.torn.append(i)
                elif not synced and mode == "torn" and rng.random() < tear_p:
                    first, last = e.offset // SECTOR, (e.offset + e.length - 1) // SECTOR
                    if last > first:
                        sectors = {s for s in range(first, last + 1) if rng.random() < 0.5}
                        st.torn.append(i)
                _apply(content, e, sectors)
        st.files = {p: bytes(b) for p, b in files.items()}
        for path in self.base:
            flushed: bytes | None = None
            dirty: list[tuple[int, int]] = []
            for e in events:
                if isinstance(e, Flushed) and e.path == path:
                    flushed, dirty = e.content, []
                elif isinstance(e, Dirty) and e.path == path:
                    dirty.append((e.offset, e.length))
            if flushed is not None:
                st.expect[path] = (flushed, dirty)
        return st


def _apply(content: bytearray, e: Write, sectors: set[int] | None) -> None:
    """Apply ``e`` to ``content``, only the parts in ``sectors`` when given (a torn write)."""
    pieces: list[tuple[int, int]] = []
    if sectors is None:
        pieces.append((e.offset, e.offset + e.length))
    else:
        for s in sorted(sectors):
            lo, hi = max(e.offset, s * SECTOR), min(e.offset + e.length, (s + 1) * SECTOR)
            if pieces and pieces[-1][1] == lo:
                pieces[-1] = (pieces[-1][0], hi)
            else:
                pieces.append((lo, hi))
    for lo, hi in pieces:
        if not e.grows:
            hi = min(hi, len(content))
            if lo >= hi:
                continue
        if hi > len(content):
            content.extend(bytes(hi - len(content)))
        if e.data is None:
            content[lo:hi] = bytes(hi - lo)
        else:
            content[lo:hi] = e.data[lo - e.offset : hi - e.offset]


class Guest:
    """What the guest of one image wrote, and what it flushed (the marks the checks use)."""

    def __init__(self, recorder: Recorder, path: str, content: bytes) -> None:
        self.recorder, self.path = recorder, path
        self.content = bytearray(content)
        recorder.mark(Flushed(path, bytes(content)))  # the starting image is on disk

    def writing(self, offset: int, length: int, data: bytes | None) -> None:
        """Call before the guest write (``data`` None: zeroes) is issued."""
        self.recorder.mark(Dirty(self.path, offset, length))
        self.content[offset : offset + length] = bytes(length) if data is None else data

    def flushed(self) -> None:
        """Call after a flush of the image returned."""
        self.recorder.mark(Flushed(self.path, bytes(self.content)))


@dataclass
class Verdict:
    ok: bool
    what: str


def qemu_img_check(path: Path) -> Verdict:
    """``qemu-img check``: exit 0, or 3 with leaked clusters only."""
    proc = subprocess.run(
        ["qemu-img", "check", "-U", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True, text=True, env=PEER_ENV, timeout=60,
    )
    if proc.returncode in (0, 3):
        report = json.loads(proc.stdout)
        if report.get("corruptions", 0) or report.get("check-errors", 0):
            return Verdict(False, f"qemu-img check: {proc.stdout}")
        return Verdict(True, f"leaks={report.get('leaks', 0)}")
    text = subprocess.run(
        ["qemu-img", "check", "-U", "-f", "qcow2", str(path)],
        capture_output=True, text=True, env=PEER_ENV, timeout=60,
    )
    return Verdict(False, f"qemu-img check exit {proc.returncode}: "
                          f"{(text.stdout + text.stderr).strip()[:1500]}")


def reopen_and_read(path: Path, expect: tuple[bytes, list[tuple[int, int]]] | None) -> Verdict:
    """Open the image in fleece (read-only, without its backing file), read every byte, and
    compare what the last flush guarantees."""
    try:
        with Storage() as storage:
            storage.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "crashed", "read-only": True, "backing": None,
                "file": {"driver": "file", "filename": str(path)},
            })
            node = storage.graph.get("crashed")
            got = node.pread(0, node.size)
    except Exception as exc:
        return Verdict(False, f"fleece reopen: {type(exc).__name__}: {exc}")
    if expect is None:
        return Verdict(True, "")
    flushed, dirty = expect
    if len(got) != len(flushed):
        return Verdict(False, f"size {len(got)} != {len(flushed)}")
    mask = bytearray(b"\x01") * len(flushed)
    for offset, length in dirty:
        mask[offset : offset + length] = bytes(length)
    for start in range(0, len(flushed), SECTOR):
        end = start + SECTOR
        if got[start:end] != flushed[start:end] and any(mask[start:end]):
            return Verdict(False, f"flushed data lost: guest sector {start // SECTOR} "
                                  f"({start:#x}) differs from what the last flush returned")
    return Verdict(True, "")


def check_state(
    state: CrashState,
    scratch: Path,
    images: Sequence[str],
    extra: Callable[[dict[str, Path]], Verdict] | None = None,
) -> list[str]:
    """Write the state's files into ``scratch`` and check each of ``images``: the failures."""
    scratch.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for real, content in state.files.items():
        copy = scratch / Path(real).name
        copy.write_bytes(content)
        paths[real] = copy
    failures: list[str] = []
    for real in images:
        copy = paths[real]
        if not state.files[real]:
            continue  # never written: the image was still being created
        for verdict in (qemu_img_check(copy), reopen_and_read(copy, state.expect.get(real))):
            if not verdict.ok:
                failures.append(f"{Path(real).name}: {verdict.what}")
    if extra is not None and not failures:
        verdict = extra(paths)
        if not verdict.ok:
            failures.append(verdict.what)
    return failures
