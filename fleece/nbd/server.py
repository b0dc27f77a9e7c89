"""The NBD server: asyncio listeners and connections around :mod:`fleece.nbd.proto`.

Design note: the server runs its own event loop in a thread (``fleece-nbd``) for as long as it
is up; the public methods may be called from any other thread and hop onto the loop with
``asyncio.run_coroutine_threadsafe``. Connections are ``asyncio.BufferedProtocol``: the socket
is read straight into the protocol's buffer (and a WRITE payload straight into its own
``bytearray``). Each request runs in a small thread pool (``os.preadv``/``os.pwritev`` release
the GIL), so many requests are in flight per connection and are answered as they complete, out of
order; reading pauses while too many requests, or bytes of requests and unsent replies, are in
flight. The I/O thread that produced a reply sends it (:mod:`fleece.nbd.sender`; ``sendfile``
for raw file exports). Two shortcuts skip the thread hand-off, which costs more than a small
request: small reads whose data is in the page cache (``RWF_NOWAIT``; otherwise the pool does
them), and small writes that arrive while nothing else of the client is in flight (the page
cache takes them at once; the price is that such a write, were it to wait for the disk, would
hold up the loop for that long).

Exports hold a reference on their node for as long as they exist; the caller (the command layer)
takes and releases it, never the loop thread, because releasing the last reference may close a
node and wait for its in-flight I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import ssl
import stat
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleece.block import nowait
from fleece.block.driver import Status
from fleece.block.drivers.file import FileDriver
from fleece.block.drivers.raw import RawDriver
from fleece.block.node import BlockNode, NodeUser
from fleece.errors import GenericError
from fleece.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    MAX_PAYLOAD,
    AllocationFlag,
    Cmd,
    CmdFlag,
    NBDErr,
    nbd_error,
)
from fleece.nbd.proto import (
    Disconnect,
    Event,
    ExportInfo,
    ExportSelected,
    Phase,
    Request,
    ServerConnection,
    StartTLS,
)
from fleece.nbd.sender import DirectSender

log = logging.getLogger(__name__)
T = TypeVar("T")

#: reading from a connection pauses above this many requests in flight ...
MAX_IN_FLIGHT = 128
#: ... or this many payload bytes (writes buffered, reads being answered)
MAX_IN_FLIGHT_BYTES = 128 * 1024 * 1024
#: a structured read is sent as one data chunk when its range has more extents than this
MAX_READ_PIECES = 16
#: how far ahead a read's block status query looks for a data extent to remember
DATA_HINT_SPAN = 1 << 30
#: a block status reply describes at most this many extents per context
MAX_STATUS_EXTENTS = 2048
#: replies smaller than this are joined into one write; bigger payloads are written separately
JOIN_BELOW = 64 * 1024
#: reads of a raw file export at least this big go out with sendfile
SENDFILE_ABOVE = 64 * 1024
#: reads from this size on look for holes to send as OFFSET_HOLE chunks; a smaller read is
#: cheaper to send whole than to ask the block status about
SPARSE_READ_MIN = 128 * 1024
#: writes up to this size are done in the loop thread when nothing else is in flight
INLINE_WRITE_MAX = 16 * 1024
#: reads up to this size are tried in the loop thread first, from the page cache
INLINE_READ_MAX = 16 * 1024
TLS_HANDSHAKE_TIMEOUT = 10.0
CALL_TIMEOUT = 60.0

Buffer = bytes | bytearray | memoryview


@dataclass(eq=False)
class Export:
    """A node exported under ``name``; ``user`` is its reference on the node."""

    id: str
    name: str
    node: BlockNode
    user: NodeUser
    description: str = ""
    writable: bool = False
    writethrough: bool = False
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()
    shutting_down: bool = False
    connections: set[Connection] = field(default_factory=set)
    #: a range known to hold data (not zeroes): reads inside it skip the block status query.
    #: Always safe to use stale: sending zeroes that were written meanwhile as data is correct.
    data_hint: tuple[int, int] = (0, 0)

    @property
    def file_window(self) -> tuple[BlockNode, int] | None:
        """``(file node, offset)`` when the export's bytes are a window of one posix file (a
        ``file`` node, or ``raw`` over one, with nobody guarding reads): ``sendfile`` may then
        serve reads."""
        node, base = self.node, 0
        while not node.read_interceptors:
            driver = node.driver
            if isinstance(driver, FileDriver):
                return node, base
            if not isinstance(driver, RawDriver):
                return None
            base += driver.offset
            node = driver.file
        return None

    def info(self) -> ExportInfo:
        """The export as negotiation presents it (size read now)."""
        contexts = [BASE_ALLOCATION]
        if self.allocation_depth:
            contexts.append(ALLOCATION_DEPTH)
        contexts += [DIRTY_BITMAP_PREFIX + name for name in self.bitmaps]
        cluster = self.node.driver.image_info().get("cluster-size")
        preferred = 4096
        if isinstance(cluster, int) and 4096 <= cluster <= MAX_PAYLOAD:
            preferred = cluster
        return ExportInfo(
            name=self.name,
            description=self.description,
            size=self.node.size,
            read_only=not self.writable,
            multi_conn=not self.writable,
            contexts=tuple(contexts),
            preferred_block_size=preferred,
        )


class _Directory:
    """The server's exports as :class:`fleece.nbd.proto.ExportDirectory` (loop thread only)."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server

    def lookup(self, name: str) -> Export | None:
        exports = [e for e in self.server.exports.values() if not e.shutting_down]
        found = next((e for e in exports if e.name == name), None)
        if found is None and name == "" and len(exports) == 1:
            found = exports[0]  # the default export, when there is only one
        return found

    def find(self, name: str) -> ExportInfo | None:
        export = self.lookup(name)
        return None if export is None else export.info()

    def all(self) -> Iterable[ExportInfo]:
        return [e.info() for e in self.server.exports.values() if not e.shutting_down]


