"""The QMP server: QEMU's monitor protocol over unix and TCP sockets, on asyncio.

Each connection gets the greeting, must negotiate with ``qmp_capabilities``, then sends commands
that run on ``Storage.execute`` in a worker thread (a command may block on I/O; the loop never
does), one at a time per connection and in order, as QEMU runs them without out-of-band
execution. Events go to every negotiated connection. Built in here: ``qmp_capabilities``,
``query-version``, ``query-commands`` and ``quit``. Sockets are bound and accepted as the NBD
server's are (:mod:`fleece.listener`: owner-only unix sockets, a back-off and a spare
descriptor at the open-file limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from fleece import __version__
from fleece.errors import CommandNotFound, GenericError, QMPError
from fleece.events import Event
from fleece.listener import Listener, SpareDescriptor, bind_tcp, bind_unix
from fleece.qmp.framing import BadRequest, Message, Splitter, encode, parse_request
from fleece.storage import Storage

log = logging.getLogger(__name__)

#: the QEMU version fleece speaks for (its reference, qemu-storage-daemon 7.2)
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
BUILTIN = ("qmp_capabilities", "query-version", "query-commands", "quit")
#: the answer to a command that failed in a way fleece did not foresee (a bug); the details,
#: traceback included, are in the daemon's log
UNEXPECTED = "Command '{command}' failed unexpectedly; the daemon's log has the details"
#: listen backlogs (those of asyncio's servers, which QMP used before it shared the NBD
#: server's listener), and the stream buffer limit of a connection
UNIX_BACKLOG = 16
TCP_BACKLOG = 100
STREAM_LIMIT = 64 * 1024


def version_info() -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION), "package": f"fleece {__version__}"}


class QMPConnection:
    """One client. Owns its writer; events reach it only once it negotiated."""

    def __init__(self, server: QMPServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    async def run(self) -> None:
        self.send({"QMP": {"version": version_info(), "capabilities": []}})
        splitter = Splitter()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                for event in splitter.feed(data):
                    if isinstance(event, Message):
                        await self._handle(event.value)
                    else:
                        self.send({"error": {"class": "GenericError", "desc": event.desc}})
                    await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return

    async def _handle(self, value: Any) -> None:
        request = parse_request(value)
        if isinstance(request, BadRequest):
            self._reply_error(GenericError(request.desc), request.id, request.has_id)
            return
        try:
            result = await self._dispatch(request.command, request.arguments)
        except QMPError as exc:
            self._reply_error(exc, request.id, request.has_id)
            return
        except Exception:  # a bug: the traceback goes to the log, never to the client
            log.exception("command %s failed unexpectedly", request.command)
            self._reply_error(GenericError(UNEXPECTED.format(command=request.command)),
                              request.id, request.has_id)
            return
        reply: dict[str, Any] = {"return": result}
        if request.has_id:
            reply["id"] = request.id
        self.send(reply)
        if request.command == "quit":
            await self.writer.drain()
            self.server.request_quit()

    def _reply_error(self, exc: QMPError, ident: Any, has_id: bool) -> None:
        reply: dict[str, Any] = {"error": {"class": exc.qmp_class, "desc": exc.desc}}
        if has_id:
            reply["id"] = ident
        self.send(reply)

    async def _dispatch(self, command: str, arguments: dict[str, Any]) -> Any:
        if not self.negotiated:
            if command != "qmp_capabilities":
                raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
            enable = arguments.get("enable", [])
            extra = set(arguments) - {"enable"}
            if extra:
                raise GenericError(f"Parameter '{sorted(extra)[0]}' is unexpected")
            if not isinstance(enable, list):
                raise GenericError("Invalid parameter type for 'enable', expected: array")
            for capability in enable:
                raise GenericError(f"Capability '{capability}' not available")
            self.negotiated = True
            return {}
        if command == "qmp_capabilities":
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        if command in ("query-version", "query-commands", "quit") and arguments:
            raise GenericError(f"Parameter '{sorted(arguments)[0]}' is unexpected")
        if command == "query-version":
            return version_info()
        if command == "query-commands":
            names = sorted({*self.server.storage.commands(), *BUILTIN})
            return [{"name": name} for name in names]
        if command == "quit":
            return {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.server.storage.execute, command, arguments)


class QMPServer:
    """Listens on any number of sockets and serves ``storage`` to every client."""

    def __init__(self, storage: Storage, *, on_quit: Callable[[], None] | None = None,
                 socket_mode: int = 0o600) -> None:
        self.storage = storage
        self.on_quit = on_quit
        self.socket_mode = socket_mode
        self.connections: set[QMPConnection] = set()
        self._listeners: list[Listener] = []
        self._spare: SpareDescriptor | None = None
        #: accept() is failing (logged once until a client is accepted again)
        self._accept_failing = False
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.addresses: list[str] = []

    # -- listening ---------------------------------------------------------------------------
    def _attach(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._unsubscribe = self.storage.subscribe(self._on_event)

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket that appears at ``path`` only once it accepts (bound and
        listening under a temporary name, then renamed into place), owner-only by default.
        ``OSError`` when it cannot be bound."""
        self._attach()
        self._listen(bind_unix(path, self.socket_mode, UNIX_BACKLOG))
        self.addresses.append(f"unix:{path}")

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on every address ``host`` resolves to. ``OSError`` when it cannot."""
        self._attach()
        for sock in await bind_tcp(host, port, TCP_BACKLOG):
            self._listen(sock)
            bound = sock.getsockname()
            self.addresses.append(f"tcp:{bound[0]}:{bound[1]}")

    def _listen(self, sock: socket.socket) -> None:
        assert self._loop is not None
        if self._spare is None:
            self._spare = SpareDescriptor()
        self._listeners.append(
            Listener(self._loop, sock, self._accepted, self._accept_failed, self._spare))

    def _accepted(self, sock: socket.socket, addr: object) -> None:
        """A client connected (loop thread): serve it."""
        if self._closing:
            sock.close()
            return
        self._accept_failing = False
        task = asyncio.ensure_future(self._connect(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept_failed(self, exc: OSError) -> None:
        if not self._accept_failing:
            self._accept_failing = True
            log.warning("QMP server: accept() failed: %s", exc)

    async def _connect(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader, self._serve)
        try:
            await loop.connect_accepted_socket(lambda: protocol, sock)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("QMP client: %s", exc)
            sock.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = QMPConnection(self, reader, writer)
        self.connections.add(connection)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    # -- events and shutdown -----------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._broadcast, event)

    def _broadcast(self, event: Event) -> None:
        for connection in list(self.connections):
            if connection.negotiated:
                connection.send(event)

    def request_quit(self) -> None:
        if self.on_quit is not None:
            self.on_quit()

    async def flush(self) -> None:
        """Let every queued event and reply reach the clients."""
        await asyncio.sleep(0)
        for connection in list(self.connections):
            with contextlib.suppress(ConnectionError, OSError):
                await connection.writer.drain()

    async def close(self) -> None:
        """Stop listening, close every connection, remove unix sockets."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._closing = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for connection in list(self.connections):
            connection.writer.close()  # the reader then sees the end of the stream
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for address in self.addresses:
            if address.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address[5:])
        if self._spare is not None:
            self._spare.close()
            self._spare = None
