"""``nbd``: a node whose bytes live on a remote NBD server (QEMU's ``nbd`` block driver).

Options are QEMU's ``BlockdevOptionsNbd``: ``server`` (a flat ``SocketAddress``: ``{"type":
"unix", "path": ...}`` or ``{"type": "inet", "host": ..., "port": ...}``), ``export``,
``tls-creds`` (a ``tls-creds-x509`` object with ``endpoint: client``), ``tls-hostname``,
``reconnect-delay`` and ``open-timeout`` (seconds), and ``multi-conn`` (QEMU 9's spelling: how
many connections to open, 1 to 16, default 1; more than one only when the server advertises
``NBD_FLAG_CAN_MULTI_CONN``, else one and a log line saying so). ``x-request-timeout`` is fleece's
own (QEMU has none): seconds a request may wait for the server to take or send a byte before
its connection counts as lost (0, the default: forever, as QEMU), so a server that hangs with
its socket open is handled like one that went away.

Design note: each connection (:class:`fleece.nbd.client.NBDClient`, the client half of the
protocol) is shared by the threads that use the node: each request is sent as soon as its
thread has it and its reply is awaited beside the others' (a backup job's workers keep one
write each in flight, as QEMU's driver keeps many), so the server receives the next write while
it stores the last. With TLS a connection carries one request at a time: the request holds the
connection's lock from its send to its reply. A request takes the first connection not held from
a rotating start (so even one thread's requests go round all of them). A flush goes to every
connection in turn (the spec says one is enough with multi-conn; every one also covers a server
that advertises it wrongly). The node's link has one state (:class:`Link`). When the server goes
away (the socket fails, or the reply is cut), every request on that connection sees it; the
first to take the connection's lock closes it and connects again, holding the lock, for up to
``reconnect-delay`` seconds since the loss (the requests behind it wait on the lock, as QEMU's
wait for the reconnect), then each sends itself again: every NBD command fleece sends is
idempotent.
Each connection finds out about a lost server by itself and reconnects alone; a loss seen while
the link is ``CONNECTED`` starts a new delay. Past the delay the link is ``FAILED``: that request
and each later one try one connection and, when it fails, fail with ``EIO`` (the backup job
then applies its ``on-target-error`` policy). An error the server replies with is the request's
error, never a reason to reconnect. A request that loses its connection again after a
reconnect, ``reconnect-delay`` seconds after its first loss (at once without a delay), fails
with ``EIO`` by itself: a server that takes connections but hangs on (or dies of) that request
is not retried forever.

Block status asks ``base:allocation``: a hole or zero range on the server is reported so, and
zeroes written here are ``NBD_CMD_WRITE_ZEROES`` (``NBD_CMD_FLAG_NO_HOLE`` unless the caller may
unmap) rather than data. When the server advertises ``SEND_FAST_ZERO``, each is first sent with
``NBD_CMD_FLAG_FAST_ZERO``; a server that answers ``ENOTSUP`` (it would have to write the zeroes)
gets the plain request at once, and no more fast tries with the same flags on this node (the
answer depends on the kind of request, not its range, for the servers we know).
:meth:`NBDDriver.try_fast_zero` zeroes only when the server can do it fast (for pre-zeroing a
whole target).
Discards are ``NBD_CMD_TRIM`` when the node was opened with ``discard: unmap`` (QEMU's rule:
ignored otherwise).
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from typing import Any, ClassVar, TypeVar

from fleece.block.driver import BlockStatus, Driver, Options, Status
from fleece.errors import GenericError
from fleece.nbd.client import NBDClient, NBDError, NegotiationError
from fleece.nbd.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    AllocationFlag,
    CmdFlag,
    NBDErr,
    TransmissionFlag,
)
from fleece.nbd.tls import TLSCredsX509, client_context

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how often a reconnecting request tries the server again
RETRY_INTERVAL = 0.1
#: the longest a connect attempt may take (a server that accepts and then says nothing)
CONNECT_TIMEOUT = 5.0
#: the most bytes one WRITE_ZEROES, TRIM or BLOCK_STATUS asks about (the length is 32 bits)
MAX_RANGE = 1 << 30
#: the most connections ``multi-conn`` may ask for (QEMU 9's bound)
MAX_MULTI_CONN = 16


class Link(enum.Enum):
    """The connection's state: ``CONNECTED``; ``RECONNECTING`` (lost, still within
    ``reconnect-delay``: requests wait); ``FAILED`` (lost for longer: requests try one
    connection, else fail with ``EIO``); ``CLOSED`` (the node closed)."""

    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"


class _Connection:
    """One connection to the server (None while lost) and its lock: held to replace the
    client, and by a request from its send to its reply when the client is not concurrent."""

    def __init__(self, client: NBDClient | None) -> None:
        self.client = client
        self.lock = threading.Lock()


class NBDDriver(Driver):
    name: ClassVar[str] = "nbd"

    _conns: tuple[_Connection, ...] = ()
    _size = 0
    link = Link.CLOSED

    def open(self, options: Options) -> None:
        self.address = _socket_address(options.raw("server"))
        self.export = options.str("export", "") or ""
        creds_id = options.str("tls-creds")
        self.tls_hostname = options.str("tls-hostname")
        self.reconnect_delay = options.int("reconnect-delay", 0, minimum=0) or 0
        open_timeout = options.int("open-timeout", 0, minimum=0) or 0
        self.request_timeout = options.int("x-request-timeout", 0, minimum=0) or 0
        multi_conn = options.int("multi-conn", 1)
        assert multi_conn is not None
        if not 1 <= multi_conn <= MAX_MULTI_CONN:
            raise GenericError(f"Parameter 'multi-conn' expects an integer from 1 to "
                               f"{MAX_MULTI_CONN}, got {multi_conn}")
        options.finish()  # unknown options are refused before any connection, as QEMU's
        self._tls: ssl.SSLContext | None = None
        if creds_id is not None:
            creds = self.node.graph.objects.get(creds_id)
            if not isinstance(creds, TLSCredsX509):
                raise GenericError(f"No TLS credentials with id '{creds_id}'")
            if creds.endpoint != "client":
                raise GenericError("Expecting TLS credentials with a client endpoint")
            hostname = self.tls_hostname
            if hostname is None and self.address[0] == "inet":
                hostname = self.address[1]
            self._tls = client_context(creds.dir, creds.verify_peer, hostname)
            self._tls_name = hostname
        elif self.tls_hostname is not None:
            raise GenericError("tls-hostname is set but tls-creds is not")
        self._state = threading.Lock()  # link, _lost_at and _next
        deadline = time.monotonic() + open_timeout
        while True:
            try:
                client = self._connect()
                break
            except (OSError, NegotiationError) as exc:
                if time.monotonic() >= deadline:
                    raise GenericError(f"Failed to connect to '{self._where()}': "
                                       f"{_reason(exc)}") from None
                time.sleep(RETRY_INTERVAL)
        if not self.node.read_only and client.flags & TransmissionFlag.READ_ONLY:
            client.close()
            raise GenericError(f"export '{self.export}' of '{self._where()}' is read-only; "
                               "open the node with read-only: true")
        clients = [client]
        if multi_conn > 1 and not client.flags & TransmissionFlag.CAN_MULTI_CONN:
            log.info("nbd node %r: %s does not offer multi-conn; one connection, not %d",
                     self.node.name, self._where(), multi_conn)
        elif multi_conn > 1:
            try:
                while len(clients) < multi_conn:
                    more = self._connect()
                    clients.append(more)
                    if more.size != client.size or more.flags != client.flags:
                        raise NegotiationError("the export changed between connections")
            except (OSError, NegotiationError) as exc:
                for each in clients:
                    each.close()
                raise GenericError(f"Failed to connect to '{self._where()}' (connection "
                                   f"{len(clients)} of {multi_conn}): {_reason(exc)}") from None
        self._conns = tuple(_Connection(each) for each in clients)
        self._next = 0
        self._size = client.size
        self.flags = client.flags
        self._max = min(MAX_PAYLOAD, client.block_size[2] if client.block_size else MAX_PAYLOAD)
        self.link = Link.CONNECTED
        self._lost_at = 0.0
        #: the WRITE_ZEROES flags the server refused to do fast (ENOTSUP to FAST_ZERO)
        self._slow_zero: set[CmdFlag] = set()
        log.debug("nbd node %r: %s, %d bytes, flags 0x%x", self.node.name, self.filename(),
                  self._size, int(client.flags))

    # -- the connection ----------------------------------------------------------------------
    def _where(self) -> str:
        kind, host, port = self.address
        return host if kind == "unix" else f"{host}:{port}"

    def _connect(self) -> NBDClient:
        kind, host, port = self.address
        timeout = min(CONNECT_TIMEOUT, self.request_timeout or CONNECT_TIMEOUT)
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(host)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            client = NBDClient(sock, self.export, tls=self._tls,
                               server_hostname=getattr(self, "_tls_name", None))
            client.sock.settimeout(self.request_timeout or None)
        except BaseException:
            sock.close()
            raise
        return client

    @property
    def connections(self) -> int:
        """How many connections to the server are open now."""
        return sum(conn.client is not None for conn in self._conns)

    def _lost(self, conn: _Connection, client: NBDClient, exc: BaseException) -> None:
        """``client``, ``conn``'s, broke under a request: close it, unless another request saw
        the loss first (then ``conn`` is closed or has a new client already); a loss seen while
        the link is up starts the ``reconnect-delay``."""
        with conn.lock:
            if conn.client is not client:
                return
            log.warning("nbd node %r: connection to %s lost: %s", self.node.name,
                        self._where(), exc)
            conn.client = None
            with suppress(OSError):
                client.sock.close()
        with self._state:
            if self.link is Link.CONNECTED:
                self.link = Link.RECONNECTING
                self._lost_at = time.monotonic()

    def _reconnect(self, conn: _Connection) -> NBDClient:
        """``conn`` connected again (its lock held): retried until ``reconnect-delay`` seconds
        after the loss, once when that has passed. ``EIO`` when there is none."""
        while True:
            try:
                client = self._connect()
            except (OSError, NegotiationError) as exc:
                with self._state:
                    if self.link is Link.CONNECTED:  # news to this node: a loss
                        self.link = Link.RECONNECTING
                        self._lost_at = time.monotonic()
                    waited = time.monotonic() - self._lost_at
                    retry = self.link is Link.RECONNECTING and waited < self.reconnect_delay
                    if not retry and self.link is Link.RECONNECTING:
                        log.warning("nbd node %r: no connection to %s for %d s, failing "
                                    "requests", self.node.name, self._where(),
                                    self.reconnect_delay)
                        self.link = Link.FAILED
                if retry:
                    time.sleep(min(RETRY_INTERVAL, self.reconnect_delay - waited))
                    continue
                raise OSError(errno.EIO, f"nbd node '{self.node.name}': no connection to "
                              f"'{self._where()}': {_reason(exc)}") from None
            if client.size != self._size:
                client.close()
                with self._state:
                    self.link = Link.FAILED
                raise OSError(errno.EIO, f"nbd node '{self.node.name}': the export's size "
                              f"changed from {self._size} to {client.size}")
            log.info("nbd node %r: reconnected to %s", self.node.name, self._where())
            conn.client = client
            with self._state:
                if self.link is not Link.CLOSED:
                    self.link = Link.CONNECTED
            return client

    def _take(self) -> _Connection:
        """A connection: the first one not held from a rotating start, else the one at the
        start."""
        conns = self._conns
        with self._state:
            start = self._next
            self._next = (start + 1) % len(conns)
        for i in range(len(conns)):
            conn = conns[(start + i) % len(conns)]
            if not conn.lock.locked():
                return conn
        return conns[start]

    def _client(self, conn: _Connection) -> NBDClient:
        """``conn``'s client, connected again first if it was lost (``EIO`` when it cannot
        be, ``ENODEV`` once the node is closed)."""
        with conn.lock:
            if self.link is Link.CLOSED:
                raise OSError(errno.ENODEV, f"nbd node '{self.node.name}' is closed")
            client = conn.client
            if client is None:
                client = self._reconnect(conn)
            return client

    def _on(self, conn: _Connection, request: Callable[..., T], *args: Any) -> T:
        """``request(client, *args)`` on ``conn``, reconnecting as the module note says.
        Raises ``OSError``: the server's error, or ``EIO`` without a connection."""
        first_loss: float | None = None
        while True:
            client = self._client(conn)
            try:
                with nullcontext() if client.concurrent else conn.lock:
                    return request(client, *args)
            except NBDError:
                raise
            except (OSError, ValueError, KeyError, struct.error) as exc:
                # not OSError: a reply the client could not make sense of (a cut stream)
                self._lost(conn, client, exc)
                now = time.monotonic()
                if first_loss is None:
                    first_loss = now
                elif now - first_loss >= self.reconnect_delay:
                    # the server takes connections but loses this request every time (it
                    # hangs on it, or dies of it): this request gives up, the link stays
                    raise OSError(errno.EIO, f"nbd node '{self.node.name}': the request "
                                  f"failed on every connection to '{self._where()}' for "
                                  f"{self.reconnect_delay} s: {_reason(exc)}") from None

    def _call(self, request: Callable[..., T], *args: Any) -> T:
        """``request(client, *args)`` on one connection (see :meth:`_on`)."""
        if not self._conns:
            raise OSError(errno.ENODEV, f"nbd node '{self.node.name}' is not open")
        return self._on(self._take(), request, *args)

    # -- the vtable --------------------------------------------------------------------------
    def size(self) -> int:
        return self._size

    def filename(self) -> str:
        kind, host, port = self.address
        if kind == "unix":
            return f"nbd+unix:///{self.export}?socket={host}"
        return f"nbd://{host}:{port}/{self.export}"

    def preadv(self, offset: int, buf: memoryview) -> None:
        at = 0
        while at < len(buf):
            chunk = min(len(buf) - at, self._max)
            data = self._call(NBDClient.pread, offset + at, chunk)
            buf[at:at + chunk] = data
            at += chunk

    def pwritev(self, offset: int, data: memoryview) -> None:
        at = 0
        while at < len(data):
            chunk = min(len(data) - at, self._max)
            self._call(NBDClient.pwrite, offset + at, data[at:at + chunk])
            at += chunk

    def pwrite_from_file(self, offset: int, fd: int, host: int, length: int) -> bool:
        """The payload goes from the file to the socket with ``sendfile``; not over TLS."""
        if self._tls is not None:
            return False
        at = 0
        while at < length:
            chunk = min(length - at, self._max)
            self._call(NBDClient.pwrite_file, offset + at, fd, host + at, chunk)
            at += chunk
        return True

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if not self.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            super().pwrite_zeroes(offset, length, may_unmap)
            return
        flags = CmdFlag(0) if may_unmap else CmdFlag.NO_HOLE
        for at, n in _ranges(offset, length):
            self._call(self._zero, at, n, flags)

    def _zero(self, client: NBDClient, offset: int, length: int, flags: CmdFlag) -> None:
        """One WRITE_ZEROES on ``client``: fast first, unless the server refused a fast one
        with these flags, then plain. Requests in flight when the refusal comes each meet
        it once; later ones no more."""
        if self.flags & TransmissionFlag.SEND_FAST_ZERO and flags not in self._slow_zero:
            try:
                client.zero(offset, length, flags | CmdFlag.FAST_ZERO)
                return
            except NBDError as exc:
                if exc.errno != NBDErr.ENOTSUP:
                    raise
                log.debug("nbd node %r: the server refuses fast zeroes with flags %r; "
                          "plain ones from now on", self.node.name, flags)
                self._slow_zero.add(flags)
        client.zero(offset, length, flags)

    def try_fast_zero(self, offset: int, length: int) -> bool:
        """Zero the range only if the server can do it faster than writing zeroes
        (``NBD_CMD_FLAG_FAST_ZERO``); False when it cannot, or lacks the flag. ``OSError``
        for other failures."""
        need = TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
        if self.flags & need != need:
            return False
        try:
            for at, n in _ranges(offset, length):
                self._call(NBDClient.zero, at, n, CmdFlag.FAST_ZERO)
        except NBDError as exc:
            if exc.errno == NBDErr.ENOTSUP:
                return False
            raise
        return True

    def pdiscard(self, offset: int, length: int) -> None:
        if not self.flags & TransmissionFlag.SEND_TRIM:
            return  # a hint the server does not take
        for at, n in _ranges(offset, length):
            self._call(NBDClient.trim, at, n)

    def flush(self) -> None:
        if not self.flags & TransmissionFlag.SEND_FLUSH or self.node.read_only:
            return
        for conn in self._conns:  # each connection's completed writes
            self._on(conn, NBDClient.flush)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        length = min(length, MAX_RANGE)
        extents = self._call(_allocation, offset, length)
        if not extents:  # no base:allocation: everything is data
            return BlockStatus(offset, length, Status.DATA | Status.ALLOCATED)
        extent_length, kind = extents[0]
        if extent_length <= 0:
            raise OSError(errno.EIO, f"nbd node '{self.node.name}': empty block status extent")
        flags = Status.ALLOCATED
        if kind & AllocationFlag.ZERO:
            flags |= Status.ZERO
        if not kind & AllocationFlag.HOLE or not kind & AllocationFlag.ZERO:
            flags |= Status.DATA  # a hole that does not read as zeroes is data all the same
        return BlockStatus(offset, min(length, extent_length), flags)

    def image_info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if not self._conns:
            return
        with self._state:
            self.link = Link.CLOSED  # requests still waiting for a connection fail
        for conn in self._conns:
            with conn.lock:
                client, conn.client = conn.client, None
                if client is not None:
                    client.close()


