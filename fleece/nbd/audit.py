"""The NBD server's audit trail: one line per refused, rejected or misbehaving client, rate
limited so that a flood of clients cannot flood the log."""

from __future__ import annotations

import logging
import time


class _Window:
    """One kind of audit event within the current interval."""

    __slots__ = ("logged", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class AuditLog:
    """The audit trail of hostile or failed clients: one WARNING line per event (with the
    peer), at most ``burst`` lines of a kind every ``interval`` seconds (``fd-limit``: one);
    the rest are counted and reported in one line once the interval is over, so a flood of
    clients cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, burst: int = 20) -> None:
        self._log = logger
        self.interval = interval
        self.burst = burst
        self.bursts = {"fd-limit": 1}
        self._windows: dict[str, _Window] = {}

    def __call__(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval:
            if window is not None:
                self._summary(kind, window)
            window = self._windows[kind] = _Window(now)
        if window.logged < self.bursts.get(kind, self.burst):
            window.logged += 1
            self._log.warning(message, *args)
        else:
            window.suppressed += 1

    def flush(self, now: float) -> None:
        """Report the events left out of the intervals that are over."""
        for kind, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._summary(kind, window)
                del self._windows[kind]

    def _summary(self, kind: str, window: _Window) -> None:
        if window.suppressed:
            self._log.warning("NBD: %d more '%s' events in %g s, not logged one by one",
                              window.suppressed, kind, self.interval)
