"""Replies written by the I/O threads straight to the socket.

Design note: asyncio's socket transport writes from the loop thread and copies whatever a send
does not take at once, which for 256 KiB reads costs more than the read itself. For plain
sockets the thread that produced a reply sends it right away with ``sendmsg`` (header and data as
separate buffers, the GIL released during the copy into the kernel). When the socket is full,
the unsent rest waits in a queue that the loop drains as the socket becomes writable, and every
later reply queues behind it, so two replies never interleave on the wire. A worker never blocks
on a slow client: a client that stops reading only grows its own queue, which the connection's
budget bounds (it reads ``pending`` and hears of every drain through ``on_progress``; ``sent``
tells its drain timeout whether the client still reads). ``close`` drops the queue and the
callbacks at once, so a departed client's replies are freed without waiting for the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence

Buffer = bytes | bytearray | memoryview
#: buffers per sendmsg call (the kernel's IOV_MAX is 1024)
_IOV_BATCH = 512
#: the socket send buffer asked for (the kernel caps it at net.core.wmem_max)
SEND_BUFFER = 4 << 20


def _pread_all(fd: int, buf: bytearray, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "short read from the image file")
        done += n


class DirectSender:
    """Sends whole replies on ``fd`` (a connected, non-blocking stream socket) from any thread.

    ``on_error`` is called (in the loop) when the peer is gone, after which sends are dropped;
    ``on_progress`` (in the loop) each time the socket took queued bytes.
    Raises ``OSError`` when the descriptor cannot be duplicated (out of descriptors).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_error: Callable[[], None],
                 on_progress: Callable[[], None] | None = None) -> None:
        self._loop = loop
        # A descriptor of our own: the transport keeps its own for reading, and the loop's
        # selector watches ours for writability only while something is queued.
        self._sock = socket.socket(fileno=os.dup(fd))
        self._sock.setblocking(False)
        # Room for several large replies in the kernel: fewer partial sends and wake-ups.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._fd = self._sock.fileno()
        #: the descriptor this sender owns (the server keeps a reserve below its limit)
        self.fileno = self._fd
        self._on_error: Callable[[], None] | None = on_error
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._queue: deque[memoryview] = deque()
        self._queued = 0  # bytes in _queue: read without the lock by the pause checks
        #: bytes the socket took, in all (read without the lock by the drain timeout)
        self.sent = 0
        self._watching = False
        self.closed = False

    def send(self, buffers: Sequence[Buffer]) -> None:
        """Send one reply's buffers, in order, now or as soon as the socket takes them."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if not views:
            return
        with self._lock:
            if self.closed:
                return
            if self._queue:
                self._enqueue(views)
                return
            try:
                rest = self._send_now(views)
            except OSError:
                self._fail()
                return
            if rest:
                self._enqueue(rest)
                self._loop.call_soon_threadsafe(self._watch)

    def sendfile(self, header: bytes, fd: int, offset: int, length: int) -> bool:
        """Send ``header`` then ``length`` bytes of file ``fd`` at ``offset``, the data copied
        by the kernel from the page cache straight into the socket (no user-space copy).

        Only when nothing is queued; what the socket does not take at once is read into memory
        and queued. Returns False (nothing sent) when the caller must send the reply itself.
        Raises ``OSError`` when reading the file fails (the reply is then incomplete and the
        connection is dropped, as the client cannot be told).
        """
        with self._lock:
            if self.closed or self._queue:
                return False
            try:
                rest = self._send_now([memoryview(header)])
                if rest:  # not even the header went: fall back before any data
                    self._enqueue(rest)
                    tail = bytearray(length)
                    _pread_all(fd, tail, offset)
                    self._enqueue([memoryview(tail)])
                    self._loop.call_soon_threadsafe(self._watch)
                    return True
                sent = 0
                while sent < length:
                    try:
                        n = os.sendfile(self._fd, fd, offset + sent, length - sent)
                    except (BlockingIOError, InterruptedError):
                        break
                    if n == 0:  # the file is shorter than promised
                        raise OSError(errno.EIO, "short read from the image file")
                    sent += n
                    self.sent += n
            except (BrokenPipeError, ConnectionError):
                self._fail()
                return True
            if sent < length:
                tail = bytearray(length - sent)
                try:
                    _pread_all(fd, tail, offset + sent)
                except OSError:
                    self._fail()
                    raise
                self._enqueue([memoryview(tail)])
                self._loop.call_soon_threadsafe(self._watch)
            return True

    def _send_now(self, views: list[memoryview]) -> list[memoryview]:
        """Send what the socket takes without waiting; returns the unsent rest."""
        while views:
            try:
                sent = self._sock.sendmsg(views[:_IOV_BATCH])
            except (BlockingIOError, InterruptedError):
                return views
            self.sent += sent
            while sent:
                head = views[0]
                if sent >= len(head):
                    sent -= len(head)
                    views.pop(0)
                else:
                    views[0] = head[sent:]
                    sent = 0
        return views

    def _watch(self) -> None:  # loop thread
        with self._lock:
            if self.closed or self._watching or not self._queue:
                return
            self._watching = True
        self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:  # loop thread
        with self._lock:
            if self.closed:
                return
            try:
                rest = self._send_now(list(self._queue))
            except OSError:
                self._fail()
                return
            self._queue = deque(rest)
            self._queued = sum(len(v) for v in rest)
            if not rest:
                self._watching = False
                self._loop.remove_writer(self._fd)
            progress = self._on_progress
        if progress is not None:
            progress()

    def _fail(self) -> None:
        """The peer is gone (lock held): drop everything and tell the connection."""
        self.closed = True
        self._queue.clear()
        self._queued = 0
        on_error = self._on_error
        if on_error is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the server
                self._loop.call_soon_threadsafe(on_error)

    def _enqueue(self, views: list[memoryview]) -> None:
        """Queue ``views`` behind what is queued (lock held)."""
        self._queue.extend(views)
        self._queued += sum(len(v) for v in views)

    @property
    def pending(self) -> int:
        """Bytes waiting for the socket (a snapshot: no lock, it only steers pausing)."""
        return self._queued

    def close(self) -> None:
        """Stop sending and release the descriptor (loop thread)."""
        with self._lock:
            self.closed = True
            self._queue.clear()
            self._queued = 0
            self._on_error = self._on_progress = None  # no cycle back to the connection
            watching, self._watching = self._watching, False
        if watching:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._sock.close()
