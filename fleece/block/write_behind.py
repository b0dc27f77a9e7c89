"""Write-behind for copy-before-write: the old data's target write finishes after the guest went on.

A copy-before-write reads the old data (cheap: the page cache) and writes it into the fleecing
target (dear: new clusters, new pages). Write-behind leaves the second half to a native thread
(:mod:`fleece.filewriter`) and lets the guest write go on once the old data is in memory. The
point-in-time invariant still holds, because of how :mod:`fleece.block.cbw` uses this class:

* the copy registers its :class:`Landing` *before* it marks the clusters done, so a reader that
  sees them done and no landing pending knows their data is in the target;
* a reader of clusters with a landing pending waits for it (:meth:`WriteBehind.await_range`)
  while holding them against new copies, then reads the target;
* the target range is reserved as a :class:`~fleece.block.direct.DirectWrite`: nobody else
  writes it, and a qcow2 target maps it only when the data is there;
* a landing stops being pending only once it is finished (its clusters mapped, or the snapshot
  broken), so the lock-free path of a reader never meets a half-finished one.

Landings are *reaped* (their write finished in the target's metadata, their buffer freed, the
owner told) by whichever thread next needs them or passes by: the guest's next write, a reader
waiting for one, a drain of the target, or :meth:`WriteBehind.close`. At most ``budget`` bytes
of old data wait in memory; a copy over the budget first waits for the oldest landing.
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


class _BufferPool:
    """Old-data buffers kept between write-behinds (a backup job that follows another reuses
    them): a fresh buffer costs its zeroing and its page faults on every copy that uses it."""

    def __init__(self, keep_bytes: int) -> None:
        self._keep = keep_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray | None:
        with self._lock:
            return self._free.pop() if self._free else None

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
    """The landings of one copy-before-write and the native thread writing them."""

    def __init__(
        self,
        budget: int,
        on_landed: Callable[[Landing], None],
        on_failed: Callable[[Landing, OSError], None],
    ) -> None:
        if budget <= 0:
            raise ValueError(f"a write-behind budget must be positive, got {budget}")
        self.budget = budget
        self._on_landed = on_landed
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._writer: FileWriter | None = None  # started by the first landing
        self._landings: deque[Landing] = deque()  # in ticket order
        self._held = 0  # bytes of buffers handed out and not reaped
        self._unsubmitted = 0  # buffers handed out whose landing is not submitted yet
        self._spare: list[bytearray] = []
        self._closed = False

    def pending(self) -> bool:
        """True while some landing has not been reaped (its data may not be in the target)."""
        return bool(self._landings)

    # -- the copy's side ---------------------------------------------------------------------
    def buffer(self, length: int) -> bytearray | None:
        """A buffer of at least ``length`` bytes for old data, once the budget has room (the
        oldest landings are waited for meanwhile); None once closed (copy synchronously)."""
        with self._lock:
            if self._closed:
                return None
            writer = self._writer
            while writer is not None and self._landings and (
                self._held + length > self.budget
                or writer.outstanding() + self._unsubmitted >= writer.depth
            ):
                writer.wait(self._landings[0].ticket)
                self._reap_locked()
            self._held += length
            self._unsubmitted += 1
            buf = self._spare.pop() if self._spare else _POOL.take()
        if buf is None or len(buf) < length:
            buf = bytearray(length)
        return buf

    def give_back(self, buf: bytearray, length: int) -> None:
        """Return a buffer from :meth:`buffer` that no landing took."""
        with self._lock:
            self._held -= length
            self._unsubmitted -= 1
            self._spare.append(buf)

    def submit(self, landing: Landing, mark_done: Callable[[], None]) -> bool:
        """Register ``landing``, call ``mark_done`` (which marks its clusters done), and hand
        its data to the writer thread. False, with nothing done, once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._writer is None:
                self._writer = FileWriter()
                direct.register_reaper(self)  # a drain of the target may need us to reap
            self._landings.append(landing)  # before the clusters count as done
            self._unsubmitted -= 1
            mark_done()
            view = memoryview(landing.buf)[: landing.length]
            landing.ticket = self._writer.submit(landing.direct.fd, landing.direct.host, view)
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
        """Land everything pending and stop the writer thread; later buffers are refused."""
        with self._lock:
            self._closed = True
            writer = self._writer
            if writer is None:
                return
            while self._landings:
                writer.wait(self._landings[-1].ticket)
                self._reap_locked()
            writer.close()
            self._writer = None
            direct.unregister_reaper(self)
            _POOL.give(self._spare)
            self._spare = []

    def _reap_locked(self) -> None:
        if self._writer is None:
            return
        for ticket, error in self._writer.reap():
            landing = self._landings[0]
            assert landing.ticket == ticket, (landing.ticket, ticket)
            try:
                self._land(landing, error)
            finally:
                # Only now: a reader that finds nothing pending reads the target without a
                # lock, so the landing must be mapped (or the snapshot broken) before it goes.
                self._landings.popleft()

    def _land(self, landing: Landing, error: int) -> None:
        """Complete one landing whose write finished with ``error`` (0: it succeeded)."""
        view = memoryview(landing.buf)[: landing.length]
        if error:  # one retry, here: a transient failure should not cost the snapshot
            error = write_all(landing.direct.fd, landing.direct.host, view)
        try:
            landing.direct.finish(not error)
        except OSError as exc:  # the target's metadata could not map the data
            error = error or exc.errno or errno.EIO
        finally:
            view.release()
            self._held -= landing.length
            self._spare.append(landing.buf)
        if error:
            self._on_failed(landing, OSError(error, os.strerror(error)))
        else:
            self._on_landed(landing)