def _base_allocation(flags: Status) -> int:
    value = 0 if flags & Status.DATA else AllocationFlag.HOLE
    if flags & Status.ZERO:
        value |= AllocationFlag.ZERO
    return value


class Connection(asyncio.BufferedProtocol):
    """One client: moves bytes between the transport and a :class:`ServerConnection`."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.proto = ServerConnection(server.directory, tls=server.tls is not None)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.contexts: dict[int, str] = {}
        #: requests handed to the I/O threads, and their payload bytes (under ``count_lock``:
        #: the loop counts them in, the I/O threads count them out)
        self.count_lock = threading.Lock()
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.paused = False
        self.closing = False
        self.registered = False
        self.tls_pending = False
        self.deferred: list[Event] = []
        #: requests parsed after reading paused (the rest of the bytes already received): they
        #: wait here, uncounted and unstarted, until the connection is below its limits again
        self.backlog: list[Request] = []
        #: replies go straight to the socket from the I/O threads (plain sockets, once the
        #: client chose an export); None: through the asyncio transport
        self.sender: DirectSender | None = None

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        if server.closing or (
            server.max_connections and len(server.connections) >= server.max_connections
        ):
            transport.abort()
            return
        server.connections.add(self)
        self.registered = True
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.proto.phase is Phase.TLS_HANDSHAKE:
            # The raw transport was paused at STARTTLS: these bytes come out of the TLS layer,
            # which may deliver them before start_tls() returns.
            self.proto.tls_started()
        try:
            events = self.proto.buffer_updated(nbytes)
        except Exception:  # a bug must cost this connection, never the server
            log.exception("NBD protocol failure")
            self.abort()
            return
        if self.tls_pending:
            # start_tls() has not handed us the TLS transport yet: reply once it has.
            self.deferred += events
            return
        self._flush()
        for event in events:
            self._handle(event)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.sender is not None:
            self.sender.close()
        self._unregister()

    # -- helpers -----------------------------------------------------------------------------
    def _unregister(self) -> None:
        if self.registered:
            self.registered = False
            self.server.connections.discard(self)
            if self.export is not None:
                self.export.connections.discard(self)

    def abort(self) -> None:
        """Drop the connection now (replies in flight are lost)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        self._unregister()

    def _flush(self) -> None:
        data = self.proto.data_to_send()
        if not data:
            return
        if self.sender is not None:
            self.sender.send([data])
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close_when_sent(self) -> None:
        """Close once every reply left: queued direct sends first (checked every 10 ms)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.sender is not None and self.sender.pending and not self.sender.closed:
            self.server.loop.call_later(0.01, self._close_when_sent)
            return
        transport.close()

    def _direct_sender(self) -> DirectSender | None:
        """A direct sender for a plain socket whose transport has nothing buffered."""
        transport = self.transport
        if self.server.tls is not None or transport is None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size():
            return None
        return DirectSender(self.server.loop, sock.fileno(), self.abort, self._drained)

    def _send(self, buffers: list[Buffer]) -> None:
        if self.sender is not None:
            self.sender.send(buffers)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(buffers) == 1:
            transport.write(buffers[0])
        elif sum(len(b) for b in buffers) < JOIN_BELOW:
            transport.write(b"".join(buffers))
        else:
            for buffer in buffers:
                transport.write(buffer)

    def _handle(self, event: Event) -> None:
        if isinstance(event, Request):
            self._submit(event)
        elif isinstance(event, ExportSelected):
            export = self.server.directory.lookup(event.export.name)
            if export is None:
                self.abort()
                return
            self.export = export
            self.contexts = event.contexts
            export.connections.add(self)
            self.sender = self._direct_sender()
        elif isinstance(event, StartTLS):
            if self.transport is not None:
                self._flush()
                self.transport.pause_reading()  # not one plain byte more
            self.tls_pending = True
            self.server.spawn(self._start_tls())
        elif isinstance(event, Disconnect):
            if event.error:
                log.info("NBD client dropped: %s", event.reason)
            if not event.error:
                # NBD_CMD_DISC: the requests sent before it are still answered
                backlog, self.backlog = self.backlog, []
                for request in backlog:
                    self._submit(request, held=True)
            self.closing = True
            with self.count_lock:
                idle = self.in_flight == 0
            if idle:
                self._close_when_sent()

    async def _start_tls(self) -> None:
        transport, context = self.transport, self.server.tls
        assert transport is not None and context is not None
        loop = asyncio.get_running_loop()
        try:
            upgraded = await loop.start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("NBD TLS handshake failed: %s", exc)
            self.abort()
            return
        if upgraded is None:
            self.abort()
            return
        self.transport = upgraded
        self.tls_pending = False
        if self.proto.phase is Phase.TLS_HANDSHAKE:
            self.proto.tls_started()
        self._flush()
        events, self.deferred = self.deferred, []
        for event in events:
            self._handle(event)

    # -- requests ----------------------------------------------------------------------------
    def _submit(self, request: Request, held: bool = False) -> None:
        """Start ``request``, or keep it in the backlog while the connection is paused
        (``held``: start it all the same, the client said goodbye after it)."""
        export = self.export
        assert export is not None and self.transport is not None
        if self.paused and not held:
            self.backlog.append(request)
            return
        if (
            request.command == Cmd.READ
            and request.length <= INLINE_READ_MAX
            and self.sender is not None
            and self._read_inline(export, request)
        ):
            if not self.paused and self.sender.pending >= MAX_IN_FLIGHT_BYTES:
                self.paused = True  # replies the client does not read: stop taking requests
                self.transport.pause_reading()
            return
        if (
            request.command == Cmd.WRITE
            and request.length <= INLINE_WRITE_MAX
            and self.sender is not None
            and self.in_flight == 0
        ):
            # A small write with nothing else in flight: the page cache takes it at once, and
            # handing it to a thread would cost more than the write. Only when nothing is in
            # flight, so it cannot overtake (or wait behind) a request of this client.
            self.sender.send(self._execute(export, request))
            return
        cost = request.length if request.command in (Cmd.READ, Cmd.WRITE) else 0
        with self.count_lock:
            self.in_flight += 1
            self.in_flight_bytes += cost
            pause = not self.paused and (
                self.in_flight >= MAX_IN_FLIGHT
                or self.in_flight_bytes + self._unsent() >= MAX_IN_FLIGHT_BYTES
            )
            if pause:
                self.paused = True
        if pause:
            self.transport.pause_reading()
        self.server.pool.submit(self._work, export, request, cost)

    def _work(self, export: Export, request: Request, cost: int) -> None:
        """Run a request in an I/O thread and send its reply from there when the connection
        has a direct sender. The loop hears about it only when it must act: a reply to write
        through the transport, reading to resume, or a connection to close."""
        failed = False
        buffers: list[Buffer] | None = None
        try:
            buffers = self._execute(export, request)
            sender = self.sender
            if sender is not None:
                sender.send(buffers)
                buffers = None
        except Exception:  # _execute answers errors itself; anything else is a bug
            log.exception("NBD request failed")
            failed = True
        with self.count_lock:
            self.in_flight -= 1
            self.in_flight_bytes -= cost
            wake = failed or bool(buffers) or (self.closing and self.in_flight == 0) or (
                self.paused and self._below_resume()
            )
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is gone: so is the connection
                self.server.loop.call_soon_threadsafe(self._completed, buffers, failed)

    def _unsent(self) -> int:
        """Reply bytes queued for a client that reads slower than we answer."""
        sender = self.sender
        return sender.pending if sender is not None else 0

    def _below_resume(self) -> bool:
        # Replies still queued count too: a client that stops reading its replies must stop
        # the server from reading (and answering) more of its requests.
        return self.in_flight < MAX_IN_FLIGHT // 2 and (
            self.in_flight_bytes + self._unsent() < MAX_IN_FLIGHT_BYTES // 2
        )

    def _drained(self) -> None:
        """The sender's queue emptied (loop thread): reading may resume."""
        self._completed(None, False)

    def _completed(self, buffers: list[Buffer] | None, failed: bool) -> None:
        """In the loop: act on a finished request (see :meth:`_work`)."""
        if failed:
            self.abort()
            return
        if buffers:
            self._send(buffers)
        transport = self.transport
        if transport is None:
            return
        with self.count_lock:
            idle = self.in_flight == 0
            resume = self.paused and not self.closing and self._below_resume()
            if resume:
                self.paused = False
        if self.closing:
            if idle:
                self._close_when_sent()
            return
        if resume:
            backlog, self.backlog = self.backlog, []
            for request in backlog:  # in order; any of them may pause the connection again
                self._submit(request)
            if not self.paused:
                transport.resume_reading()

    def _read_inline(self, export: Export, request: Request) -> bool:
        """Answer a small read here in the loop thread when its data is in the page cache:
        no thread hand-off. False when it would wait for the disk (then the pool does it)."""
        try:
            with nowait.nowait():
                buffers = self._execute(export, request)
        except nowait.WouldBlock:
            return False
        assert self.sender is not None
        self.sender.send(buffers)
        return True

    def _execute(self, export: Export, request: Request) -> list[Buffer]:
        """Run ``request`` on the export's node (in a pool thread); the reply's buffers."""
        proto, cookie = self.proto, request.cookie
        try:
            return self._perform(export, request)
        except nowait.WouldBlock:
            raise
        except OSError as exc:
            return [proto.error_reply(cookie, nbd_error(exc.errno), exc.strerror or str(exc))]
        except GenericError as exc:
            return [proto.error_reply(cookie, NBDErr.EIO, str(exc))]

    def _perform(self, export: Export, request: Request) -> list[Buffer]:
        node, proto, cookie = export.node, self.proto, request.cookie
        command, flags = request.command, request.flags
        offset, length = request.offset, request.length
        if command == Cmd.READ:
            direct = self.sender is not None and length >= SENDFILE_ABOVE and export.file_window
            if direct and self._sendfile_read(export, cookie, offset, length):
                return []
            if proto.structured and not flags & CmdFlag.DF and length >= SPARSE_READ_MIN:
                return self._sparse_read(export, cookie, offset, length)
            buf = bytearray(length)
            node.pread_into(offset, buf)
            return proto.read_reply(cookie, offset, buf)
        if command == Cmd.WRITE:
            assert request.payload is not None
            node.pwrite(offset, request.payload)
            if flags & CmdFlag.FUA or export.writethrough:
                node.flush()
        elif command == Cmd.FLUSH:
            node.flush()
        elif command == Cmd.TRIM:
            node.pdiscard(offset, length)
            if flags & CmdFlag.FUA or export.writethrough:
                node.flush()
        elif command == Cmd.WRITE_ZEROES:
            if flags & CmdFlag.FAST_ZERO and flags & CmdFlag.NO_HOLE:
                return [proto.error_reply(cookie, NBDErr.ENOTSUP,
                                          "fast zeroing needs permission to punch holes")]
            node.pwrite_zeroes(offset, length, may_unmap=not flags & CmdFlag.NO_HOLE)
            if flags & CmdFlag.FUA or export.writethrough:
                node.flush()
        elif command == Cmd.BLOCK_STATUS:
            replies = [
                (context_id, self._status(node, name, offset, length,
                                          bool(flags & CmdFlag.REQ_ONE)))
                for context_id, name in sorted(self.contexts.items())
            ]
            return [proto.block_status_reply(cookie, replies)]
        # CACHE: the data is as close as it gets; nothing to do.
        return [proto.ok_reply(cookie)]

    def _sendfile_read(self, export: Export, cookie: int, offset: int, length: int) -> bool:
        """Answer a read of a raw file export with ``sendfile`` (no copy through Python)."""
        window = export.file_window
        sender = self.sender
        if window is None or sender is None:
            return False
        file_node, base = window
        node = export.node
        if offset + length > node.size or node.read_interceptors:
            return False
        node._check_read(offset, length)
        node._begin()  # counted in flight on the export's node, so it cannot close under us
        try:
            driver = file_node.driver
            assert isinstance(driver, FileDriver)  # file_window promises it
            fd = driver.fd
            header = self.proto.read_reply_header(cookie, offset, length)
            return sender.sendfile(header, fd, base + offset, length)
        finally:
            node._end()

    def _sparse_read(self, export: Export, cookie: int, offset: int, length: int) -> list[Buffer]:
        node, proto, end = export.node, self.proto, offset + length
        hint_start, hint_end = export.data_hint
        if not hint_start <= offset < end <= hint_end:
            first = node.block_status_above(offset, min(node.size - offset, DATA_HINT_SPAN))
            if not first.zero and first.length >= length:
                export.data_hint = (offset, offset + first.length)
                hint_start, hint_end = export.data_hint
        if hint_start <= offset < end <= hint_end:
            buf = bytearray(length)
            node.pread_into(offset, buf)
            return proto.read_reply(cookie, offset, buf)
        extents: list[tuple[int, int, bool]] = []
        for status in node.extents(offset, length):
            zero = status.zero
            if extents and extents[-1][2] == zero:
                start, size, _ = extents[-1]
                extents[-1] = (start, size + status.length, zero)
            else:
                extents.append((status.offset, status.length, zero))
            if len(extents) > MAX_READ_PIECES:
                break
        if len(extents) > MAX_READ_PIECES or not any(zero for _, _, zero in extents):
            buf = bytearray(length)
            node.pread_into(offset, buf)
            return proto.read_reply(cookie, offset, buf)
        pieces: list[tuple[int, int, Buffer | None]] = []
        for start, size, zero in extents:
            if zero:
                pieces.append((start, size, None))
                continue
            buf = bytearray(size)
            try:
                node.pread_into(start, buf)
            except OSError as exc:
                error = (nbd_error(exc.errno), exc.strerror or str(exc), start)
                return proto.sparse_read_reply(cookie, pieces, error)
            pieces.append((start, size, buf))
        return proto.sparse_read_reply(cookie, pieces)

    @staticmethod
    def _status(
        node: BlockNode, context: str, offset: int, length: int, one: bool
    ) -> list[tuple[int, int]]:
        if context.startswith(DIRTY_BITMAP_PREFIX):
            from fleece.block.dirty_bitmap import status_extents

            name = context[len(DIRTY_BITMAP_PREFIX):]
            return status_extents(node, name, offset, length, one, MAX_STATUS_EXTENTS)
        depth = context == ALLOCATION_DEPTH
        extents: list[tuple[int, int]] = []
        for status in node.extents(offset, length):
            value = status.depth if depth else _base_allocation(status.flags)
            if extents and extents[-1][1] == value:
                extents[-1] = (extents[-1][0] + status.length, value)
            else:
                if one and extents:
                    break
                if len(extents) >= MAX_STATUS_EXTENTS:
                    break
                extents.append((status.length, value))
        return extents


