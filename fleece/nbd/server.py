"""The NBD server: listeners, exports and connections, on an asyncio loop of its own.

Design note: the server runs its own event loop in a thread (``fleece-nbd``) for as long as it
is up; the public methods may be called from any other thread and hop onto the loop with
``asyncio.run_coroutine_threadsafe``. The server is split by concern, as nbdkit splits its own:

- :mod:`fleece.nbd.backend`: the export model and request execution on the node's public API;
- :mod:`fleece.nbd.pool`: the I/O threads requests run in;
- :mod:`fleece.nbd.connection`: one client's transport, state and back-pressure (its budget);
- :mod:`fleece.nbd.sender`: replies sent by the I/O thread that produced them;
- :mod:`fleece.nbd.audit`: the rate-limited log of hostile or failed clients;
- :mod:`fleece.listener`: binding and accepting, shared with the QMP server;
- this module: listening, accepting within the limits, exports, the periodic sweep, shutdown.

The server accepts connections itself (:class:`fleece.listener.Listener`): it refuses clients
past ``max-connections`` or near the open-file limit, closes handshakes that take longer than
``handshake-max-seconds``, and writes one audit line (:class:`AuditLog`) per refused, rejected
or misbehaving client.

Exports hold a reference on their node for as long as they exist; the caller (the command layer)
takes and releases it, never the loop thread, because releasing the last reference may close a
node and wait for its in-flight I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fleece.errors import GenericError
from fleece.listener import (
    FD_RESERVE,
    LISTEN_BACKLOG,
    RESOURCE_ERRNOS,
    Listener,
    SpareDescriptor,
    bind_tcp,
    bind_unix,
    fd_ceiling,
    peer_name,
)
from fleece.nbd.audit import AuditLog
from fleece.nbd.backend import Directory, Export
from fleece.nbd.connection import Connection
from fleece.nbd.pool import IOPool

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)
T = TypeVar("T")

#: QEMU 7.2 closes a handshake not finished after 10 s (newer QEMU: handshake-max-seconds)
HANDSHAKE_TIMEOUT = 10.0
#: a client whose replies wait this long without the socket taking a byte is disconnected
DRAIN_TIMEOUT = 30.0
#: clients served at once unless nbd-server-start says otherwise (0 there: no limit)
DEFAULT_MAX_CONNECTIONS = 100
#: how often the server looks for clients that stopped reading their replies
SWEEP_INTERVAL = 1.0
CALL_TIMEOUT = 60.0


def _parse_address(addr: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``SocketAddressLegacy`` (``{"type", "data": {...}}``) or the flat ``SocketAddress``."""
    kind = addr.get("type")
    data = addr.get("data", {k: v for k, v in addr.items() if k != "type"})
    if not isinstance(data, dict):
        raise GenericError("Invalid parameter type for 'addr.data', expected: object")
    if kind not in ("unix", "inet"):
        raise GenericError(f"NBD server address type '{kind}' is not supported (unix, inet)")
    return kind, data


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
        self.fd_ceiling = fd_ceiling()
        #: a descriptor given up at the open-file limit to accept and refuse a waiting client
        self._spare = SpareDescriptor()
        #: permissions of unix sockets: owner-only unless the embedder asks otherwise
        self.socket_mode = 0o600
        self.exports: dict[str, Export] = {}
        self.connections: set[Connection] = set()
        self.directory = Directory(self.exports)
        self.addresses: list[str | tuple[str, int]] = []
        self.closing = False
        self.pool = IOPool(workers, "fleece-io")
        self.loop = asyncio.new_event_loop()
        self._listeners: list[Listener] = []
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
        peer = peer_name(sock, addr)
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

    def accept_failed(self, exc: OSError) -> None:
        """accept() failed (loop thread): log it, once per interval at the open-file limit
        (the listener refuses the waiting client and backs off for a moment)."""
        if exc.errno in RESOURCE_ERRNOS:
            self.audit("fd-limit", "NBD server: accept() failed (%s): refusing clients until "
                       "descriptors are free", exc.strerror)
        else:
            log.warning("NBD server: accept() failed: %s", exc)

    def _listener(self, sock: socket.socket) -> Listener:
        return Listener(self.loop, sock, self.accepted, self.accept_failed, self._spare)

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
        """Listen at ``path``: ``socket_mode`` (owner-only), and there only once it accepts."""
        try:
            sock = bind_unix(path, self.socket_mode, LISTEN_BACKLOG)
        except OSError as exc:
            raise GenericError(f"Failed to bind socket to {path}: {exc.strerror}") from None
        self._listeners.append(self._listener(sock))
        self._unix_paths.append(path)
        self.addresses.append(path)
        return path

    async def _listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on every address ``host`` resolves to (only the first with port 0, whose
        port the kernel chooses)."""
        try:
            socks = await bind_tcp(host, port, LISTEN_BACKLOG)
        except socket.gaierror as exc:
            raise GenericError(
                f"address resolution failed for {host}:{port}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # QEMU's words (it tried every port it could)
                raise GenericError(
                    f"Failed to find an available port: {exc.strerror}") from None
            raise GenericError(f"Failed to bind socket: {exc.strerror}") from None
        self._listeners += [self._listener(sock) for sock in socks]
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
            self._spare.close()
        return exports
