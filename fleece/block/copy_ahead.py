"""Copy-ahead: how far a sequential writer's copy-before-write copies reach.

Design note: QEMU copies exactly the clusters a guest write overwrites, one copy per write. A
writer that goes on sequentially will overwrite what follows as well, so fleece copies ahead
in large I/Os: windows of ``base`` clusters, doubling while the writer keeps on, up to
``GROWTH`` times, as a kernel's readahead window grows. The write that opens a window waits
only for its own clusters (and those of the requests in flight before it); the rest of the
window is copied beside it (:mod:`fleece.block.ahead_copier`), and the writer's next requests
wait for that copy natively. When the copier runs out of pieces while the writer is right
behind it (a write waited for a piece: the writer is faster than the copy), it goes on to the
next window itself (:meth:`CopyAhead.extend`) instead of idling until the writer's next trip
through Python opens one: on two cores the copy then runs without a gap, the writer on its
heels.

A writer counts as sequential when its write starts where its previous one seen here ended,
or just past the last window: its writes inside a window are served natively, never seen
here, and a few of them may arrive out of order (``SLACK`` clusters). A write inside the last
window (one that reached copy-before-write before the copy of its clusters) copies its own
clusters only. An extra copy is still point-in-time data, so a wrong guess costs space in the
target, never correctness.

(Copying the next window before the writer reached it *unconditionally* was measured and not
kept: device writes gained 10-20 %, writes over NBD lost 10 %, competing with the client and the
plane for this machine's two cores. Going on only while the writer waits for the copy keeps
the copier from running ahead of a writer slower than it.)
"""

from __future__ import annotations

#: clusters past the last window where a write still counts as sequential: a client's
#: requests in flight may reach copy-before-write out of order
SLACK = 16
#: how many times the first window the windows grow to while the writer stays sequential
GROWTH = 8


class CopyAhead:
    """The sequential-writer state of one copy-before-write (a heuristic: its fields are read
    and written without a lock; a race costs an extra or a missed copy-ahead)."""

    def __init__(self, base: int, nclusters: int) -> None:
        #: the first window's clusters (1: copy exactly what is overwritten)
        self.base = max(1, base)
        self.nclusters = nclusters
        self._now = self.base  # the current window's size
        self._last_end = -1  # where the last write seen here ended (bytes)
        self._start = 0  # the first cluster of the last window
        self._end = 0  # the cluster after the last window
        self._sequential = False  # the last write that planned a copy continued the stream
        #: writes that reached a window still being copied (the writer is right behind); the
        #: native plane's such writes are counted in the pending bitmap instead
        self.caught_up = 0

    def passed(self, offset: int, length: int) -> None:
        """A write that needed no copy went by."""
        self._last_end = offset + length

    def extend(self) -> tuple[int, int] | None:
        """The next window, for a copier that finished the last one while the writer was
        right behind it: the clusters after the last window, grown as :meth:`plan` grows
        windows. None when the writer left the stream, or the stream the disk."""
        first = self._end
        if self.base == 1 or not self._sequential or first <= 0 or first >= self.nclusters:
            return None
        self._now = min(self._now * 2, self.base * GROWTH)
        end = min(self.nclusters, first + self._now)
        self._end = end
        return first, end

    def plan(self, offset: int, length: int, first: int, end: int) -> tuple[int, int]:
        """The clusters a write over bytes ``[offset, offset + length)`` (clusters ``[first,
        end)``, some not copied yet) copies before it goes on."""
        window_end = self._end
        if self._start <= first and end <= window_end:
            self.caught_up += 1
            # Inside the last window, whose copy is still under way in the background (see
            # :mod:`fleece.block.ahead_copier`): this write waits for its own clusters only.
            self._last_end = offset + length
            return first, end
        past = 0 < window_end <= first < window_end + SLACK
        sequential = offset == self._last_end or past
        self._last_end = offset + length
        self._sequential = sequential
        if not sequential:
            self._now = self.base
            return first, end
        if self.base == 1:
            return first, end
        if past:
            first = window_end  # the writes still in flight find their clusters copied
            self._now = min(self._now * 2, self.base * GROWTH)
        end = min(self.nclusters, max(end, first + self._now))
        self._start, self._end = first, end
        return first, end
