"""QMP events: what ``Storage`` tells its subscribers (the QMP server, tests, a harness)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
Subscriber = Callable[[Event], None]


def make_event(name: str, data: dict[str, Any] | None = None) -> Event:
    """``{"event", "data", "timestamp": {"seconds", "microseconds"}}`` as QEMU sends it."""
    now = time.time()
    seconds = int(now)
    event: Event = {
        "event": name,
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
    }
    if data is not None:
        event["data"] = data
    return event


class EventBus:
    """Delivers each event to every subscriber, in order, from the emitting thread.

    A subscriber must not block; one that raises is dropped, so it cannot stop the others.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add ``callback``; returns the function that removes it."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        event = make_event(name, data)
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                with self._lock:
                    if callback in self._subscribers:
                        self._subscribers.remove(callback)
        return event
