"""Background copies for a sequential writer: the rest of a copy-ahead window, off its path.

Design note: when a sequential writer crosses into a new copy-ahead window
(:mod:`fleece.block.copy_ahead`), the guest write needs only its own clusters copied before it
goes on. Copy-before-write copies those in the guest's thread and hands the rest of the window
to this thread, piece by piece, each piece already held under an exclusive range lock (taken
without waiting, so in no particular order with other holds). The writer's next requests then
meet copied clusters (the native plane takes them) or a piece still held, whose lock they wait
for, after which they find it copied. On two cores the copy runs beside the guest's writes
instead of before them.

When the pieces run out, the thread asks ``further`` (if given) whether to go on: copy-before-
write queues the writer's next window there when the writer is right behind the copy (see
:mod:`fleece.block.copy_ahead`), and the thread stops only when nothing more was queued.

A background copy that fails leaves its clusters as they were, not copied: the guest write
that reaches them copies them itself, under its error policy. Closing cancels the pieces not
started (their locks go) and waits for the one being copied.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class AheadCopier:
    """One thread (started when there is work, gone when there is none) copying pieces.

    ``copy(first, end)`` copies the clusters of ``[first, end)`` not copied yet, with the
    piece's exclusive lock held; each piece comes with the ``release`` that lets its lock go.
    ``further()``, called in the thread when no piece is left, may :meth:`submit` more and
    returns True when it did.
    """

    def __init__(self, copy: Callable[[int, int], object],
                 further: Callable[[], bool] | None = None) -> None:
        self._copy = copy
        self._further = further
        self._pieces: deque[tuple[int, int, Callable[[], None]]] = deque()
        self._cond = threading.Condition()
        self._running = False  # a thread is (or is about to be) taking pieces
        self._closed = False

    def submit(self, first: int, end: int, release: Callable[[], None]) -> bool:
        """Queue a piece; False once closed or when no thread can be had (the caller then
        releases the lock itself)."""
        piece = (first, end, release)
        with self._cond:
            if self._closed:
                return False
            self._pieces.append(piece)
            if self._running:
                return True
            self._running = True
        try:
            threading.Thread(target=self._run, name="fleece-cbw-ahead", daemon=True).start()
        except RuntimeError:  # no thread to be had: nothing is copied ahead
            with self._cond:  # pieces queued meanwhile expected this thread: drop them too
                self._pieces.remove(piece)  # the caller releases this one
                dropped = self._dequeue_all()
                self._running = False
                self._cond.notify_all()
            for release in dropped:
                release()
            return False
        return True

    def close(self) -> None:
        """Cancel the pieces not started and wait for the one being copied."""
        with self._cond:
            self._closed = True
            cancelled = self._dequeue_all()
            while self._running:
                self._cond.wait()
        for release in cancelled:
            release()

    def idle(self) -> None:
        """Wait until every piece submitted so far is copied (or cancelled)."""
        with self._cond:
            while self._running:
                self._cond.wait()

    def _dequeue_all(self) -> list[Callable[[], None]]:
        """Take every piece not started off the queue (lock held); their releases."""
        releases = [release for _, _, release in self._pieces]
        self._pieces.clear()
        return releases

    def _run(self) -> None:
        finished = False
        try:
            while True:
                with self._cond:
                    piece = self._pieces.popleft() if self._pieces else None
                    closed = self._closed
                if piece is None and not closed and self._further is not None and self._further():
                    continue  # the writer is right behind: its next window was queued
                if piece is None:
                    with self._cond:
                        if self._pieces:  # queued meanwhile
                            continue
                        self._running = False  # seen empty and stopped in one hold
                        self._cond.notify_all()
                        finished = True
                        return
                first, end, release = piece
                try:
                    self._copy(first, end)
                except OSError as exc:  # left uncopied: the write that reaches it copies it
                    log.debug("copy-ahead of clusters %d-%d failed: %s", first, end, exc)
                finally:
                    release()
        finally:
            if not finished:  # a bug: let every lock go, then the exception shows
                with self._cond:
                    left = self._dequeue_all()
                    self._running = False
                    self._cond.notify_all()
                for release in left:
                    release()
