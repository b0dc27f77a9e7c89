"""Copy-before-write: keep a target holding the point-in-time content of a live source.

The point-in-time invariant, as this module keeps it (``done`` is one bitmap of clusters,
shared by the hook and the job, whose bits only ever go from 0 to 1):

* A write to the source over clusters C takes an *exclusive* lock on C, copies every cluster of
  C not yet done from the source to the target, marks them done, lets go of the lock, and only
  then writes. Once a cluster is done nobody reads it from the source for the snapshot again,
  so the write need not hold the lock.
* A snapshot read of the target over clusters C takes a *shared* lock on C unless all of C is
  done. Done clusters are read from the target; the others read through the target's backing
  link to the source, which cannot change under the shared lock.
* A job copy takes the exclusive lock too, and copies only clusters still not done: no cluster
  is copied twice.

Planning (which runs of a request still need copying) and the lock table are Cython
(:mod:`fleece.cbw_plan`); waiting for a conflicting lock is a ``threading.Condition`` here.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from fleece.bitmap import ClusterBitmap
from fleece.block import nowait
from fleece.block.node import BlockNode
from fleece.block.rangelock import ClusterRangeLocks
from fleece.cbw_plan import plan_runs


class CopyReadError(OSError):
    """Reading the old data from the source failed (the job's ``on-source-error`` applies)."""


class CopyWriteError(OSError):
    """Writing the old data to the target failed (the job's ``on-target-error`` applies)."""


#: the largest single copy I/O: whole runs of clusters are copied in pieces of this size
MAX_COPY_BYTES = 4 << 20
#: how far ahead a sequential writer's copies reach: one large copy instead of many small ones
COPY_AHEAD_BYTES = 1 << 20


class CopyBeforeWrite:
    """The copy-before-write state between one source and one target.

    Install it with :meth:`attach` (a write interceptor on the source, a read guard on the
    target) and remove it with :meth:`detach`. ``copy_error`` decides what a failed copy in the
    guest's write path does: by default the error propagates and fails the guest write, so the
    snapshot is never silently wrong.

    ``copy_ahead`` (bytes; 0 turns it off) lets a write that continues the previous one copy
    that far ahead in one I/O: sequential guest writes then pay for one large copy instead of
    one per cluster, at the price of copying up to that much the guest may never overwrite.
    """

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        cluster_size: int,
        *,
        done: ClusterBitmap | None = None,
        copy_ahead: int = COPY_AHEAD_BYTES,
        on_error: str = "break-guest-write",
        timeout: float = 0.0,
        size_limit: int = 0,
        guard_target: bool = True,
    ) -> None:
        if cluster_size <= 0 or cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster size must be a power of two, got {cluster_size}")
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.size = source.size
        self.nclusters = (self.size + cluster_size - 1) // cluster_size
        self.done = ClusterBitmap(self.nclusters) if done is None else done
        if len(self.done) != self.nclusters:
            raise ValueError(
                f"done bitmap has {len(self.done)} clusters, the source needs {self.nclusters}"
            )
        self.copied_clusters = 0
        self.copied_bytes = 0
        #: called with the bytes each copy moved (the job counts them as progress)
        self.on_copy: list[Callable[[int], None]] = []
        self._max_run = max(1, MAX_COPY_BYTES // cluster_size)
        #: clusters a sequential writer's copy covers (1: copy exactly what is overwritten)
        self.ahead = max(1, copy_ahead // cluster_size)
        self._last_end = -1  # where the previous intercepted write ended
        self._buffers = threading.local()
        self.locks = ClusterRangeLocks()
        self._attached = False
        #: "break-guest-write": a failed copy fails the guest write, the snapshot stays valid;
        #: "break-snapshot": the guest write goes on and the snapshot breaks (reads: EACCES)
        self.on_error = on_error
        #: seconds a copy may take before it counts as failed (0: no limit; break-snapshot only)
        self.timeout = timeout
        #: bytes the target may receive (0: no limit); past it, a copy fails with ENOSPC
        self.size_limit = size_limit
        #: why the snapshot broke, or None while it is valid
        self.broken: str | None = None
        #: clusters the snapshot still holds (a discard through snapshot-access drops them)
        self.access = ClusterBitmap(self.nclusters)
        self.access.set_range(0, self.nclusters)
        self._guard_target = guard_target

    # -- installation ------------------------------------------------------------------------
    def attach(self) -> None:
        """Start intercepting writes to the source and guarding reads of the target."""
        if not self._attached:
            self.source.interceptors.append(self)
            if self._guard_target:
                self.target.read_interceptors.append(_ReadGuard(self))
            self._attached = True

    def detach(self) -> None:
        """Stop intercepting (the job ended). In-flight requests finish under their locks."""
        if self._attached:
            self._attached = False
            self.source.interceptors.remove(self)
            self.target.read_interceptors[:] = [
                g for g in self.target.read_interceptors
                if not (isinstance(g, _ReadGuard) and g.cbw is self)
            ]

    # -- clusters and locks ------------------------------------------------------------------
    def clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The cluster range ``[first, end)`` covering the byte range."""
        first = offset // self.cluster_size
        end = min(self.nclusters, -(-(offset + length) // self.cluster_size))
        return first, max(first, end)

    def all_done(self, first: int, end: int) -> bool:
        return self.done.count(first, end) == end - first


    # -- the write path ----------------------------------------------------------------------
    def intercept(self, node: BlockNode, offset: int, length: int) -> AbstractContextManager[None]:
        """Before a write to the source: copy what it would destroy. Raises ``OSError``."""
        first, end = self.clusters(offset, length)
        sequential = offset == self._last_end
        self._last_end = offset + length
        if first < end and not self.all_done(first, end) and self.broken is None:
            if sequential and self.ahead > 1:
                # A sequential writer will overwrite what follows too: copy it now, in one
                # large I/O, rather than one cluster per write. Only clusters not done yet are
                # copied, and an extra copy is still point-in-time data, so this is safe.
                end = min(self.nclusters, max(end, first + self.ahead))
            if self.on_error == "break-snapshot":
                self._copy_or_break(first, end)
            else:
                self.copy_clusters(first, end)
        return nullcontext()

    def _copy_or_break(self, first: int, end: int) -> None:
        """break-snapshot: the guest write always goes on; a copy that fails (or outlasts
        ``timeout``) breaks the snapshot instead."""
        if not self.timeout:
            try:
                self.copy_clusters(first, end)
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

    def copy_clusters(self, first: int, end: int) -> int:
        """Copy the clusters of ``[first, end)`` not yet done; returns the bytes copied."""
        copied = 0
        with self.locks.locked(first, end, exclusive=True):
            for run_first, count in plan_runs(self.done, first, end, self._max_run):
                copied += self._copy_run(run_first, count)
        return copied

    def _copy_run(self, first: int, count: int) -> int:
        offset = first * self.cluster_size
        length = min(count * self.cluster_size, self.size - offset)
        if self.size_limit and self.copied_bytes + length > self.size_limit:
            raise CopyWriteError(
                errno.ENOSPC,
                f"the fleecing target would exceed its size limit of {self.size_limit} bytes",
            )
        buf = self._buffer(length)
        try:
            self.source.pread_into(offset, buf)
        except OSError as exc:
            raise CopyReadError(exc.errno, f"copy-before-write read failed: {exc}") from exc
        try:
            self.target.pwrite(offset, buf)
        except OSError as exc:
            raise CopyWriteError(exc.errno, f"copy-before-write write failed: {exc}") from exc
        with self.locks.mutex:  # the bitmap's word updates are not atomic; neither are the counters
            self.done.set_range(first, count)
            self.copied_clusters += count
            self.copied_bytes += length
        for callback in self.on_copy:
            callback(length)
        return length

    def _buffer(self, length: int) -> memoryview:
        """A per-thread buffer reused for copies (copies never nest within a thread)."""
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < length:
            buf = bytearray(length)  # grown on demand: a big buffer per thread costs RSS
            self._buffers.buf = buf
        return memoryview(buf)[:length]

    def skip_zeroes(self, first: int, end: int, *, target_reads_zero: bool) -> int:
        """Declare done the clusters of ``[first, end)`` not done yet that read as zeroes in
        the source, making the target read zeroes there too (unless ``target_reads_zero``:
        a fresh target without backing). Returns the bytes so handled.

        Runs under the exclusive lock and re-reads the source's status there, so a guest write
        that the hook copied meanwhile is never zeroed away in the target.
        """
        handled = 0
        with self.locks.locked(first, end, exclusive=True):
            for run_first, count in plan_runs(self.done, first, end, self._max_run):
                for zero_first, zero_end in self._zero_clusters(run_first, run_first + count):
                    offset = zero_first * self.cluster_size
                    length = min(zero_end * self.cluster_size, self.size) - offset
                    if not target_reads_zero:
                        self.target.pwrite_zeroes(offset, length, True)
                    with self.locks.mutex:
                        self.done.set_range(zero_first, zero_end - zero_first)
                    handled += length
        return handled

    def _zero_clusters(self, first: int, end: int) -> list[tuple[int, int]]:
        """The whole clusters of ``[first, end)`` that read as zeroes in the source."""
        cluster = self.cluster_size
        offset = first * cluster
        length = min(end * cluster, self.size) - offset
        ranges = []
        for status in self.source.extents(offset, length):
            if not status.zero:
                continue
            status_end = status.offset + status.length
            zero_first = -(-status.offset // cluster)
            at_end = status_end >= self.size  # a partial last cluster counts as whole
            zero_end = min(end, self.nclusters if at_end else status_end // cluster)
            if zero_first < zero_end:
                ranges.append((zero_first, zero_end))
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
        guard = nullcontext() if self.all_done(first, end) else self._shared(first, end)
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
            with self.locks.mutex:
                self.access.clear_range(first, end - first)
                self.done.set_range(first, end - first)
            start = first * self.cluster_size
            self.target.pdiscard(start, min(end * self.cluster_size, self.size) - start)

    # -- the snapshot read path --------------------------------------------------------------
    def read_guard(self, offset: int, length: int) -> AbstractContextManager[None]:
        first, end = self.clusters(offset, length)
        if first >= end or self.all_done(first, end):
            return nullcontext()
        return self._shared(first, end)

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


class _ReadGuard:
    """The read interceptor a :class:`CopyBeforeWrite` puts on its target."""

    def __init__(self, cbw: CopyBeforeWrite) -> None:
        self.cbw = cbw

    def intercept(self, node: BlockNode, offset: int, length: int) -> AbstractContextManager[None]:
        return self.cbw.read_guard(offset, length)
