"""Cluster range locks: shared or exclusive holds on ``[first, end)``, waiting on conflicts.

The table of active locks is Cython (:mod:`fleece.cbw_plan`); this wrapper adds the waiting. Two
locks conflict when their ranges overlap and either is exclusive. Writers are preferred: while an
exclusive request waits, new shared requests over its range wait behind it, so a stream of
snapshot reads can never starve a guest write.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from fleece import cbw_plan


class ClusterRangeLocks:
    """Thread-safe range locks over cluster numbers."""

    def __init__(self) -> None:
        self._table = cbw_plan.RangeLockTable()
        self._waiting = cbw_plan.RangeLockTable()  # exclusive requests waiting for their turn
        self.mutex = threading.Condition(threading.Lock())

    @contextmanager
    def locked(self, first: int, end: int, exclusive: bool) -> Iterator[None]:
        """Hold ``[first, end)``, waiting until no conflicting lock is held (nor, for a shared
        request, a waiting exclusive one over the same clusters)."""
        token = self.acquire(first, end, exclusive)
        try:
            yield
        finally:
            self.release(token)

    def acquire(self, first: int, end: int, exclusive: bool) -> int:
        """Take the hold :meth:`locked` takes and return its token for :meth:`release`. A hold
        is not tied to a thread: another thread may release it (a write-behind copy does)."""
        with self.mutex:
            if exclusive:
                token = self._table.try_acquire(first, end, True)
                if not token:
                    waiting = self._waiting.try_acquire(first, end, False)
                    try:
                        while not token:
                            self.mutex.wait()
                            token = self._table.try_acquire(first, end, True)
                    finally:
                        self._waiting.release(waiting)
                        self.mutex.notify_all()
            else:
                token = 0
                if not self._waiting.conflicts(first, end, True):
                    token = self._table.try_acquire(first, end, False)
                while not token:
                    self.mutex.wait()
                    if not self._waiting.conflicts(first, end, True):
                        token = self._table.try_acquire(first, end, False)
        return token

    def release(self, token: int) -> None:
        """Let go of a hold taken by :meth:`acquire` or :meth:`try_shared`."""
        with self.mutex:
            self._table.release(token)
            self.mutex.notify_all()

    def try_exclusive(self, first: int, end: int) -> int | None:
        """The token of an exclusive hold on ``[first, end)`` if one can be had without
        waiting, else None. Never waiting, it can be taken in any order with other holds."""
        with self.mutex:
            return self._table.try_acquire(first, end, True) or None

    def try_shared(self, first: int, end: int) -> AbstractContextManager[None] | None:
        """A shared hold on ``[first, end)`` if one can be had without waiting (no conflicting
        lock held, no exclusive request waiting over the range), else None."""
        with self.mutex:
            if self._waiting.conflicts(first, end, True):
                return None
            token = self._table.try_acquire(first, end, False)
        return _Held(self, token) if token else None

    def __len__(self) -> int:
        with self.mutex:
            return len(self._table)


class _Held(AbstractContextManager[None]):
    """A lock already taken by :meth:`ClusterRangeLocks.try_shared`; released on exit."""

    def __init__(self, locks: ClusterRangeLocks, token: int) -> None:
        self._locks = locks
        self._token = token

    def __exit__(self, *exc: object) -> None:
        self._locks.release(self._token)
