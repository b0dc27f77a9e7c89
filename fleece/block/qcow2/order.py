"""The order in which qcow2 metadata reaches stable storage (power loss, not only ``kill -9``).

The page cache keeps the order of writes for a killed process, not for a lost machine: after a
power failure any subset of the writes since the last sync may be on the disk. Two rules make
every such subset a consistent image (leaked clusters at worst), as QEMU's cache dependencies
do:

* **targets before pointers**: what a pointer will make reachable (a refcount increase, the
  contents of a new L2 table, refcount block or table, the file grown to cover new clusters,
  copied-on-write data) is synced before the pointer (an L1 or L2 entry, a refcount table
  entry, a header field) is written;
* **unlinks before decreases**: a pointer write that removed a reference is synced before a
  refcount drops (else a cluster still referenced on disk could be handed out twice).

A header rewrite (:func:`rewrite_header`) is made atomic where it can be: a sector is the unit
a disk writes whole, and a header growing past its first sector would otherwise be torn.

Syncs are lazy: a writer *marks* what it wrote, and the next write that depends on it syncs
only if no sync has completed since the mark. A write path that marks nothing (an allocating
write into clusters whose refcounts a previous sync made durable) syncs nothing.

Targets can also be written *deferred*, for pointers that come later (the driver's next
reservation of clusters, made durable in the background): their mark is kept apart and
joins the others only when :meth:`WriteOrder.adopt` says those pointers are about to come.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

SECTOR = 512


class _Writer(Protocol):
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


class WriteOrder:
    """Marks and barriers for one image file; thread-safe. ``sync`` makes every write issued
    so far durable (the file child's flush); it raises ``OSError``."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._lock = threading.Lock()
        self._started = 0  # syncs started
        self._done = 0  # the highest sync number finished (each covers writes before it)
        self._targets = -1  # a target was written while ``_started`` had this value
        self._pointers = -1  # likewise a pointer
        self._deferring = False  # targets written now are for pointers that come later
        self._deferred = -1  # like ``_targets``, for those

    def wrote_target(self) -> None:
        """A write that later pointers depend on was issued (and has returned)."""
        with self._lock:
            if self._deferring:
                self._deferred = self._started
            else:
                self._targets = self._started

    def begin_deferring(self) -> None:
        """Targets written from now until :meth:`end_deferring` are for pointers that come
        later (the caller holds the image's lock throughout: no other writer interleaves)."""
        with self._lock:
            self._deferring = True
            self._deferred = -1

    def end_deferring(self) -> int:
        """Stop deferring; the mark to :meth:`adopt` before the pointers to those targets."""
        with self._lock:
            self._deferring = False
            return self._deferred

    def adopt(self, mark: int) -> None:
        """Pointers to the targets of a deferred ``mark`` come now: the next one syncs unless
        a sync started after them has finished (say, the one run in the background)."""
        with self._lock:
            self._targets = max(self._targets, mark)

    def wrote_pointer(self) -> None:
        """A pointer write was issued (it may have removed a reference)."""
        with self._lock:
            self._pointers = self._started

    def before_pointer(self) -> None:
        """Call before writing a pointer: syncs if a target written since the last sync
        (while deferring, a deferred one too: a pointer written meanwhile may need it)."""
        if self._done <= max(self._targets, self._deferred if self._deferring else -1):
            self.sync()

    def before_decrease(self) -> None:
        """Call before lowering a refcount: syncs if a pointer was written since the last sync."""
        if self._done <= self._pointers:
            self.sync()

    def sync(self) -> None:
        """Make everything written so far durable (a flush of the image does this)."""
        with self._lock:
            self._started += 1
            number = self._started
        self._sync()
        with self._lock:
            self._done = max(self._done, number)


def rewrite_header(
    io: _Writer, order: WriteOrder, first: bytes, used: int, area: bytes
) -> None:
    """Write ``area`` (a new header, its extensions, its backing name) over the start of the
    image, whose header cluster reads ``first`` and whose old header uses its first ``used``
    bytes, so that a power loss leaves either header.

    The new bytes in sectors the old header does not use go first, and are synced; then the
    sectors that differ are written. That is atomic when they are one sector (the usual case:
    the header and its small extensions, or a bitmaps extension growing into a second
    sector), as QEMU's header writes are not; more is written as QEMU writes it.
    """
    tail = -(-used // SECTOR) * SECTOR
    if len(area) > tail:
        io.write(tail, area[tail:])
        order.wrote_target()
    head = area[:tail]
    changed = [
        k for k in range(0, len(head), SECTOR)
        if head[k : k + SECTOR] != first[k : k + min(SECTOR, len(head) - k)]
    ]
    order.before_pointer()
    if changed:
        io.write(changed[0], head[changed[0] : changed[-1] + SECTOR])
        order.wrote_pointer()
