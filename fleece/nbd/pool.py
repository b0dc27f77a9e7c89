"""The I/O threads of the NBD server: a futures-free pool (see :class:`IOPool`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class IOPool:
    """Worker threads running ``function(*args)`` items in submission order, without futures.

    ``concurrent.futures`` costs the loop a future, a wrapped asyncio future and a wake-up per
    request; the NBD requests report back only when they must (see ``Connection._work``), so a
    plain queue is all they need. Threads start on demand, up to ``workers``.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._workers = workers
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: counts workers that finished a job and wait for the next (a new thread starts only
        #: when none does: idle threads keep the memory they touched, so few are better)
        self._idle = threading.Semaphore(0)
        self._shutdown = False

    def submit(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function(*args)`` in a worker (``RuntimeError`` after :meth:`shutdown`)."""
        if self._shutdown:
            raise RuntimeError("the I/O pool is shut down")
        self._queue.put((function, args))
        if self._idle.acquire(blocking=False):
            return  # a worker is waiting for it
        if len(self._threads) < self._workers:
            with self._lock:
                if len(self._threads) < self._workers and not self._shutdown:
                    thread = threading.Thread(
                        target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            function, args = item
            try:
                function(*args)
            except Exception:  # a job must handle its own errors; never lose the worker
                log.exception("I/O pool job failed")
            del item, function, args
            self._idle.release()

    def shutdown(self, wait: bool = True) -> None:
        """Run what was submitted, then stop the workers (and wait for them)."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()
