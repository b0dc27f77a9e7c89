"""The NBD server: asyncio listeners and connections around :mod:`fleece.nbd.proto`.

Design note: the server runs its own event loop in a thread (``fleece-nbd``) for as long as it
is up; the public methods may be called from any other thread and hop onto the loop with
``asyncio.run_coroutine_threadsafe``. Connections are ``asyncio.BufferedProtocol``: the socket
is read straight into the protocol's buffer (and a WRITE payload straight into its own
``bytearray``). Each request runs in a small thread pool (``os.preadv``/``os.pwritev`` release
the GIL), so many requests are in flight per connection and are answered as they complete, out of
order; reading pauses while a client is over its budget (requests in flight, bytes of
requests and of replies it has not read: see :class:`Connection`). The server accepts
connections itself (:class:`_Listener`): it refuses clients past ``max-connections`` or near the
open-file limit, closes handshakes that take longer than ``handshake-max-seconds``, and writes
one audit line (:class:`AuditLog`) per refused, rejected or misbehaving client. The I/O
thread that produced a reply sends it (:mod:`fleece.nbd.sender`; ``sendfile`` for raw file
exports). Two shortcuts skip the thread hand-off, which costs more than a small
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
import ctypes
import enum
import errno
import logging
import os
import queue
import resource
import socket
import ssl
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleece.block import nowait
from fleece.block.driver import Status
from fleece.block.node import BlockNode
from fleece.block.root import Root
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
    OUTPUT_LIMIT,
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

#: the per-connection budget (see Connection): reading pauses at this many requests in flight
#: (QEMU: 16) ...
MAX_IN_FLIGHT = 128
#: ... or this many bytes held: payloads of requests in flight and replies the client has not
#: read yet (the request that crosses it may add its own length, 32 MiB at most)
MAX_HELD_BYTES = 8 * 1024 * 1024
#: the transport asks us to stop writing above this many buffered bytes before transmission,
#: and in transmission (the replies after that wait in the connection's own, counted, queue)
NEGOTIATION_WRITE_HIGH = 64 * 1024
TRANSMISSION_WRITE_HIGH = 256 * 1024
#: QEMU 7.2 closes a handshake not finished after 10 s (newer QEMU: handshake-max-seconds)
HANDSHAKE_TIMEOUT = 10.0
#: a client whose replies wait this long without the socket taking a byte is disconnected
DRAIN_TIMEOUT = 30.0
#: clients served at once unless nbd-server-start says otherwise (0 there: no limit)
DEFAULT_MAX_CONNECTIONS = 100
#: descriptors kept free under the open-file limit (QMP, images): clients past it are refused
FD_RESERVE = 64
#: how often the server looks for clients that stopped reading their replies
SWEEP_INTERVAL = 1.0
#: connections accepted per wake-up of a listener, and the pause after accept() failed
ACCEPT_BATCH = 32
ACCEPT_RETRY = 0.1
LISTEN_BACKLOG = 128
_PEERCRED = struct.Struct("3i")
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
CALL_TIMEOUT = 60.0

Buffer = bytes | bytearray | memoryview


@dataclass(eq=False)
class Export:
    """A node exported under ``name``, reached through ``root`` (its reference on the node,
    which a graph change may drain and move)."""

    id: str
    name: str
    root: Root
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
    def node(self) -> BlockNode:
        """The node the export serves now (requests resolve it through the root's gate)."""
        return self.root.node

    @property
    def file_window(self) -> tuple[BlockNode, int] | None:
        """``(file node, offset)`` when the export's bytes are a window of one posix file (a
        ``file`` node, or ``raw`` over one, with nobody guarding reads): ``sendfile`` may then
        serve reads."""
        node, base = self.node, 0
        while node.read_guard is None:
            if node.driver.posix_fd() is not None:
                return node, base
            window = node.driver.window()
            if window is None:
                return None
            node, offset = window
            base += offset
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


class ConnState(enum.Enum):
    """Where a connection is (see ``_TRANSITIONS``; any state may become ``GONE``)."""

    NEGOTIATING = "negotiating"
    #: STARTTLS was acknowledged: the transport is being upgraded, nothing is read meanwhile
    TLS = "tls"
    TRANSMISSION = "transmission"
    #: the client said goodbye or broke the protocol: what it sent before is answered, then
    #: the connection closes
    CLOSING = "closing"
    #: the transport is lost or aborted: nothing runs for this client any more
    GONE = "gone"


_TRANSITIONS: dict[tuple[ConnState, str], ConnState] = {
    (ConnState.NEGOTIATING, "starttls"): ConnState.TLS,
    (ConnState.TLS, "upgraded"): ConnState.NEGOTIATING,
    (ConnState.NEGOTIATING, "go"): ConnState.TRANSMISSION,
    (ConnState.NEGOTIATING, "close"): ConnState.CLOSING,
    (ConnState.TRANSMISSION, "close"): ConnState.CLOSING,
}


def _tls_failure(exc: BaseException) -> str:
    """What a failed TLS handshake was, for the audit line."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLCertVerificationError) or reason in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
        "NO_CERTIFICATES_RETURNED",
    ):
        return "peer verification failed"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return "TLS handshake rejected"


class Connection(asyncio.BufferedProtocol):
    """One client: moves bytes between the transport and a :class:`ServerConnection`.

    **The per-connection budget.** Reading from the client pauses while any of these holds, and
    resumes once none does (the first two below half their limit):

    - ``MAX_IN_FLIGHT`` requests are in flight (QEMU allows 16);
    - the bytes held for it reach ``MAX_HELD_BYTES``: payloads of its requests in flight plus
      its replies that the socket has not taken yet, wherever they wait (the direct sender's
      queue, the transport's buffer, on their way to the loop). The request that crosses the
      limit has started, so the most held is ``MAX_HELD_BYTES`` plus one request (32 MiB at most,
      as in QEMU, which holds up to 16 of them);
    - the transport asked us to stop writing (``pause_writing``: TLS, or replies written before
      the direct sender took over), its buffer being above ``NEGOTIATION_WRITE_HIGH`` before
      transmission and ``TRANSMISSION_WRITE_HIGH`` in it (replies then wait in ``_outbox``,
      counted, until ``resume_writing``);
    - the protocol holds input back because its own replies (negotiation answers, errors for
      invalid requests) are queued (``ServerConnection.output_blocked``).

    Requests parsed from bytes already received after reading paused wait in ``backlog``
    (bounded by the receive buffer). A client whose replies stay unread for ``drain_timeout``
    seconds is disconnected; one that has not reached transmission within
    ``handshake_timeout`` seconds is too. When the client is gone its queued requests are
    dropped unstarted and every buffer it held is released at once (no reference cycle keeps
    them: see :meth:`_release`).
    """

    def __init__(self, server: NBDServer, peer: str) -> None:
        self.server = server
        #: who the client is, for the log: ``host:port``, or ``unix:pid=P,uid=U``
        self.peer = peer
        self.state = ConnState.NEGOTIATING
        self.proto = ServerConnection(server.directory, tls=server.tls is not None)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.contexts: dict[int, str] = {}
        #: requests handed to the I/O threads, and their payload bytes (under ``count_lock``:
        #: the loop counts them in, the I/O threads count them out)
        self.count_lock = threading.Lock()
        self.in_flight = 0
        self.in_flight_bytes = 0
        #: reading paused to keep the client within its budget
        self.paused = False
        #: the transport asked us to stop writing (asyncio's pause_writing/resume_writing)
        self.write_paused = False
        #: events that arrived while the transport was being upgraded to TLS
        self.deferred: list[Event] = []
        #: requests parsed after reading paused (the rest of the bytes already received): they
        #: wait here, uncounted and unstarted, until the connection is below its limits again
        self.backlog: list[Request] = []
        #: replies go straight to the socket from the I/O threads (plain sockets, once the
        #: client chose an export and the transport's buffer is empty); None: through the
        #: asyncio transport
        self.sender: DirectSender | None = None
        #: bytes handed to the transport (with its buffer size: how much of them left)
        self.written = 0
        #: replies held while the transport asked us to stop writing, and their bytes
        self._outbox: deque[list[Buffer]] = deque()
        self._outbox_bytes = 0
        #: replies written before GO are still in the transport: switch to a direct sender
        #: once they left
        self._want_sender = False
        self._deadline: asyncio.TimerHandle | None = None
        #: ``(since, progress)`` while replies wait for the client (the drain timeout)
        self._stall: tuple[float, int] | None = None

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.state is ConnState.GONE:  # dropped before its transport existed
            transport.abort()
            return
        transport.set_write_buffer_limits(high=NEGOTIATION_WRITE_HIGH)
        timeout = self.server.handshake_timeout
        if timeout > 0:
            self._deadline = self.server.loop.call_later(timeout, self._handshake_expired)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is ConnState.GONE:
            return
        if self.proto.phase is Phase.TLS_HANDSHAKE:
            # The raw transport was paused at STARTTLS: these bytes come out of the TLS layer,
            # which may deliver them before start_tls() returns.
            self.proto.tls_started()
        try:
            events = self.proto.buffer_updated(nbytes)
        except Exception:  # a bug must cost this connection, never the server
            log.exception("NBD protocol failure (client %s)", self.peer)
            self.abort()
            return
        self._dispatch(events)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._drain_outbox()
        self._pump()

    # -- state -------------------------------------------------------------------------------
    def _move(self, verb: str) -> None:
        """Take the transition ``verb``; ``RuntimeError`` naming the state when it is illegal."""
        new = _TRANSITIONS.get((self.state, verb))
        if new is None:
            raise RuntimeError(f"NBD connection: '{verb}' in state {self.state.value}")
        self.state = new

    def _release(self) -> None:
        """The client is gone: drop its queued requests, replies and buffers now, and every
        link from the server's objects to this connection and back (no cycle keeps them)."""
        if self.state is ConnState.GONE:
            return
        self.state = ConnState.GONE
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        sender, self.sender = self.sender, None
        if sender is not None:
            sender.close()
        self.proto.release()
        self.backlog = []
        self.deferred = []
        self._outbox.clear()
        self._outbox_bytes = 0
        self._stall = None
        self.server.connections.discard(self)
        self.server.released = True
        if self.export is not None:
            self.export.connections.discard(self)

    def abort(self) -> None:
        """Drop the connection now (replies in flight are lost)."""
        transport = self.transport
        self._release()
        if transport is not None:
            transport.abort()

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self.state is not ConnState.GONE and self.export is None:
            self.server.audit(
                "handshake", "NBD client %s: handshake not finished within %g s; closing",
                self.peer, self.server.handshake_timeout)
            self.abort()

    # -- writing -------------------------------------------------------------------------------
    def _flush(self) -> None:
        data = self.proto.data_to_send()
        if data:
            self._send([data])

    def _send(self, buffers: list[Buffer]) -> None:
        if self.sender is not None:
            self.sender.send(buffers)
            return
        transport = self.transport
        if transport is None or transport.is_closing() or self.state is ConnState.GONE:
            return
        if self.write_paused or self._outbox:
            # The transport asked us to stop: the reply waits here, counted, rather than in
            # the transport (whose TLS layer would copy it twice more).
            self._outbox.append(buffers)
            self._outbox_bytes += sum(len(b) for b in buffers)
            return
        self._write(transport, buffers)

    def _drain_outbox(self) -> None:
        transport = self.transport
        while self._outbox and not self.write_paused:
            if transport is None or transport.is_closing() or self.state is ConnState.GONE:
                return
            buffers = self._outbox.popleft()
            self._outbox_bytes -= sum(len(b) for b in buffers)
            self._write(transport, buffers)

    def _write(self, transport: asyncio.Transport, buffers: list[Buffer]) -> None:
        self.written += sum(len(b) for b in buffers)
        if len(buffers) == 1:
            transport.write(buffers[0])
        elif sum(len(b) for b in buffers) < JOIN_BELOW:
            transport.write(b"".join(buffers))
        else:
            for buffer in buffers:
                transport.write(buffer)

    def _close_when_sent(self) -> None:
        """Close once every reply left: queued direct sends first (checked every 10 ms; the
        drain timeout ends the wait for a client that does not read them)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.state is ConnState.GONE:
            return
        if self._outbox or (
            self.sender is not None and self.sender.pending and not self.sender.closed
        ):
            self.server.loop.call_later(0.01, self._close_when_sent)
            return
        transport.close()

    def _direct_sender(self) -> DirectSender | None:
        """A direct sender for a plain socket whose transport has nothing buffered (None over
        TLS, or when the descriptor it needs would eat into the server's reserve)."""
        transport = self.transport
        self._want_sender = False
        if self.server.tls is not None or transport is None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        if transport.get_write_buffer_size():
            self._want_sender = True  # once the transport's buffer emptied (see _pump)
            return None
        try:
            sender = DirectSender(self.server.loop, sock.fileno(), self.abort, self._progress)
        except OSError:
            return None
        if sender.fileno >= self.server.fd_ceiling:  # keep the reserve for QMP and images
            sender.close()
            return None
        return sender

    def _unsent(self) -> int:
        """Reply bytes the socket has not taken yet (loop thread)."""
        sender, transport = self.sender, self.transport
        unsent = self._outbox_bytes
        if sender is not None:
            unsent += sender.pending
        if transport is not None:
            unsent += transport.get_write_buffer_size()
        return unsent

    def _progress(self) -> None:
        """The socket took queued replies (loop thread): reading may resume."""
        if self.state is not ConnState.CLOSING:
            self._pump()

    def tick(self, now: float) -> None:
        """Called every ``SWEEP_INTERVAL`` (loop thread): the drain timeout, and a second look
        at a paused client (reading resumes even if a wake-up went astray)."""
        self.check_drain(now)
        if self.paused and self.state is not ConnState.GONE:
            self._pump()

    def check_drain(self, now: float) -> None:
        """Disconnect a client whose replies have waited ``drain_timeout`` seconds without the
        socket taking a byte of them."""
        transport = self.transport
        if transport is None or self.state is ConnState.GONE:
            return
        unsent = self._unsent()
        if not unsent:
            self._stall = None
            return
        sender = self.sender
        mark = self.written - transport.get_write_buffer_size() + (
            sender.sent if sender is not None else 0)
        if self._stall is None or self._stall[1] != mark:
            self._stall = (now, mark)
            return
        timeout = self.server.drain_timeout
        if timeout > 0 and now - self._stall[0] >= timeout:
            self.server.audit(
                "drain", "NBD client %s: %d bytes of replies unread for %g s; disconnecting",
                self.peer, unsent, timeout)
            self.abort()

    # -- reading -------------------------------------------------------------------------------
    def _dispatch(self, events: list[Event]) -> None:
        """Act on ``events`` from the protocol, then go on with input it held back for as long
        as the client takes our replies; then pause or resume reading."""
        while True:
            if self.state is ConnState.TLS:
                # start_tls() has not handed us the TLS transport yet: reply once it has.
                self.deferred += events
                return
            self._flush()
            try:
                for event in events:
                    self._handle(event)
            except Exception:  # a bug must cost this connection, never the server
                log.exception("NBD connection failure (client %s)", self.peer)
                self.abort()
                return
            self._flush()
            if (
                self.state is ConnState.GONE
                or not self.proto.output_blocked
                or self._output_full()
            ):
                break
            events = self.proto.resume()
        self._update_reading()

    def _output_full(self) -> bool:
        """Replies wait for the client: the protocol's own must wait too."""
        sender = self.sender
        return self.write_paused or bool(self._outbox) or (
            sender is not None and sender.pending >= OUTPUT_LIMIT)

    def _pump(self) -> None:
        """Output drained (loop thread): input held back goes on, and reading may resume."""
        if self.state in (ConnState.GONE, ConnState.TLS):
            return
        if self._want_sender and self.sender is None and not self._outbox:
            transport = self.transport
            if transport is not None and not transport.get_write_buffer_size():
                self.sender = self._direct_sender()
        if self.proto.output_blocked and not self._output_full():
            self._dispatch([])
        else:
            self._update_reading()

    def _may_resume(self) -> bool:
        with self.count_lock:
            count, held = self.in_flight, self.in_flight_bytes
        return not (
            self.write_paused
            or self.proto.output_blocked
            or count >= MAX_IN_FLIGHT // 2
            or held + self._unsent() >= MAX_HELD_BYTES // 2
        )

    def _check_pause(self) -> None:
        """Pause reading when the client reached its budget (loop thread). ``paused`` is set
        under ``count_lock``: an I/O thread that counts a request out after that wakes the
        loop, so the resume is never missed."""
        transport = self.transport
        if self.paused or transport is None:
            return
        unsent = self._unsent()  # shrinks only in the loop: safe to read before the lock
        with self.count_lock:
            if not (
                self.write_paused
                or self.proto.output_blocked
                or self.in_flight >= MAX_IN_FLIGHT
                or self.in_flight_bytes + unsent >= MAX_HELD_BYTES
            ):
                return
            self.paused = True
        transport.pause_reading()

    def _update_reading(self) -> None:
        """Pause or resume reading to keep the client within its budget (loop thread)."""
        transport = self.transport
        if transport is None or self.state not in (ConnState.NEGOTIATING,
                                                   ConnState.TRANSMISSION):
            return
        if not self.paused:
            self._check_pause()
            return
        if not self._may_resume():
            return
        self.paused = False
        backlog, self.backlog = self.backlog, []
        for request in backlog:  # in order; any of them may pause the connection again
            self._submit(request)
        if not self.paused and self.transport is transport:  # still there, still ours
            transport.resume_reading()

    def _handle(self, event: Event) -> None:
        if isinstance(event, Request):
            self._submit(event)
        elif isinstance(event, ExportSelected):
            export = self.server.directory.lookup(event.export.name)
            if export is None:
                self.abort()
                return
            self._move("go")
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self.export = export
            self.contexts = event.contexts
            export.connections.add(self)
            self._flush()
            if self.transport is not None:  # room for a few replies before they wait
                self.transport.set_write_buffer_limits(high=TRANSMISSION_WRITE_HIGH)
            self.sender = self._direct_sender()
        elif isinstance(event, StartTLS):
            if self.transport is not None:
                self._flush()
                self.transport.pause_reading()  # not one plain byte more
            self._move("starttls")
            self.server.spawn(self._start_tls())
        elif isinstance(event, Disconnect):
            if event.error:
                self.server.audit("violation", "NBD client %s: protocol violation, closing: %s",
                                  self.peer, event.reason)
            else:
                log.debug("NBD client %s: %s", self.peer, event.reason)
                # NBD_CMD_DISC: the requests sent before it are still answered
                backlog, self.backlog = self.backlog, []
                for request in backlog:
                    self._submit(request, held=True)
            self._move("close")
            with self.count_lock:
                idle = self.in_flight == 0
            if idle:
                self._flush()
                self._close_when_sent()

    async def _start_tls(self) -> None:
        transport, context = self.transport, self.server.tls
        assert transport is not None and context is not None
        loop = asyncio.get_running_loop()
        timeout = self.server.handshake_timeout
        try:
            upgraded = await loop.start_tls(
                transport, self, context, server_side=True,
                ssl_handshake_timeout=timeout if timeout > 0 else None,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            if self.state is not ConnState.GONE:
                self.server.audit("tls", "NBD client %s: %s: %s", self.peer, _tls_failure(exc),
                                  exc)
            self.abort()
            return
        if upgraded is None or self.state is not ConnState.TLS:
            self.abort()
            return
        self.transport = upgraded
        upgraded.set_write_buffer_limits(high=NEGOTIATION_WRITE_HIGH)
        self._move("upgraded")
        if self.proto.phase is Phase.TLS_HANDSHAKE:
            self.proto.tls_started()
        events, self.deferred = self.deferred, []
        self._dispatch(events)

    # -- requests ----------------------------------------------------------------------------
    def _submit(self, request: Request, held: bool = False) -> None:
        """Start ``request``, or keep it in the backlog while the connection is paused
        (``held``: start it all the same, the client said goodbye after it)."""
        export = self.export
        if export is None or self.transport is None or self.state is ConnState.GONE:
            return
        if self.paused and not held:
            self.backlog.append(request)
            return
        if (
            request.command == Cmd.READ
            and request.length <= INLINE_READ_MAX
            and self.sender is not None
            and self._read_inline(export, request)
        ):
            self._check_pause()  # replies the client does not read: stop taking requests
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
            self._check_pause()
            return
        cost = request.length if request.command in (Cmd.READ, Cmd.WRITE) else 0
        with self.count_lock:
            self.in_flight += 1
            self.in_flight_bytes += cost
        self._check_pause()
        self.server.pool.submit(self._work, export, request, cost)

    def _work(self, export: Export, request: Request, cost: int) -> None:
        """Run a request in an I/O thread and send its reply from there when the connection
        has a direct sender. The loop hears about it only when it must act: a reply to write
        through the transport, reading to resume, or a connection to close. A request whose
        client is gone is dropped unstarted."""
        failed = False
        buffers: list[Buffer] | None = None
        if self.state is not ConnState.GONE:
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
            if not buffers:  # else counted out once the loop handed them to the transport
                self.in_flight_bytes -= cost
            state = self.state
            wake = state is not ConnState.GONE and (
                failed or bool(buffers) or self.paused
                or (state is ConnState.CLOSING and self.in_flight == 0))
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is gone: so is the connection
                self.server.loop.call_soon_threadsafe(
                    self._completed, buffers, failed, cost if buffers else 0)

    def _completed(self, buffers: list[Buffer] | None, failed: bool, cost: int) -> None:
        """In the loop: act on a finished request (see :meth:`_work`)."""
        if buffers:
            self._send(buffers)
            with self.count_lock:
                self.in_flight_bytes -= cost
        if self.state is ConnState.GONE:
            return
        if failed:
            self.abort()
            return
        with self.count_lock:
            idle = self.in_flight == 0
        if self.state is ConnState.CLOSING:
            if idle:
                self._flush()
                self._close_when_sent()
            return
        self._pump()

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
            node = export.root.begin()  # the node this request goes to, held until its end
            try:
                return self._perform(export, node, request)
            finally:
                export.root.end()
        except nowait.WouldBlock:
            raise
        except OSError as exc:
            return [proto.error_reply(cookie, nbd_error(exc.errno), exc.strerror or str(exc))]
        except GenericError as exc:
            return [proto.error_reply(cookie, NBDErr.EIO, str(exc))]

    def _perform(self, export: Export, node: BlockNode, request: Request) -> list[Buffer]:
        proto, cookie = self.proto, request.cookie
        command, flags = request.command, request.flags
        offset, length = request.offset, request.length
        if command == Cmd.READ:
            direct = self.sender is not None and length >= SENDFILE_ABOVE and export.file_window
            if direct and self._sendfile_read(export, node, cookie, offset, length):
                return []
            if proto.structured and not flags & CmdFlag.DF and length >= SPARSE_READ_MIN:
                return self._sparse_read(export, node, cookie, offset, length)
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

    def _sendfile_read(self, export: Export, node: BlockNode, cookie: int, offset: int,
                       length: int) -> bool:
        """Answer a read of a raw file export with ``sendfile`` (no copy through Python)."""
        window = export.file_window
        sender = self.sender
        if window is None or sender is None:
            return False
        file_node, base = window
        if offset + length > node.size or node.read_guard is not None:
            return False
        node.check_read(offset, length)
        with node.request():  # counted in flight on the export's node: it cannot close under us
            fd = file_node.driver.posix_fd()
            if fd is None:  # closed meanwhile
                return False
            header = self.proto.read_reply_header(cookie, offset, length)
            return sender.sendfile(header, fd, base + offset, length)

    def _sparse_read(self, export: Export, node: BlockNode, cookie: int, offset: int,
                     length: int) -> list[Buffer]:
        proto, end = self.proto, offset + length
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


def _peer_name(sock: socket.socket, addr: Any) -> str:
    """``host:port`` for TCP, ``unix:pid=P,uid=U`` for a unix socket (the peer's credentials)."""
    if sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError:
            return "unix"
        pid, uid, _ = _PEERCRED.unpack(raw)
        return f"unix:pid={pid},uid={uid}"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


class _Listener:
    """A listening socket whose connections the server accepts itself rather than through
    asyncio's ``Server``, so that it can refuse at its limits, log the peer, and back off for
    a moment (instead of spinning or logging a storm) when accept() fails for want of
    descriptors or memory."""

    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        sock.setblocking(False)
        self._retry: asyncio.TimerHandle | None = None
        self.watch()

    def watch(self) -> None:
        self._retry = None
        self.server.loop.add_reader(self.sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self.server.accept_failed(self, exc)
                return
            self.server.accepted(conn, addr)

    def pause(self, seconds: float) -> None:
        """Stop accepting for ``seconds``."""
        if self._retry is None:
            self.server.loop.remove_reader(self.sock.fileno())
            self._retry = self.server.loop.call_later(seconds, self.watch)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        with contextlib.suppress(Exception):
            self.server.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _trim_heap() -> None:
    """Give the free pages of every malloc heap back to the system. The reply and payload
    buffers of a departed client are freed at once, but glibc keeps freed memory of buffers
    below its (growing) mmap threshold in its heaps; without this the daemon's RSS would stay
    at its peak after an attack."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _fd_ceiling() -> int:
    """Accepted sockets must stay below this descriptor number: ``FD_RESERVE`` descriptors
    under the open-file limit stay free for QMP, images and the server's own needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        return 1 << 24
    return max(soft - FD_RESERVE, soft // 2)


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
    ``max_connections`` bounds the connected clients, those still in their handshake included
    (0 = unlimited); more are refused on accept, as are clients that would leave fewer than
    ``FD_RESERVE`` descriptors under the open-file limit. ``handshake_timeout`` closes a client
    that has not reached transmission after that many seconds (0 = never); ``drain_timeout``
    one whose replies wait that long without the socket taking a byte (0 = never).
    ``workers``: I/O threads. Few are better on two cores: each one that wakes competes for the
    GIL (8 made 29 futex calls a 64 KiB write, 4 made 14; see docs/performance.md).
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
        workers: int = 4,
    ) -> None:
        self.tls = tls
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.drain_timeout = drain_timeout
        self.audit = AuditLog(log)
        self.fd_ceiling = _fd_ceiling()
        #: a descriptor given up at the open-file limit to accept and refuse a waiting client
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        #: permissions of unix sockets: owner-only unless the embedder asks otherwise
        self.socket_mode = 0o600
        self.exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self.directory = _Directory(self)
        self.addresses: list[str | tuple[str, int]] = []
        self.closing = False
        self.pool = IOPool(workers, "fleece-io")
        self.loop = asyncio.new_event_loop()
        self._listeners: list[_Listener] = []
        self._unix_paths: list[str] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        #: a connection went since the last sweep (its memory is handed back then)
        self.released = False
        self._thread = threading.Thread(target=self._run, name="fleece-nbd", daemon=True)
        self._thread.start()
        self.loop.call_soon_threadsafe(self._sweep)

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

    def _sweep(self) -> None:
        """Every ``SWEEP_INTERVAL``: drain timeouts, a look at paused clients, the audit
        summaries."""
        now = time.monotonic()
        for connection in list(self.connections):
            connection.tick(now)
        self.audit.flush(now)
        if self.released:  # what departed clients held goes back to the system now
            self.released = False
            _trim_heap()
        if not self.closing:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- accepting -------------------------------------------------------------------------------
    def accepted(self, sock: socket.socket, addr: Any) -> None:
        """A client connected (loop thread): serve it, or refuse it at a limit."""
        if self.closing:
            sock.close()
            return
        peer = _peer_name(sock, addr)
        if sock.fileno() >= self.fd_ceiling:
            sock.close()
            self.audit("fd-limit", "NBD client %s refused: near the open-file limit (%d "
                       "descriptors kept for QMP and images)", peer, FD_RESERVE)
            return
        limit = self.max_connections
        if limit and len(self.connections) >= limit:
            sock.close()
            self.audit("refused", "NBD client %s refused: %d connections is the limit",
                       peer, limit)
            return
        connection = Connection(self, peer)
        self.connections.add(connection)  # holds its slot from now on
        self.spawn(self._attach(connection, sock))

    async def _attach(self, connection: Connection, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: connection, sock)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("NBD client %s: %s", connection.peer, exc)
            connection.abort()
            sock.close()

    def accept_failed(self, listener: _Listener, exc: OSError) -> None:
        """accept() failed (loop thread): at the open-file limit, refuse the waiting client
        with the spare descriptor and log once per interval; back off for a moment."""
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.audit("fd-limit", "NBD server: accept() failed (%s): refusing clients until "
                       "descriptors are free", exc.strerror)
            if self._spare is not None:
                os.close(self._spare)
                self._spare = None
                with contextlib.suppress(OSError):
                    conn, _ = listener.sock.accept()
                    conn.close()
                with contextlib.suppress(OSError):
                    self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        else:
            log.warning("NBD server: accept() failed: %s", exc)
        listener.pause(ACCEPT_RETRY)

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
        for member in ("host", "port"):  # InetSocketAddress: both strings, as QEMU's schema says
            if member not in data:
                raise GenericError(f"Parameter 'addr.data.{member}' is missing")
            if not isinstance(data[member], str):
                raise GenericError(
                    f"Invalid parameter type for 'addr.data.{member}', expected: string")
        host: str = data["host"]
        port: str = data["port"]
        if port.isdigit() and int(port) > 65535:
            # QEMU would listen on the port modulo 65536; fleece refuses (QEMU's words for a
            # port beyond the range elsewhere)
            raise GenericError(f"port {port} out of range")
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
            sock.listen(LISTEN_BACKLOG)
            listener = _Listener(self, sock)
            os.replace(temporary, path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise GenericError(f"Failed to bind socket to {path}: {exc.strerror}") from None
        self._listeners.append(listener)
        self._unix_paths.append(path)
        self.addresses.append(path)
        return path

    async def _listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on every address ``host`` resolves to (only the first with port 0, whose
        port the kernel chooses)."""
        try:
            infos = await self.loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise GenericError(
                f"address resolution failed for {host}:{port}: {exc.strerror}") from None
        if port == 0:
            infos = infos[:1]
        socks: list[socket.socket] = []
        try:
            for family, kind, number, _, address in infos:
                sock = socket.socket(family, kind, number)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            for sock in socks:
                sock.close()
            if exc.errno == errno.EADDRINUSE:  # QEMU's words (it tried every port it could)
                raise GenericError(
                    f"Failed to find an available port: {exc.strerror}") from None
            raise GenericError(f"Failed to bind socket: {exc.strerror}") from None
        self._listeners += [_Listener(self, sock) for sock in socks]
        bound = socks[0].getsockname()
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
            if self._sweeper is not None:
                self._sweeper.cancel()
            for listener in self._listeners:
                listener.close()
            self._listeners.clear()
            for connection in list(self.connections):
                connection.abort()
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
            if self._spare is not None:
                os.close(self._spare)
                self._spare = None
        return exports