def _allocation(client: NBDClient, offset: int, length: int) -> list[tuple[int, int]]:
    """The ``base:allocation`` extents from ``offset``; empty when it was not negotiated."""
    if BASE_ALLOCATION not in client.contexts:
        return []
    return client.block_status(offset, length, BASE_ALLOCATION)


def _ranges(offset: int, length: int) -> list[tuple[int, int]]:
    """``[offset, offset + length)`` in pieces of at most ``MAX_RANGE`` bytes."""
    return [(at, min(MAX_RANGE, offset + length - at))
            for at in range(offset, offset + length, MAX_RANGE)]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _socket_address(value: Any) -> tuple[str, str, str]:
    """QEMU's flat ``SocketAddress`` as ``(kind, path or host, port)``; ``GenericError``."""
    if value is None:
        raise GenericError("Parameter 'server' is missing")
    if not isinstance(value, dict):
        raise GenericError("Invalid parameter type for 'server', expected: object")
    server = dict(value)
    kind = server.pop("type", None)
    if kind is None:
        raise GenericError("Parameter 'server.type' is missing")
    if kind == "unix":
        path = server.pop("path", None)
        if not isinstance(path, str):
            raise GenericError("Parameter 'server.path' is missing")
        for flag in ("abstract", "tight"):
            server.pop(flag, None)
        address = ("unix", path, "")
    elif kind == "inet":
        host, port = server.pop("host", None), server.pop("port", None)
        if not isinstance(host, str):
            raise GenericError("Parameter 'server.host' is missing")
        if port is None:
            raise GenericError("Parameter 'server.port' is missing")
        if isinstance(port, int) and not isinstance(port, bool):
            port = str(port)
        if not isinstance(port, str) or not port.isdigit() or not 0 < int(port) < 65536:
            raise GenericError(f"Parameter 'server.port' expects a port number, got {port!r}")
        for key in ("numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"):
            server.pop(key, None)
        address = ("inet", host, port)
    elif kind in ("vsock", "fd"):
        raise GenericError(f"server.type '{kind}' is not supported by fleece's nbd driver "
                           "(it has unix and inet)")
    else:
        raise GenericError(f"Parameter 'server.type' does not accept value '{kind}'")
    if server:
        raise GenericError(f"Parameter 'server.{sorted(server)[0]}' is unexpected")
    return address
