"""A test helper: collect ``Storage`` events (they come from job threads) and wait for them."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fleece.events import Event

#: seconds an expected event may take before the test fails
WAIT = 10.0


class EventLog:
    """Subscribe it (``storage.subscribe(log)``); then wait for events by name and data."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def data(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [dict(e.get("data") or {}) for e in self.events if e["event"] == name]

    def names(self) -> list[str]:
        with self._cond:
            return [str(e["event"]) for e in self.events]

    def statuses(self, job_id: str) -> list[str]:
        return [str(d["status"]) for d in self.data("JOB_STATUS_CHANGE") if d["id"] == job_id]

    def wait(self, name: str, timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        """The first ``name`` event whose data has the ``match`` items (``_`` in a key stands
        for ``-``); fails the test after ``timeout`` seconds."""

        def found() -> dict[str, Any] | None:
            for data in self.data(name):
                if all(data.get(k.replace("_", "-")) == v for k, v in match.items()):
                    return data
            return None

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout)
        result = found()
        if result is None:
            pytest.fail(f"no {name} {match} within {timeout} s; events: {self.names()}")
        return result

    def wait_status(self, job_id: str, status: str, timeout: float = WAIT) -> None:
        self.wait("JOB_STATUS_CHANGE", timeout, id=job_id, status=status)
