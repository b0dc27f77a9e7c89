"""Copy-before-write: keep a target holding the point-in-time content of a live source.

The point-in-time invariant, as this module keeps it (``done`` is one bitmap of clusters,
shared by the hook and the job, whose bits only ever go from 0 to 1):

The state belongs to a ``copy-before-write`` filter node (:mod:`fleece.block.drivers.cbw_filter`)
above the source: every write to the source passes through that node, whose write path calls
:meth:`CopyBeforeWrite.before_write`. A backup job inserts such a node and copies through the
same state, so job and filter share one ``done`` bitmap.

* A write to the source over clusters C takes an *exclusive* lock on C, copies every cluster of
  C not yet done from the source to the target, marks them done, lets go of the lock, and only
  then writes. Once a cluster is done nobody reads it from the source for the snapshot again,
  so the write need not hold the lock.
* A snapshot read of the target over clusters C takes a *shared* lock on C unless all of C is
  done. Done clusters are read from the target; the others read through the target's backing
  link to the source, which cannot change under the shared lock.
* A job copy takes the exclusive lock too, and copies only clusters still not done: no cluster
  is copied twice.

*Write-behind* (``write_behind`` bytes, the backup job's default) takes the target write off
the guest's path without giving up the invariant: the guest's copy reads the old data into
memory, marks the clusters done and goes on, while a native thread writes the target; readers
of those clusters wait until it has (:mod:`fleece.block.write_behind` says how). What changes is
a failure: a target write that fails after the guest write went on can no longer fail that
guest write, so it breaks the snapshot (reads fail with ``EACCES``) and the owner hears of it
through ``on_late_failure``. With ``write_behind=0``, or a target that cannot take direct writes,
every copy lands before its guest write proceeds, and a failed copy fails the guest write.

*Zeroes stay zeroes*, as QEMU's block-copy keeps them: under the exclusive lock, one block
status query of the source per run (metadata only; a run the source maps as one extent costs
one query) finds the whole clusters that read as zeroes, and those are written to the target as
zeroes (``pwrite_zeroes``, a qcow2 zero cluster or a hole) instead of as data, so the snapshot's
block status still says "zero" there and backup tools skip them. They count as copied like any
other cluster, and are marked done only once the target has them.

Planning (which runs of a request still need copying) and the lock table are Cython
(:mod:`fleece.cbw_plan`); waiting for a conflicting lock is a ``threading.Condition`` here.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import TYPE_CHECKING

from fleece import bitmap as cluster_bitmap
from fleece import cbw_plan
from fleece.block import nowait, route
from fleece.block.ahead_copier import AheadCopier
from fleece.block.copy_ahead import CopyAhead
from fleece.block.direct import DirectWrite
from fleece.block.driver import HostMap
from fleece.block.node import BlockNode
from fleece.block.rangelock import ClusterRangeLocks
from fleece.block.write_behind import Landing, WriteBehind

if TYPE_CHECKING:
    from fleece.bitmap import ClusterBitmap


class CbwErrorPolicy(enum.Enum):
    """What a failed copy in the guest's write path does (QEMU's ``on-cbw-error``)."""

    #: the guest write fails, the snapshot stays valid
    BREAK_GUEST_WRITE = "break-guest-write"
    #: the guest write goes on and the snapshot breaks (its reads fail with EACCES)
    BREAK_SNAPSHOT = "break-snapshot"


class CopyReadError(OSError):
    """Reading the old data from the source failed (the job's ``on-source-error`` applies)."""


class CopyWriteError(OSError):
    """Writing the old data to the target failed (the job's ``on-target-error`` applies)."""


#: the largest single copy I/O: whole runs of clusters are copied in pieces of this size
MAX_COPY_BYTES = 4 << 20
#: how far ahead a sequential writer's copies reach: one large copy instead of many small ones
#: (the first window: see :mod:`fleece.block.copy_ahead`)
COPY_AHEAD_BYTES = 2 << 20
#: the pieces a sequential writer's window is copied in beside it (each under its own lock, so
#: the writer waits for at most one piece; 4 MiB halves 2 MiB's trips through Python, and
#: measured no slower; 8 MiB no faster)
AHEAD_PIECE_BYTES = 4 << 20
#: how much old data a backup job's hook may hold in memory while its target write is pending
WRITE_BEHIND_BYTES = 4 << 20


def _host_run(node: BlockNode, offset: int, length: int) -> tuple[int, int] | None:
    """``(fd, host offset)`` when ``node``'s ``[offset, offset + length)`` is one run of a
    host file, following ``host_map`` down (settled mappings only); else None."""
    at = offset
    while True:
        fd = node.driver.posix_fd()
        if fd is not None:
            return fd, at
        found = node.host_map(at, length)
        if found is None or found.length < length or found.unless_done is not None:
            return None
        node, at = found.node, found.offset


class CopyBeforeWrite:
    """The copy-before-write state between one source and one target.

    The filter node that owns it calls :meth:`before_write` before every write to the source,
    guards the target's reads with :meth:`guard_target` when the target reads through to the
    source, and calls :meth:`detach` when it closes. ``on_error`` decides what a failed copy in
    the guest's write path does: by default the error propagates and fails the guest write, so
    the snapshot is never silently wrong.

    ``write_behind`` (bytes; 0, the default here, turns it off) lets the guest's copies finish
    their target write after the guest write went on, holding at most that much old data in
    memory (see the module's docstring for what it changes on failure).

    ``copy_ahead`` (bytes; 0 turns it off) lets a write that continues the previous one copy
    that far ahead in one I/O: sequential guest writes then pay for one large copy instead of
    one per cluster, at the price of copying up to that much the guest may never overwrite.
    While the writer stays sequential the window grows (:mod:`fleece.block.copy_ahead`).
    """

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        cluster_size: int,
        *,
        done: ClusterBitmap | None = None,
        copy_ahead: int = COPY_AHEAD_BYTES,
        write_behind: int = 0,
        on_error: CbwErrorPolicy = CbwErrorPolicy.BREAK_GUEST_WRITE,
        timeout: float = 0.0,
        size_limit: int = 0,
    ) -> None:
        if cluster_size <= 0 or cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster size must be a power of two, got {cluster_size}")
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.size = source.size
        self.nclusters = (self.size + cluster_size - 1) // cluster_size
        self.done = cluster_bitmap.ClusterBitmap(self.nclusters) if done is None else done
        if len(self.done) != self.nclusters:
            raise ValueError(
                f"done bitmap has {len(self.done)} clusters, the source needs {self.nclusters}"
            )
        self.copied_clusters = 0
        self.copied_bytes = 0
        #: write zeroes into the target where the source reads zeroes (False: copy them as
        #: data, for a target whose unallocated clusters must never read through to anything)
        self.sparse = True
        #: called with the bytes each copy moved (the job counts them as progress)
        self.on_copy: list[Callable[[int], None]] = []
        self._max_run = max(1, MAX_COPY_BYTES // cluster_size)
        #: where a sequential writer's copies reach
        self.ahead = CopyAhead(copy_ahead // cluster_size, self.nclusters)
        #: copies the rest of a window beside the writer (None: the guest's copy takes it all;
        #: a timeout bounds the guest's copy, which must then be the whole of it)
        self._ahead_copier = (AheadCopier(self._copy_piece, self._copy_further)
                              if copy_ahead > cluster_size and not timeout else None)
        #: the clusters the copier holds, not copied yet: a native write there may wait for
        #: the copy instead of going to Python (set and cleared under ``locks.mutex``)
        self.pending = cluster_bitmap.ClusterBitmap(self.nclusters)
        self._waits_seen = 0  # the writer's waits the copier last saw (its thread's alone)
        #: copies may go host file to host file in the kernel (``copy_file_range``): with the
        #: native data plane, as part of the native I/O it turns off (the Python path, the
        #: oracle, copies through memory)
        self._in_kernel = route.available()
        self._buffers = threading.local()
        #: the target writes finishing after the guest went on (None: copies are synchronous);
        #: a timeout needs the copy's outcome before the guest write, so none with one
        self._behind = (WriteBehind(write_behind, self._landed, self._landing_failed)
                        if write_behind > 0 and not timeout else None)
        #: called with the error when a write-behind target write fails under break-guest-write:
        #: the guest write it should have failed went on, so the snapshot broke instead
        self.on_late_failure: list[Callable[[OSError], None]] = []
        self.locks = ClusterRangeLocks()
        #: ``depth`` > 0 in a thread inside a snapshot hold: a nested read (the target under
        #: snapshot-access) must not queue for the same shared lock behind a waiting writer
        self._holding = threading.local()
        self._guard: SnapshotGuard | None = None  # on the target, while it reads through
        self.on_error = on_error
        #: seconds a copy may take before it counts as failed (0: no limit; break-snapshot only)
        self.timeout = timeout
        #: bytes the target may receive (0: no limit); past it, a copy fails with ENOSPC
        self.size_limit = size_limit
        self._claimed = 0  # bytes of the limit held by copies under way (see _room)
        #: why the snapshot broke, or None while it is valid
        self.broken: str | None = None
        #: clusters the snapshot still holds (a discard through snapshot-access drops them)
        self.access = cluster_bitmap.ClusterBitmap(self.nclusters)
        self.access.set_range(0, self.nclusters)

    # -- installation ------------------------------------------------------------------------
    def guard_target(self) -> None:
        """Guard reads (and block status) of the target, which reads through to the source
        (the backing scheme). Call it with the target drained."""
        if self._guard is None:
            self._guard = SnapshotGuard(self)
            self.target.read_guard = self._guard

    def detach(self) -> None:
        """The filter is closing (drained): copies ahead not started are dropped, pending
        write-behind copies land in the target, and the target's guard goes (its reads now read
        through to the live source)."""
        if self._ahead_copier is not None:
            self._ahead_copier.close()
        if self._behind is not None:
            self._behind.close()
        if self._guard is not None:
            if self.target.read_guard is self._guard:
                self.target.read_guard = None
            self._guard = None

    # -- clusters and locks ------------------------------------------------------------------
    def clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The cluster range ``[first, end)`` covering the byte range."""
        first = offset // self.cluster_size
        end = min(self.nclusters, -(-(offset + length) // self.cluster_size))
        return first, max(first, end)

    def uniform_length(self, offset: int, length: int) -> int:
        """The longest start of ``[offset, offset + length)`` whose clusters are all copied or
        all not: a guarded block status walk holds (and asks about) only that much, rather
        than locking and counting the whole rest of a large query at every extent."""
        cluster = self.cluster_size
        first = offset // cluster
        end = min(self.nclusters, -(-(offset + length) // cluster))
        if first >= end:
            return length
        done = self.done
        change = done.next_clear(first) if done.get(first) else done.next_set(first)
        # Read without a lock: a copy may set the first bit between the two looks, so that
        # the "change" is the first cluster itself. One cluster is then the span (any span
        # is correct; this is only how much one step holds).
        run_end = end if change < 0 or change >= end else max(change, first + 1)
        return min(length, run_end * cluster - offset)

    def all_done(self, first: int, end: int) -> bool:
        return self.done.count(first, end) == end - first

    @property
    def copies_pending(self) -> bool:
        """True while some write-behind copy may not be in the target yet."""
        return self._behind is not None and self._behind.pending()

    def _settled(self, first: int, end: int) -> bool:
        """All of ``[first, end)`` is done and in the target: a snapshot read needs no lock.

        The order matters: a copy counts itself pending before it marks its clusters done, so
        a reader that sees them done and nothing pending knows their target write finished.
        """
        return self.all_done(first, end) and not self.copies_pending

    def snapshot_map(self, offset: int, length: int) -> HostMap | None:
        """Where the snapshot's bytes from ``offset`` lie, for a reader below the graph (see
        :class:`~fleece.block.driver.HostMap`): copied clusters in the target for good (no
        copy pending), uncopied ones in the source for as long as their bits stay clear.
        None while the snapshot is broken or the range is no longer all in it."""
        if self.broken is not None:
            return None
        first, end = self.clusters(offset, length)
        if first >= end:
            return None
        span = self.uniform_length(offset, length)
        first, end = self.clusters(offset, span)
        if self.access.count(first, end) != end - first:
            return None
        if not self.done.get(first):
            return HostMap(span, self.source, offset, self.done, self.cluster_size, data=False)
        if self.copies_pending or not self.all_done(first, end):
            return None
        return HostMap(span, self.target, offset, data=False)

    def read_through_map(self, offset: int, length: int) -> HostMap | None:
        """The target (backing scheme) reads ``[offset, offset + length)`` through to the
        source: the source's bytes for the clusters not copied yet (see
        :meth:`snapshot_map`)."""
        if self.broken is not None:
            return None
        first, end = self.clusters(offset, length)
        if first >= end or self.done.get(first) or offset + length > self.source.size:
            return None
        return HostMap(length, self.source, offset, self.done, self.cluster_size)

    # -- the write path ----------------------------------------------------------------------
    def before_write(self, offset: int, length: int) -> None:
        """Before a write to the source: copy what it would destroy. Raises ``OSError``."""
        if self._behind is not None:
            self._behind.reap()  # what landed since the last write
        first, end = self.clusters(offset, length)
        if first >= end or self.broken is not None or self.all_done(first, end):
            self.ahead.passed(offset, length)
            return
        # Only clusters not done yet are copied, and an extra copy is still point-in-time
        # data: copying ahead of a sequential writer is safe.
        needed = end
        first, end = self.ahead.plan(offset, length, first, end)
        if end > needed and self._ahead_copier is not None:
            self._copy_beside(needed, end)
            end = needed
        if self.on_error is CbwErrorPolicy.BREAK_SNAPSHOT:
            self._copy_or_break(first, end)
        else:
            self._guest_copy(first, end)

    def _copy_beside(self, first: int, end: int) -> None:
        """Hand ``[first, end)`` to the copier thread in pieces, each locked here first (without
        waiting: a piece someone else holds is left to whoever writes it)."""
        copier = self._ahead_copier
        assert copier is not None
        step = max(1, AHEAD_PIECE_BYTES // self.cluster_size)
        for at in range(first, end, step):
            stop = min(end, at + step)
            if self.all_done(at, stop):
                continue
            token = self.locks.try_exclusive(at, stop)
            if token is None:
                continue
            with self.locks.mutex:
                self.pending.set_range(at, stop - at)
            release = partial(self._piece_copied, at, stop, token)
            if not copier.submit(at, stop, release):
                release()
                return

    def _copy_further(self) -> bool:
        """The copier thread finished its pieces: when the writer waited for them meanwhile
        (natively, counted in ``pending``, or here), queue the next window (True)."""
        waits = self.pending.waits + self.ahead.caught_up
        if self.broken is not None or waits == self._waits_seen:
            return False
        self._waits_seen = waits
        window = self.ahead.extend()
        if window is None:
            return False
        self._copy_beside(*window)
        return True

    def _piece_copied(self, first: int, end: int, token: int) -> None:
        """A piece is copied (or given up): no write waits for it any more, and its lock
        goes. Its copied bits, if any, were set before."""
        with self.locks.mutex:
            self.pending.clear_range(first, end - first)
        self.locks.release(token)

    def _copy_piece(self, first: int, end: int) -> None:
        """A piece of a window, copied by the copier thread (its exclusive lock held)."""
        if self.broken is None:
            self._copy_runs(first, end)

    def _guest_copy(self, first: int, end: int) -> None:
        """The copy a guest write waits for: write-behind when it is on, else synchronous."""
        if self._behind is not None:
            self._copy_behind(first, end)
        else:
            self.copy_clusters(first, end)

    def _copy_or_break(self, first: int, end: int) -> None:
        """break-snapshot: the guest write always goes on; a copy that fails (or outlasts
        ``timeout``) breaks the snapshot instead."""
        if not self.timeout:
            try:
                self._guest_copy(first, end)
            except OSError as exc:
                self.break_snapshot(f"copy-before-write failed: {exc}")
            return
        outcome: list[BaseException | None] = []
        finished = threading.Event()

        def copy() -> None:
            try:
                self.copy_clusters(first, end)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
            finished.set()

        threading.Thread(target=copy, name="fleece-cbw-copy", daemon=True).start()
        if not finished.wait(self.timeout):
            self.break_snapshot(f"copy-before-write timed out after {self.timeout} s")
        elif outcome and outcome[0] is not None:
            self.break_snapshot(f"copy-before-write failed: {outcome[0]}")

    def break_snapshot(self, reason: str) -> None:
        """Give up the snapshot (break-snapshot): its reads fail with EACCES from now on."""
        if self.broken is None:
            self.broken = reason
            self.target.invalidate_routes()  # native reads of copied clusters stop too

    def copy_clusters(self, first: int, end: int) -> int:
        """Copy the clusters of ``[first, end)`` not yet done; returns the bytes copied."""
        with self.locks.locked(first, end, exclusive=True):
            return self._copy_runs(first, end)

    def _copy_runs(self, first: int, end: int) -> int:
        """Copy the clusters of ``[first, end)`` not yet done (exclusive lock held); returns
        the bytes copied."""
        copied = 0
        for run_first, count in cbw_plan.plan_runs(self.done, first, end, self._max_run):
            copied += self._copy_run(run_first, count)
        return copied

    def _copy_run(self, first: int, count: int) -> int:
        """Copy a run of clusters not done (exclusive lock held); returns its bytes."""
        copied = 0
        for piece_first, piece_count, zero in self._pieces(first, count):
            offset, length = self._run_bytes(piece_first, piece_count)
            with self._room(length):
                if zero:
                    self._zero_old(piece_first, piece_count, offset, length)
                elif not self._copy_in_kernel(piece_first, piece_count, offset, length):
                    buf = self._buffer(length)
                    self._read_old(offset, buf)
                    self._write_old(piece_first, piece_count, offset, buf)
            copied += length
        return copied

    def _copy_in_kernel(self, first: int, count: int, offset: int, length: int) -> bool:
        """Copy a piece in the kernel when the source maps it onto one run of a host file
        (exclusive lock held, so the source cannot change meanwhile): with
        ``copy_file_range``, page cache to page cache, when the target takes a direct write
        of it; else from the file to the target's socket when it can send one (a push to an
        ``nbd`` node: ``sendfile``), instead of a read into memory and a write out of it.
        False when it cannot (nothing was copied); raises ``CopyReadError``/``CopyWriteError``
        as the two halves would."""
        if not self._in_kernel:
            return False
        source = _host_run(self.source, offset, length)
        if source is None:
            return False
        fd, host = source
        direct = self._reserve_target(offset, length)
        if direct is None:
            try:
                if not self.target.pwrite_from_file(offset, fd, host, length):
                    return False
            except OSError as exc:
                raise CopyWriteError(exc.errno, f"copy-before-write write failed: {exc}") from exc
            self._copied(first, count, length)
            return True
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(fd, direct.fd, length - done, host + done,
                                       direct.host + done)
                if n == 0:  # the source file ends inside its mapping: not ours to guess
                    raise OSError(errno.EIO, "the source's host file is shorter than its map")
                done += n
        except OSError as exc:
            direct.finish(False)
            if exc.errno in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return False  # this pair of files cannot: copy through memory
            raise CopyWriteError(exc.errno, f"copy-before-write copy failed: {exc}") from exc
        try:
            direct.finish(True)
        except OSError as exc:
            raise CopyWriteError(exc.errno, f"copy-before-write write failed: {exc}") from exc
        self._copied(first, count, length)
        return True

    def _pieces(self, first: int, count: int) -> list[tuple[int, int, bool]]:
        """Split a run into ``(first, count, reads_zero)`` pieces by the source's block status
        (exclusive lock held, so the status cannot change before the copy)."""
        if not self.sparse:
            return [(first, count, False)]
        end = first + count
        pieces: list[tuple[int, int, bool]] = []
        at = first
        for zero_first, zero_end in self._zero_clusters(first, end, strict=False):
            if at < zero_first:
                pieces.append((at, zero_first - at, False))
            pieces.append((zero_first, zero_end - zero_first, True))
            at = zero_end
        if at < end:
            pieces.append((at, end - at, False))
        return pieces

    def _zero_old(self, first: int, count: int, offset: int, length: int) -> None:
        """Make a run that reads as zeroes in the source read as zeroes in the target, then
        count it copied."""
        try:
            self.target.pwrite_zeroes(offset, length, may_unmap=True)
        except OSError as exc:
            raise CopyWriteError(exc.errno, f"copy-before-write write failed: {exc}") from exc
        self._copied(first, count, length)

    def _write_old(self, first: int, count: int, offset: int, data: memoryview) -> None:
        """Write a run's old data into the target, then count it copied."""
        try:
            self.target.pwrite(offset, data)
        except OSError as exc:
            raise CopyWriteError(exc.errno, f"copy-before-write write failed: {exc}") from exc
        self._copied(first, count, len(data))

    def _run_bytes(self, first: int, count: int) -> tuple[int, int]:
        """The byte range of a run of clusters."""
        offset = first * self.cluster_size
        return offset, min(count * self.cluster_size, self.size - offset)

    @contextmanager
    def _room(self, length: int) -> Iterator[None]:
        """Hold ``length`` bytes of the target's size limit for a copy under way (``ENOSPC``
        past it): copies running at once (guest writes, the job, the copier thread) count
        each other's bytes before any of them is marked copied, so together they cannot pass
        the limit."""
        if not self.size_limit:
            yield
            return
        with self.locks.mutex:
            if self.copied_bytes + self._claimed + length > self.size_limit:
                raise CopyWriteError(
                    errno.ENOSPC,
                    f"the fleecing target would exceed its size limit of {self.size_limit} "
                    "bytes",
                )
            self._claimed += length
        try:
            yield
        finally:
            with self.locks.mutex:
                self._claimed -= length

    def _read_old(self, offset: int, buf: memoryview) -> None:
        try:
            self.source.pread_into(offset, buf)
        except OSError as exc:
            raise CopyReadError(exc.errno, f"copy-before-write read failed: {exc}") from exc

    # -- write-behind ------------------------------------------------------------------------
    def _copy_behind(self, first: int, end: int) -> None:
        """The guest's copy with write-behind: under the exclusive lock, read the old data of
        the clusters not done yet, reserve their target range, mark them done and hand the
        write to the writer thread. Raises (marking nothing) if the data cannot be read or
        the range reserved; a target that cannot take a direct write is written here."""
        behind = self._behind
        assert behind is not None
        with self.locks.locked(first, end, exclusive=True):
            for piece_first, piece_count, zero in self._planned_pieces(first, end):
                self._copy_piece_behind(behind, piece_first, piece_count, zero)

    def _planned_pieces(self, first: int, end: int) -> Iterator[tuple[int, int, bool]]:
        for run_first, count in cbw_plan.plan_runs(self.done, first, end, self._max_run):
            yield from self._pieces(run_first, count)

    def _copy_piece_behind(self, behind: WriteBehind, run_first: int, count: int,
                           zero: bool) -> None:
        """One piece of :meth:`_copy_behind` (exclusive lock held). Zeroes are written here:
        a metadata update, with nothing to gain from the writer thread."""
        offset, length = self._run_bytes(run_first, count)
        with self._room(length):
            if zero:
                self._zero_old(run_first, count, offset, length)
                return
            buf = behind.buffer(length)
            if buf is not None:
                self._copy_old_behind(behind, run_first, count, offset, length, buf)
                return
        self._copy_run(run_first, count)  # detached meanwhile (it holds its own room)

    def _copy_old_behind(self, behind: WriteBehind, run_first: int, count: int, offset: int,
                         length: int, buf: bytearray) -> None:
        """Read the old data into ``buf`` and hand its target write to the writer thread (or
        write it here when the target takes no direct write); ``buf`` goes back if unused."""
        submitted = False
        try:
            view = memoryview(buf)[:length]
            self._read_old(offset, view)
            direct = self._reserve_target(offset, length)
            if direct is not None:
                submitted = behind.submit(
                    Landing(run_first, count, buf, length, direct),
                    partial(self._mark_copied, run_first, count, length),
                )
                if not submitted:
                    direct.finish(False)
            if not submitted:
                self._write_old(run_first, count, offset, view)
        finally:
            if not submitted:
                behind.give_back(buf, length)

    def _reserve_target(self, offset: int, length: int) -> DirectWrite | None:
        try:
            return self.target.begin_direct_write(offset, length)
        except OSError as exc:
            raise CopyWriteError(exc.errno, f"copy-before-write write failed: {exc}") from exc

    def _copied(self, first: int, count: int, length: int) -> None:
        """A run is in the target: mark it copied and tell whoever counts the copies."""
        self._mark_copied(first, count, length)
        for callback in self.on_copy:
            callback(length)

    def _mark_copied(self, first: int, count: int, length: int) -> None:
        with self.locks.mutex:  # the bitmap's word updates are not atomic; neither are the counters
            self.done.set_range(first, count)
            self.copied_clusters += count
            self.copied_bytes += length

    def _landed(self, landing: Landing) -> None:
        for callback in self.on_copy:
            callback(landing.length)

    def _landing_failed(self, landing: Landing, exc: OSError) -> None:
        self.break_snapshot(f"copy-before-write failed after the guest write went on: {exc}")
        if self.on_error is CbwErrorPolicy.BREAK_GUEST_WRITE:
            for callback in self.on_late_failure:
                callback(exc)

    def _buffer(self, length: int) -> memoryview:
        """A per-thread buffer reused for copies (copies never nest within a thread)."""
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < length:
            buf = bytearray(length)  # grown on demand: a big buffer per thread costs RSS
            self._buffers.buf = buf
        return memoryview(buf)[:length]

    def drain(self) -> None:
        """Wait until every copy ahead and write-behind copy so far has landed in the target."""
        if self._ahead_copier is not None:
            self._ahead_copier.idle()
        if self._behind is not None:
            self._behind.await_range(0, self.nclusters)

    def skip_zeroes(self, first: int, end: int, *, target_reads_zero: bool) -> int:
        """Declare done the clusters of ``[first, end)`` not done yet that read as zeroes in
        the source, making the target read zeroes there too (unless ``target_reads_zero``:
        a fresh target without backing). Returns the bytes so handled.

        Runs under the exclusive lock and re-reads the source's status there, so a guest write
        that the hook copied meanwhile is never zeroed away in the target.
        """
        handled = 0
        with self.locks.locked(first, end, exclusive=True):
            for run_first, count in cbw_plan.plan_runs(self.done, first, end, self._max_run):
                for zero_first, zero_end in self._zero_clusters(run_first, run_first + count):
                    offset = zero_first * self.cluster_size
                    length = min(zero_end * self.cluster_size, self.size) - offset
                    if not target_reads_zero:
                        self.target.pwrite_zeroes(offset, length, True)
                    with self.locks.mutex:
                        self.done.set_range(zero_first, zero_end - zero_first)
                    handled += length
        return handled

    def _zero_clusters(self, first: int, end: int, *,
                       strict: bool = True) -> list[tuple[int, int]]:
        """The whole clusters of ``[first, end)`` that read as zeroes in the source, in order.

        A failed status query raises ``OSError`` if ``strict``; else what follows it counts
        as data (as in QEMU's block-copy: copying data is always right, only slower).
        """
        cluster = self.cluster_size
        offset = first * cluster
        length = min(end * cluster, self.size) - offset
        ranges: list[tuple[int, int]] = []
        try:
            for status in self.source.extents(offset, length):
                if not status.zero:
                    continue
                status_end = status.offset + status.length
                zero_first = -(-status.offset // cluster)
                at_end = status_end >= self.size  # a partial last cluster counts as whole
                zero_end = min(end, self.nclusters if at_end else status_end // cluster)
                if zero_first < zero_end:
                    ranges.append((zero_first, zero_end))
        except OSError:
            if strict:
                raise
        return ranges

    def mark_done(self, first: int, count: int) -> None:
        """Declare clusters done without copying (outside the job's scope, or read as zero)."""
        with self.locks.locked(first, first + count, exclusive=True), self.locks.mutex:
            self.done.set_range(first, count)

    # -- snapshot-access: reads routed by the done bitmap -------------------------------------
    def read_snapshot(self, offset: int, buf: memoryview) -> None:
        """Read the snapshot: done clusters from the target, the others from the source while
        holding them against guest writes. ``EACCES`` once the snapshot broke, and for
        clusters it no longer holds (discarded, or outside its bitmap)."""
        if self.broken is not None:
            raise OSError(errno.EACCES, f"the snapshot is broken: {self.broken}")
        first, end = self.clusters(offset, len(buf))
        if self.access.count(first, end) != end - first:
            raise OSError(errno.EACCES, "the range is not part of the snapshot (discarded or "
                          "outside its bitmap)")
        guard = nullcontext() if self._settled(first, end) else self._snapshot_hold(first, end)
        with guard:
            stop = offset + len(buf)
            for run_first, count, done in self.done.runs(first, end):
                lo = max(offset, run_first * self.cluster_size)
                hi = min(stop, (run_first + count) * self.cluster_size)
                part = buf[lo - offset : hi - offset]
                (self.target if done else self.source).pread_into(lo, part)
        if self.broken is not None:  # broke while we read: what we read may be wrong
            raise OSError(errno.EACCES, f"the snapshot is broken: {self.broken}")

    def discard_snapshot(self, offset: int, length: int) -> None:
        """Drop whole clusters from the snapshot: no more copies there, the target's copy is
        discarded, and reads of them fail from now on."""
        first = -(-offset // self.cluster_size)
        end = min(self.nclusters, (offset + length) // self.cluster_size)
        if offset + length >= self.size:
            end = self.nclusters
        if first >= end:
            return
        with self.locks.locked(first, end, exclusive=True):
            if self._behind is not None:
                self._behind.await_range(first, end)  # a late copy must not undo the discard
            with self.locks.mutex:
                self.access.clear_range(first, end - first)
                self.done.set_range(first, end - first)
            start = first * self.cluster_size
            self.target.pdiscard(start, min(end * self.cluster_size, self.size) - start)

    # -- the snapshot read path --------------------------------------------------------------
    def read_guard(self, offset: int, length: int) -> AbstractContextManager[None]:
        """Hold a read of the target (the snapshot, in the backing scheme) against the guest
        writes it would read through to. ``EACCES`` once the snapshot broke: reading through
        would return what the guest wrote since."""
        first, end = self.clusters(offset, length)
        settled = (first >= end or getattr(self._holding, "depth", 0) > 0
                   or self._settled(first, end))
        # After _settled: a copy that failed breaks the snapshot before it stops being pending.
        if self.broken is not None:
            raise OSError(errno.EACCES, f"the snapshot is broken: {self.broken}")
        return nullcontext() if settled else self._snapshot_hold(first, end)

    @contextmanager
    def _snapshot_hold(self, first: int, end: int) -> Iterator[None]:
        """What a snapshot read of clusters ``[first, end)`` holds: a shared lock against
        guest writes, and no write-behind copy of them pending (the target has their data)."""
        with self._shared(first, end), self._held():
            if self._behind is not None:
                if self._behind.pending():
                    self._behind.await_range(first, end)
                # Checked even with nothing pending: the copy of these clusters may have
                # failed (and stopped being pending) since the caller last looked.
                if self.broken is not None:
                    raise OSError(errno.EACCES, f"the snapshot is broken: {self.broken}")
            yield
            if self.broken is not None:  # broke while we read: the source may have moved on
                raise OSError(errno.EACCES, f"the snapshot is broken: {self.broken}")

    @contextmanager
    def _held(self) -> Iterator[None]:
        holding = self._holding
        holding.depth = getattr(holding, "depth", 0) + 1
        try:
            yield
        finally:
            holding.depth -= 1

    def _shared(self, first: int, end: int) -> AbstractContextManager[None]:
        """A shared hold on clusters ``[first, end)`` for a snapshot read. A read that must not
        wait (the NBD loop thread, inside :func:`fleece.block.nowait.nowait`) takes it only if
        it is free now, else raises ``WouldBlock`` and an I/O thread does the read."""
        if nowait.active():
            held = self.locks.try_shared(first, end)
            if held is None:
                raise nowait.WouldBlock
            return held
        return self.locks.locked(first, end, exclusive=False)


class SnapshotGuard:
    """The read guard a :class:`CopyBeforeWrite` puts on a target that reads through to the
    source (``node.read_guard``): reads and block status walks of the target hold it."""

    def __init__(self, cbw: CopyBeforeWrite) -> None:
        self.cbw = cbw

    def hold(self, offset: int, length: int) -> AbstractContextManager[None]:
        return self.cbw.read_guard(offset, length)

    def span(self, offset: int, length: int) -> int:
        return self.cbw.uniform_length(offset, length)

    def read_through_map(self, offset: int, length: int) -> HostMap | None:
        return self.cbw.read_through_map(offset, length)
