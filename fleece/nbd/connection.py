"""One NBD client: transport, back-pressure and the hand-off of requests to the I/O threads.

Design note: a connection is an ``asyncio.BufferedProtocol`` around the sans-I/O
:class:`~fleece.nbd.proto.ServerConnection`: the socket is read straight into the protocol's
buffer (and a WRITE payload straight into its own ``bytearray``). Its state is one
:class:`ConnState`, moved only through the ``_TRANSITIONS`` table. Each request runs in the
server's :class:`~fleece.nbd.pool.IOPool` (``os.preadv``/``os.pwritev`` release the GIL) through
:func:`fleece.nbd.backend.execute`, so several requests are in flight per connection and are
answered as they complete, out of order; reading pauses while the client is over its budget
(requests in flight, bytes of requests and of replies it has not read: see
:class:`Connection`). The I/O thread that produced a reply sends it (:mod:`fleece.nbd.sender`;
``sendfile`` for raw file exports). Two shortcuts skip the thread hand-off, which costs more
than a small request: small reads whose data is in the page cache (``RWF_NOWAIT``; otherwise
the pool does them), and small writes that arrive while nothing else of the client is in
flight (the page cache takes them at once; the price is that such a write, were it to wait for
the disk, would hold up the loop for that long).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from fleece.block import nowait
from fleece.nbd import dataplane
from fleece.nbd.backend import Buffer, Export, execute
from fleece.nbd.constants import Cmd
from fleece.nbd.proto import (
    OUTPUT_LIMIT,
    Disconnect,
    Event,
    ExportSelected,
    Phase,
    Request,
    ServerConnection,
    StartTLS,
)
from fleece.nbd.sender import DirectSender

if TYPE_CHECKING:
    from fleece._fast.dataplane import Plane
    from fleece.nbd.server import NBDServer

log = logging.getLogger(__name__)

#: the per-connection budget (see Connection): reading pauses at this many requests in flight,
#: as QEMU serves at most MAX_NBD_REQUESTS (16) requests of a client at once (nbd/server.c) ...
MAX_IN_FLIGHT = 16
#: ... or this many bytes held: payloads of requests in flight and replies the client has not
#: read yet (the request that crosses it may add its own length, 32 MiB at most)
MAX_HELD_BYTES = 8 * 1024 * 1024
#: ... or, with a native data plane, this many: it serves what it can map itself, so only its
#: misses reach Python (the first reads of ranges whose route nobody learned yet, writes that
#: must copy before they land). A burst of misses held 8 MiB per connection: nbdcopy -C 4
#: opening a fresh snapshot added 11 to 16 MiB to the daemon's peak RSS, most of the 1 GiB
#: scenario's budget of 48
PLANE_HELD_BYTES = 2 * 1024 * 1024
#: the transport asks us to stop writing above this many buffered bytes before transmission,
#: and in transmission (the replies after that wait in the connection's own, counted, queue)
NEGOTIATION_WRITE_HIGH = 64 * 1024
TRANSMISSION_WRITE_HIGH = 256 * 1024
#: replies smaller than this are joined into one write; bigger payloads are written separately
JOIN_BELOW = 64 * 1024
#: writes up to this size are done in the loop thread when nothing else is in flight
INLINE_WRITE_MAX = 16 * 1024
#: reads up to this size are tried in the loop thread first, from the page cache
INLINE_READ_MAX = 16 * 1024


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


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """Run ``callback(*args)`` in the loop from another thread (nothing once it closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


class Connection(asyncio.BufferedProtocol):
    """One client: moves bytes between the transport and a :class:`ServerConnection`.

    **The per-connection budget.** Reading from the client pauses while any of these holds, and
    resumes once none does (the first two below half their limit):

    - ``MAX_IN_FLIGHT`` (16, as in QEMU) requests are in flight;
    - the bytes held for it reach :attr:`held_limit` (``MAX_HELD_BYTES``, or
      ``PLANE_HELD_BYTES`` with a native data plane): payloads of its requests in flight plus
      its replies that the socket has not taken yet, wherever they wait (the direct sender's
      queue, the transport's buffer, on their way to the loop). The request that crosses the
      limit has started, so the most held is that limit plus one request (32 MiB at most,
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
        #: asyncio transport. With the native data plane it is the plane, which also reads.
        self.sender: DirectSender | Plane | None = None
        #: the native data plane when it owns the socket (see fleece.nbd.dataplane)
        self.plane: Plane | None = None
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
        self.plane = None
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

    def _take_over(self) -> DirectSender | Plane | None:
        """Who sends the replies from now on: the native data plane (which reads requests
        too) when it may take the socket, else a direct sender, else nobody (the
        transport)."""
        plane = self._native_plane()
        if plane is not None:
            return plane
        return self._direct_sender()

    def _native_plane(self) -> Plane | None:
        """Start the native data plane on a plain socket whose transport has nothing
        buffered, handing it the input not interpreted yet (None when it may not)."""
        transport, export = self.transport, self.export
        if (not dataplane.enabled() or self.server.tls is not None or transport is None
                or export is None):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size():
            return None
        loop = self.server.loop
        try:
            plane = dataplane.start(
                sock.fileno(), export, self.proto, self.contexts, self.peer,
                on_input=lambda data: _call_soon(loop, self._feed, data),
                on_error=lambda: _call_soon(loop, self.abort),
                on_progress=lambda: _call_soon(loop, self._progress),
                ceiling=self.server.fd_ceiling,
            )
        except OSError as exc:
            log.debug("NBD client %s: no native data plane: %s", self.peer, exc)
            return None
        if plane is None:
            return None
        transport.pause_reading()  # the plane reads the socket from now on
        self.plane = plane
        if self.paused:
            plane.pause_reading()
        return plane

    def _feed(self, data: bytes) -> None:
        """Requests the native plane hands over (loop thread): into the protocol, as if read
        from the socket, then let the plane go on."""
        plane = self.plane
        view = memoryview(data)
        try:
            while view and self.state is not ConnState.GONE:
                with self.get_buffer(len(view)) as buf:  # released before the buffer grows
                    n = min(len(buf), len(view))
                    buf[:n] = view[:n]
                view = view[n:]
                self.buffer_updated(n)
        except Exception:  # a bug must cost this connection, never the server
            log.exception("NBD connection failure (client %s)", self.peer)
            self.abort()
            return
        if plane is not None and self.state is not ConnState.GONE:
            plane.feed_done()

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
                self.sender = self._take_over()
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
            or held + self._unsent() >= self.held_limit // 2
        )

    @property
    def held_limit(self) -> int:
        """The bytes this client may have held before reading pauses (see the class note)."""
        return MAX_HELD_BYTES if self.plane is None else PLANE_HELD_BYTES

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
                or self.in_flight_bytes + unsent >= self.held_limit
            ):
                return
            self.paused = True
        (self.plane or transport).pause_reading()

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
            (self.plane or transport).resume_reading()

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
            self.sender = self._take_over()
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
        """Run ``request`` on the export's node (see :func:`fleece.nbd.backend.execute`)."""
        # Only a direct sender sends with sendfile; the plane reads file windows itself.
        sender = self.sender if isinstance(self.sender, DirectSender) else None
        return execute(export, request, self.proto, self.contexts, sender)
