"""Type stubs for the compiled copy-before-write planner and range locks."""

from fleece._fast.bitmap import ClusterBitmap

def plan_runs(done: ClusterBitmap, start: int, end: int, max_run: int) -> list[tuple[int, int]]:
    """Runs ``(first, count)`` of not-done clusters in ``[start, end)``, each <= ``max_run``."""

class RangeLockTable:
    """Active cluster range locks; callers hold one mutex around every call."""

    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def conflicts(self, start: int, end: int, exclusive: bool) -> bool: ...
    def try_acquire(self, start: int, end: int, exclusive: bool) -> int:
        """A token (> 0), or 0 when the range conflicts with an active lock."""
    def release(self, token: int) -> None:
        """``KeyError`` if ``token`` is not held."""
