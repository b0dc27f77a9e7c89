"""Pure-Python twin of :mod:`fleece._fast.filewriter`: the same writer, as a Python thread.

It behaves the same; it is slower in one way that matters, which is why the compiled twin
exists: its thread takes the GIL around every write, contending with the threads that feed it.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview


class FileWriter:
    """Writes submitted buffers into files, in submission order, in a background thread."""

    def __init__(self, depth: int = 64) -> None:
        if depth <= 0:
            raise ValueError(f"a file writer needs a positive depth, got {depth}")
        self._depth = depth
        self._cond = threading.Condition()
        self._slots: list[tuple[int, int, memoryview] | None] = [None] * depth
        self._errors = [0] * depth
        self._submitted = self._written = self._reaped = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="fleece-file-writer",
                                        daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._depth

    def outstanding(self) -> int:
        """Writes submitted and not reaped yet (at most ``depth``)."""
        with self._cond:
            return self._submitted - self._reaped

    def submit(self, fd: int, offset: int, data: Buffer) -> int:
        """Queue a write of ``data`` (a contiguous buffer) at ``offset`` of ``fd``; returns its
        ticket. ``RuntimeError`` when ``depth`` writes are outstanding (reap first) or after
        :meth:`close`."""
        view = memoryview(data).cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        with self._cond:
            if self._stopping:
                raise RuntimeError("the file writer is closed")
            if self._submitted - self._reaped >= self._depth:
                raise RuntimeError("the file writer is full: reap finished writes first")
            ticket = self._submitted
            self._slots[ticket % self._depth] = (fd, offset, view)
            self._submitted += 1
            self._cond.notify_all()
            return ticket

    def written(self) -> int:
        """How many writes have finished: every ticket below this one."""
        with self._cond:
            return self._written

    def wait(self, ticket: int) -> None:
        """Block until write ``ticket`` has finished."""
        with self._cond:
            self._cond.wait_for(lambda: self._written > ticket or ticket >= self._submitted)

    def reap(self) -> list[tuple[int, int]]:
        """The ``(ticket, errno)`` of every write finished since the last reap, in ticket order
        (errno 0: written whole); their buffers are let go."""
        with self._cond:
            out = []
            for ticket in range(self._reaped, self._written):
                out.append((ticket, self._errors[ticket % self._depth]))
                self._slots[ticket % self._depth] = None
            self._reaped = self._written
            return out

    def close(self) -> None:
        """Finish the queued writes and stop the thread (reap afterwards for their outcome)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _main(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._written < self._submitted or self._stopping)
                if self._written == self._submitted:
                    return
                ticket = self._written
                slot = self._slots[ticket % self._depth]
            assert slot is not None
            self._errors[ticket % self._depth] = write_all(*slot)
            with self._cond:
                self._written += 1
                self._cond.notify_all()


def write_all(fd: int, offset: int, view: memoryview) -> int:
    """Write all of ``view`` at ``offset`` of ``fd``: 0, or the errno of the failure."""
    done = 0
    try:
        while done < len(view):
            done += os.pwritev(fd, [view[done:]], offset + done)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0
