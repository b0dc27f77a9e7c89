"""Write-behind for copy-before-write: the old data's target write finishes after the guest went on.

A copy-before-write reads the old data (cheap: the page cache) and writes it into the fleecing
target (dear: new clusters, new pages). Write-behind leaves the second half to a native thread
(:mod:`fleece.filewriter`) and lets the guest write go on once the old data is in memory. The
point-in-time invariant still holds, because of how :mod:`fleece.block.cbw` uses this class:

* the copy registers its :class:`Landing` *before* it marks the clusters done, so a reader that
  sees them done and no landing pending knows their data is in the target; it registers it
  only once the writer thread has accepted the data, so nothing counts as done that the writer
  refused (the copy is then made synchronously);
* a reader of clusters with a landing pending waits for it (:meth:`WriteBehind.await_range`)
  while holding them against new copies, then reads the target;
* the target range is reserved as a :class:`~fleece.block.direct.DirectWrite`: nobody else
  writes it, and a qcow2 target maps it only when the data is there;
* a landing stops being pending only once it is finished (its clusters mapped, or the snapshot
  broken), so the lock-free path of a reader never meets a half-finished one.

Landings are *reaped* (their write finished in the target's metadata, their buffer freed, the
owner told) by whichever thread next needs them or passes by: the guest's next write, a reader
waiting for one, a drain of the target, or :meth:`WriteBehind.close`.

Both limits hold from the first buffer handed out, before any landing exists: at most ``depth``
buffers (the writer's ring) are out between :meth:`WriteBehind.buffer` and their landing's reap,
so a submit always finds a slot; at most ``budget`` bytes of old data wait in memory (a single
copy over the budget goes alone). A copy without room waits for the oldest landing, or for a
buffer handed out to be submitted or given back; :meth:`WriteBehind.close` wakes it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fleece._pure.filewriter import write_all
from fleece.block import direct, nowait
from fleece.block.direct import DirectWrite
from fleece.filewriter import FileWriter
from fleece.heap import register_cache

#: writes the writer thread's ring holds (:class:`~fleece.filewriter.FileWriter`'s default)
DEPTH = 64


class _BufferPool:
    """Old-data buffers kept between write-behinds (a backup job that follows another reuses
    them): a fresh buffer costs its zeroing and its page faults on every copy that uses it.
    In the daemon they go back to the system after a quarter second unused (:mod:`fleece.heap`).
    """

    def __init__(self, keep_bytes: int) -> None:
        self._keep = keep_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._taken = False  # since the last release_idle
        register_cache(self)

    def take(self) -> bytearray | None:
        with self._lock:
            self._taken = True
            return self._free.pop() if self._free else None

    def release_idle(self) -> None:
        with self._lock:
            if not self._taken:
                self._free = []
            self._taken = False

    def give(self, buffers: list[bytearray]) -> None:
        with self._lock:
            kept = sum(len(b) for b in self._free)
            for buf in buffers:
                if kept + len(buf) <= self._keep:
                    self._free.append(buf)
                    kept += len(buf)


_POOL = _BufferPool(8 << 20)


@dataclass(eq=False)
class Landing:
    """Clusters ``[first, first + count)`` whose old data waits in ``buf`` for its write."""

    first: int
    count: int
    buf: bytearray
    length: int
    direct: DirectWrite
    ticket: int = -1


class WriteBehind:
    """The landings of one copy-before-write and the native thread writing them.

    Room is counted from the first buffer on: every buffer handed out and not given back
    takes a slot of the writer's ring until its landing is reaped, so at most ``depth`` are out
    at once and a submit always finds its slot; their bytes count against ``budget`` until
    then too (a single copy bigger than the budget goes when nothing else is held).
    """

    def __init__(
        self,
        budget: int,
        on_landed: Callable[[Landing], None],
        on_failed: Callable[[Landing, OSError], None],
        depth: int = DEPTH,
    ) -> None:
        if budget <= 0:
            raise ValueError(f"a write-behind budget must be positive, got {budget}")
        if depth <= 0:
            raise ValueError(f"a write-behind depth must be positive, got {depth}")
        self.budget = budget
        self.depth = depth
        self._on_landed = on_landed
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a buffer given back or submitted, closed
        self._writer: FileWriter | None = None  # started by the first buffer
        self._landings: deque[Landing] = deque()  # in ticket order; each accepted by the writer
        self._held = 0  # bytes of buffers handed out and not reaped
        self._unsubmitted = 0  # buffers handed out whose landing is not submitted yet
        self._spare: list[bytearray] = []
        self._asked = False  # a buffer was asked for since the last release_idle
        self._closed = False
        register_cache(self)

    def _keep_spare(self, buf: bytearray) -> None:
        """Keep ``buf`` for the next copy while the spares and the bytes held stay within the
        budget (so the write-behind's buffers never pass it), else let it go."""
        if self._held + sum(len(b) for b in self._spare) + len(buf) <= self.budget:
            self._spare.append(buf)

    def release_idle(self) -> None:
        """Free the spare buffers when none was asked for since the previous call: the guest
        stopped writing to uncopied clusters for a while (in the daemon, a quarter second;
        they were kept for as long as fleecing ran, 6 MiB in compare_qemu's scenario)."""
        with self._lock:
            if not self._asked:
                self._spare = []
            self._asked = False

    def pending(self) -> bool:
        """True while some landing has not been reaped (its data may not be in the target)."""
        return bool(self._landings)

    # -- the copy's side ---------------------------------------------------------------------
    def buffer(self, length: int) -> bytearray | None:
        """A buffer of at least ``length`` bytes for old data, once the writer's ring and the
        budget have room for it (the oldest landing is waited for, or a buffer handed out
        meanwhile to be submitted or given back); None once closed, or when the writer thread
        cannot start (copy synchronously).
        The caller must :meth:`submit` it or :meth:`give_back` it before asking for another."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                writer = self._writer
                if writer is None:
                    try:
                        writer = self._writer = FileWriter(self.depth)
                    except (OSError, RuntimeError):  # no thread to be had: copy synchronously
                        return None
                    direct.register_reaper(self)  # a drain of the target may need us to reap
                if self._has_room(writer, length):
                    break
                if not self._landings:  # only buffers not submitted yet: wait for their holders
                    self._room.wait()
                    continue
                oldest = self._landings[0].ticket
                self._lock.release()
                try:
                    writer.wait(oldest)  # without the lock: others submit, reap, give back
                finally:
                    self._lock.acquire()
                self._reap_locked()
            self._held += length
            self._unsubmitted += 1
            self._asked = True
            buf = self._spare.pop() if self._spare else _POOL.take()
        if buf is None or len(buf) < length:
            buf = bytearray(length)
        return buf

    def _has_room(self, writer: FileWriter, length: int) -> bool:
        """Whether one more buffer of ``length`` bytes fits in the ring and the budget."""
        slots = len(self._landings) + self._unsubmitted  # every landing holds a ring slot
        if slots >= min(self.depth, writer.depth):
            return False
        return self._held == 0 or self._held + length <= self.budget

    def give_back(self, buf: bytearray, length: int) -> None:
        """Return a buffer from :meth:`buffer` that no landing took."""
        with self._lock:
            if any(landing.buf is buf for landing in self._landings):
                return  # a landing took it after all (see :meth:`submit`); it frees it
            self._held -= length
            self._unsubmitted -= 1
            if self._closed:
                _POOL.give([buf])
            else:
                self._keep_spare(buf)
            self._room.notify_all()

    def submit(self, landing: Landing, mark_done: Callable[[], None]) -> bool:
        """Hand ``landing`` (on a buffer from :meth:`buffer`) to the writer thread, register
        it, then call ``mark_done`` (which marks its clusters done, and must not fail).

        False, with nothing registered nor marked, once closed or when the writer refuses the
        data: the caller still owns the buffer and ``landing.direct``, and copies
        synchronously. True: the landing owns both; it finishes ``landing.direct`` when reaped.
        """
        with self._lock:
            writer = self._writer
            if self._closed or writer is None:
                return False
            view = memoryview(landing.buf)[: landing.length]
            try:
                # Its slot was counted when the buffer was handed out: this cannot find the
                # ring full; whatever else it refuses leaves no trace.
                landing.ticket = writer.submit(landing.direct.fd, landing.direct.host, view)
            except Exception:
                view.release()
                return False
            self._landings.append(landing)  # before the clusters count as done
            self._unsubmitted -= 1
            self._room.notify_all()
            mark_done()
            return True

    # -- everyone's side ---------------------------------------------------------------------
    def reap(self) -> None:
        """Finish the landings whose data write is done (cheap when there is none)."""
        writer = self._writer
        try:
            oldest = self._landings[0].ticket
        except IndexError:  # none pending (or the last one just reaped by another thread)
            return
        if writer is not None and oldest < writer.written():
            with self._lock:
                self._reap_locked()

    def await_range(self, first: int, end: int) -> None:
        """Wait until no landing over clusters ``[first, end)`` is pending. The caller holds
        those clusters against new copies. In a thread that must not wait (see
        :mod:`fleece.block.nowait`) raise ``WouldBlock`` instead of waiting."""
        while True:
            with self._lock:
                self._reap_locked()
                ticket = next((landing.ticket for landing in self._landings
                               if landing.first < end and first < landing.first + landing.count),
                              None)
                writer = self._writer
            if ticket is None or writer is None:
                return
            if nowait.active():
                raise nowait.WouldBlock
            writer.wait(ticket)

    def close(self) -> None:
        """Land everything pending and stop the writer thread; later buffers are refused (and
        copies waiting for room get None)."""
        with self._lock:
            self._closed = True
            self._room.notify_all()
            writer = self._writer
            if writer is None:
                return
            try:
                while self._landings:
                    writer.wait(self._landings[-1].ticket)
                    self._reap_locked()
            finally:
                writer.close()
                self._writer = None
                direct.unregister_reaper(self)
                _POOL.give(self._spare)
                self._spare = []

    def _reap_locked(self) -> None:
        """Finish every landing the writer is done with, even after one of them raised (the
        first error is raised at the end)."""
        if self._writer is None:
            return
        outcomes = self._writer.reap()
        if not outcomes:
            return
        first_error: BaseException | None = None
        for ticket, error in outcomes:
            landing = self._landings[0]
            assert landing.ticket == ticket, (landing.ticket, ticket)
            try:
                self._land(landing, error)
            except BaseException as exc:  # the owner's callback; the others still land
                first_error = first_error or exc
            finally:
                # Only now: a reader that finds nothing pending reads the target without a
                # lock, so the landing must be mapped (or the snapshot broken) before it goes.
                self._landings.popleft()
        self._room.notify_all()
        if first_error is not None:
            raise first_error

    def _land(self, landing: Landing, error: int) -> None:
        """Complete one landing whose write finished with ``error`` (0: it succeeded)."""
        view = memoryview(landing.buf)[: landing.length]
        if error:  # one retry, here: a transient failure should not cost the snapshot
            error = write_all(landing.direct.fd, landing.direct.host, view)
        try:
            landing.direct.finish(not error)
        except Exception as exc:  # the target's metadata could not map the data
            error = error or getattr(exc, "errno", None) or errno.EIO
        finally:
            view.release()
            self._held -= landing.length
            self._keep_spare(landing.buf)
        if error:
            self._on_failed(landing, OSError(error, os.strerror(error)))
        else:
            self._on_landed(landing)

