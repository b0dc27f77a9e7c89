"""Pure-Python twin of :mod:`fleece._fast.cbw`: same names, results and errors."""

from __future__ import annotations

import operator

from fleece._pure.bitmap import ClusterBitmap


def plan_runs(done: ClusterBitmap, start: int, end: int, max_run: int) -> list[tuple[int, int]]:
    """Runs ``(first, count)`` of clusters in ``[start, end)`` not yet done, at most ``max_run``
    long each. ``IndexError`` for a bad range, ``ValueError`` unless ``max_run > 0``."""
    start, end, max_run = operator.index(start), operator.index(end), operator.index(max_run)
    if start < 0 or start > end or end > len(done):
        raise IndexError(f"cluster range [{start}, {end}) out of range for {len(done)} clusters")
    if max_run <= 0:
        raise ValueError(f"max_run must be positive, got {max_run}")
    runs: list[tuple[int, int]] = []
    for first, count, value in done.runs(start, end):
        if value:
            continue
        while count:
            step = min(count, max_run)
            runs.append((first, step))
            first += step
            count -= step
    return runs


class RangeLockTable:
    """Active cluster range locks. Not thread-safe by itself: callers hold one mutex."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[int, int, bool]] = {}
        self._next_token = 1

    def __len__(self) -> int:
        return len(self._locks)

    def conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        start, end = operator.index(start), operator.index(end)
        if start < 0 or end < start:
            raise ValueError(f"bad cluster range [{start}, {end})")
        return any(
            s < end and start < e and (exclusive or x) for s, e, x in self._locks.values()
        )

    def try_acquire(self, start: int, end: int, exclusive: bool) -> int:
        start, end = operator.index(start), operator.index(end)
        if self.conflicts(start, end, exclusive):
            return 0
        token = self._next_token
        self._next_token += 1
        self._locks[token] = (start, end, bool(exclusive))
        return token

    def release(self, token: int) -> None:
        token = operator.index(token)
        if self._locks.pop(token, None) is None:
            raise KeyError(f"range lock {token} is not held")