def _parse_address(addr: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``SocketAddressLegacy`` (``{"type", "data": {...}}``) or the flat ``SocketAddress``."""
    kind = addr.get("type")
    data = addr.get("data", {k: v for k, v in addr.items() if k != "type"})
    if not isinstance(data, dict):
        raise GenericError("Invalid parameter type for 'addr.data', expected: object")
    if kind not in ("unix", "inet"):
        raise GenericError(f"NBD server address type '{kind}' is not supported (unix, inet)")
    return kind, data


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


class NBDServer:
    """The listeners, exports and connections of one NBD server (see the module note).

    ``tls`` (an ``ssl.SSLContext`` for the server side) makes TLS mandatory.
    ``max_connections`` bounds the connected clients (0 = unlimited); more are dropped on accept.
    ``workers``: I/O threads. Few are better on two cores: each one that wakes competes for the
    GIL (8 made 29 futex calls a 64 KiB write, 4 made 14; see docs/performance.md).
    """

    def __init__(
        self, *, tls: ssl.SSLContext | None = None, max_connections: int = 0, workers: int = 4
    ) -> None:
        self.tls = tls
        self.max_connections = max_connections
        #: permissions of unix sockets: owner-only unless the embedder asks otherwise
        self.socket_mode = 0o600
        self.exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self.directory = _Directory(self)
        self.addresses: list[str | tuple[str, int]] = []
        self.closing = False
        self.pool = IOPool(workers, "fleece-io")
        self.loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._thread = threading.Thread(target=self._run, name="fleece-nbd", daemon=True)
        self._thread.start()

    # -- the loop thread -------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def call(self, function: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine ``function()`` on the loop from another thread; its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("NBDServer.call from the server's own loop thread")

        async def wrapper() -> T:
            return await function()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(CALL_TIMEOUT)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` as a task on the loop, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- listening -------------------------------------------------------------------------------
    def listen(self, addr: dict[str, Any]) -> str | tuple[str, int]:
        """Listen on ``addr`` (``SocketAddressLegacy``); returns the bound address (a unix path,
        or ``(host, port)`` with the real port when ``port`` was ``"0"``). ``GenericError`` when
        the address is bad or taken."""
        kind, data = _parse_address(addr)
        if kind == "unix":
            path = data.get("path")
            if not isinstance(path, str) or not path:
                raise GenericError("Parameter 'addr.data.path' is missing")
            return self.call(lambda: self._listen_unix(path))
        host = data.get("host")
        port = data.get("port")
        if not isinstance(host, str) or not isinstance(port, str | int):
            raise GenericError("Parameters 'addr.data.host' and 'addr.data.port' are required")
        try:
            number = int(port)
        except ValueError:
            try:
                number = socket.getservbyname(str(port), "tcp")
            except OSError:
                raise GenericError(f"Service '{port}' is not known") from None
        return self.call(lambda: self._listen_tcp(host, number))

    async def _listen_unix(self, path: str) -> str:
        """Listen at ``path``: owner-only (0600), and there only once it accepts (bound and
        listening under a temporary name, then renamed into place)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        temporary = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            sock.bind(temporary)
            os.chmod(temporary, self.socket_mode)
            sock.listen(128)
            server = await self.loop.create_unix_server(lambda: Connection(self), sock=sock)
            os.replace(temporary, path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise GenericError(f"Failed to bind socket to {path}: {exc.strerror}") from None
        self._servers.append(server)
        self._unix_paths.append(path)
        self.addresses.append(path)
        return path

    async def _listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        try:
            server = await self.loop.create_server(
                lambda: Connection(self), host or None, port, reuse_address=True
            )
        except OSError as exc:
            raise GenericError(
                f"Failed to bind socket to {host}:{port}: {exc.strerror}"
            ) from None
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        address = (str(bound[0]), int(bound[1]))
        self.addresses.append(address)
        return address

    # -- exports ---------------------------------------------------------------------------------
    def add_export(self, export: Export) -> None:
        """Serve ``export``; ``GenericError`` when its name is taken."""

        async def add() -> None:
            if any(e.name == export.name for e in self.exports.values()):
                raise GenericError(f"NBD server already has export named '{export.name}'")
            self.exports[export.id] = export

        self.call(add)

    def remove_export(self, export_id: str, mode: str = "safe") -> Export:
        """Stop serving the export ``export_id`` and return it (its reference still held: the
        caller releases it). ``safe`` refuses while clients are connected (``GenericError``);
        ``hard`` disconnects them first."""

        async def remove() -> Export:
            export = self.exports.get(export_id)
            if export is None:
                raise GenericError(f"Export '{export_id}' is not found")
            if export.connections and mode != "hard":
                raise GenericError(f"export '{export.name}' still in use")
            export.shutting_down = True
            for connection in list(export.connections):
                connection.abort()
            del self.exports[export_id]
            return export

        return self.call(remove)

    def in_use(self, export_id: str) -> int:
        """How many clients use the export now."""
        export = self.exports.get(export_id)
        return 0 if export is None else len(export.connections)

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> list[Export]:
        """Stop listening, drop every client, stop the loop thread and the pool. Returns the
        exports that were served, their references still held (the caller releases them)."""
        if self.closing:
            return []

        async def shut() -> list[Export]:
            self.closing = True
            for server in self._servers:
                server.close()
            for connection in list(self.connections):
                connection.abort()
            for server in self._servers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 5)
            for task in list(self._tasks):
                task.cancel()
            exports = list(self.exports.values())
            for export in exports:
                export.shutting_down = True
                export.connections.clear()
            self.exports.clear()
            return exports

        try:
            exports = self.call(shut) if self._thread.is_alive() else []
        finally:
            self.closing = True
            self.pool.shutdown(wait=True)  # before the loop stops: the I/O reports to it
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CALL_TIMEOUT)
            for path in self._unix_paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return exports
