"""A small synchronous NBD client: fixed newstyle, ``NBD_OPT_GO``, structured replies,
``base:allocation``, optional ``STARTTLS``, and pipelined requests identified by cookies.

It is what the demo and the tests use when libnbd is not around. Requests may be submitted
many at a time (:meth:`NBDClient.submit`) and collected in any order (:meth:`NBDClient.wait`);
the convenience methods (``pread``, ``pwrite``, ...) submit one request and wait for it.

Threads: without TLS a client is :attr:`~NBDClient.concurrent`. Any thread may submit (the
sends are serialised) and any may wait; one waiting thread at a time reads replies, whoever they
are for, while the others sleep until theirs has been read. So several threads keep requests in
flight on one connection, as QEMU's ``nbd`` driver does. When reading a reply fails, the stream
is lost for every request on it: each waiter raises ``ConnectionError``. With TLS, one thread at a
time drives the client (OpenSSL does not allow a connection to read in one thread while it
writes in another).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fleece.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

_REQUEST = struct.Struct(">IHHQQI")
_NO_FLAGS = CmdFlag(0)


class NBDError(OSError):
    """The server answered a request with an error; ``errno`` is the NBD error value."""


class NegotiationError(ConnectionError):
    """The handshake failed: the server refused an option or spoke something else."""


@dataclass
class _Pending:
    command: int
    offset: int
    length: int
    data: bytearray | None = None
    error: int = 0
    message: str = ""
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    holes: list[tuple[int, int]] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class Reply:
    """The outcome of one request: ``error`` 0 on success, the data of a read, and the block
    status extents ``(length, flags)`` per meta context name. ``holes`` lists the ``(offset,
    length)`` of the ``OFFSET_HOLE`` chunks of a structured read (their bytes read as zeroes in
    ``data``)."""

    error: int
    message: str
    data: bytes | None
    extents: dict[str, list[tuple[int, int]]]
    holes: tuple[tuple[int, int], ...] = ()


class NBDClient:
    """A client connected to one export over ``sock`` (already connected).

    Raises ``NegotiationError`` when the handshake fails, ``ConnectionError`` when the server
    hangs up.
    """

    def __init__(
        self,
        sock: socket.socket,
        export: str = "",
        *,
        structured: bool = True,
        contexts: tuple[str, ...] = (BASE_ALLOCATION,),
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.sock: socket.socket = sock
        self.export = export
        self.structured = False
        self.contexts: dict[str, int] = {}
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.block_size: tuple[int, int, int] | None = None
        self._cookie = 0
        self._pending: dict[int, _Pending] = {}
        self._sending = threading.Lock()
        #: guards ``_reading`` and ``_broken``; waiters sleep on it
        self._replies = threading.Condition(threading.Lock())
        self._reading = False  # a waiting thread is reading replies
        self._broken: str | None = None  # why the stream is lost, once it is
        #: whether threads may submit and wait at once (see the module's note)
        self.concurrent = tls is None
        self._negotiate(structured, contexts, tls, server_hostname)

    @classmethod
    def connect_unix(cls, path: str, export: str = "", **kwargs: object) -> NBDClient:
        """Connect over a unix socket; keyword arguments as the constructor."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return cls(sock, export, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            sock.close()
            raise

    @classmethod
    def connect_tcp(cls, host: str, port: int, export: str = "", **kwargs: object) -> NBDClient:
        """Connect over TCP; keyword arguments as the constructor."""
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return cls(sock, export, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            sock.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------
    def _recv(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("the NBD server closed the connection")
            got += n
        return bytes(buf)

    def _option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, got_opt, rep, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPTION_REPLY_MAGIC or got_opt != opt:
            raise NegotiationError(f"bad option reply (magic 0x{magic:x}, option {got_opt})")
        return rep, self._recv(length) if length else b""

    def _negotiate(
        self,
        structured: bool,
        contexts: tuple[str, ...],
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NegotiationError("not a newstyle NBD server")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NegotiationError("the server does not speak fixed newstyle")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
        self.sock.sendall(struct.pack(">I", client))
        if tls is not None:
            self._option(Opt.STARTTLS)
            rep, data = self._option_reply(Opt.STARTTLS)
            if rep != Rep.ACK:
                raise NegotiationError(f"STARTTLS refused: {data.decode(errors='replace')}")
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
        if structured:
            self._option(Opt.STRUCTURED_REPLY)
            rep, _ = self._option_reply(Opt.STRUCTURED_REPLY)
            self.structured = rep == Rep.ACK
        name = self.export.encode()
        if self.structured and contexts:
            queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in contexts)
            self._option(
                Opt.SET_META_CONTEXT,
                struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + queries,
            )
            while True:
                rep, data = self._option_reply(Opt.SET_META_CONTEXT)
                if rep == Rep.META_CONTEXT:
                    self.contexts[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
                elif rep == Rep.ACK:
                    break
                else:
                    raise NegotiationError(
                        f"SET_META_CONTEXT refused: {data.decode(errors='replace')}"
                    )
        self._option(Opt.GO, struct.pack(">I", len(name)) + name
                     + struct.pack(">HH", 1, Info.BLOCK_SIZE))
        while True:
            rep, data = self._option_reply(Opt.GO)
            if rep == Rep.ACK:
                break
            if rep != Rep.INFO:
                raise NegotiationError(
                    f"export '{self.export}': reply 0x{rep:x} {data.decode(errors='replace')}"
                )
            (kind,) = struct.unpack(">H", data[:2])
            if kind == Info.EXPORT:
                self.size, flags = struct.unpack(">QH", data[2:12])
                self.flags = TransmissionFlag(flags)
            elif kind == Info.BLOCK_SIZE:
                self.block_size = struct.unpack(">III", data[2:14])

    # -- pipelined requests --------------------------------------------------------------------
    def submit(
        self, command: Cmd, offset: int = 0, length: int = 0, flags: CmdFlag = _NO_FLAGS,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> int:
        """Send a request; returns its cookie for :meth:`wait`."""
        if payload is None:
            return self._submit(command, offset, length, flags, None)

        def send(header: bytes) -> None:
            if len(payload) < 65536:
                self.sock.sendall(header + bytes(payload))
            else:
                self.sock.sendall(header)
                self.sock.sendall(payload)

        return self._submit(command, offset, len(payload), flags, send)

    def submit_file_write(self, offset: int, fd: int, host: int, length: int,
                          flags: CmdFlag = _NO_FLAGS) -> int:
        """Send a WRITE whose payload is ``length`` bytes of the open file ``fd`` from
        ``host``, with ``sendfile``: the kernel passes the page cache's pages to the socket
        instead of copying them through memory. The caller keeps those bytes of the file
        unchanged until the reply comes (the server has read them then). Not over TLS."""
        if not self.concurrent:
            raise OSError(errno.EOPNOTSUPP, "sendfile cannot go through TLS")

        def send(header: bytes) -> None:
            self.sock.sendall(header)
            self._sendfile(fd, host, length)

        return self._submit(Cmd.WRITE, offset, length, flags, send)

    def _submit(self, command: Cmd, offset: int, length: int, flags: CmdFlag,
                send: Callable[[bytes], None] | None) -> int:
        pending = _Pending(command, offset, length)
        if command == Cmd.READ:
            pending.data = bytearray(length)
        with self._sending:
            if self._broken is not None:
                raise ConnectionError(f"the NBD connection is lost: {self._broken}")
            self._cookie += 1
            cookie = self._cookie
            self._pending[cookie] = pending  # before the send: the reply may come at once
            header = _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
            try:
                if send is None:
                    self.sock.sendall(header)
                else:
                    send(header)
            except BaseException as exc:
                del self._pending[cookie]
                self._lose(exc)  # a request cut short: the server may read anything next
                raise
        return cookie

    def _sendfile(self, fd: int, host: int, length: int) -> None:
        """``length`` bytes of ``fd`` from ``host`` into the socket, within its timeout."""
        timeout = self.sock.gettimeout()
        sent = 0
        while sent < length:
            try:
                n = os.sendfile(self.sock.fileno(), fd, host + sent, length - sent)
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                ready = select.poll()
                ready.register(self.sock.fileno(), select.POLLOUT)
                if not ready.poll(None if timeout is None else timeout * 1000):
                    raise TimeoutError("the NBD server took no data in time") from None
                continue
            if n == 0:
                raise OSError(errno.EIO, "the file ended before the write's payload")
            sent += n

    def wait(self, cookie: int) -> Reply:
        """Read replies until the one for ``cookie`` is complete; returns it. Another thread
        may be reading replies meanwhile: then this one sleeps until it has read this one."""
        pending = self._pending.get(cookie)
        if pending is None:
            raise KeyError(f"no request with cookie {cookie}")
        with self._replies:
            while not pending.done:
                if self._broken is not None:
                    del self._pending[cookie]
                    raise ConnectionError(f"the NBD connection is lost: {self._broken}")
                if self._reading:
                    self._replies.wait()
                    continue
                self._reading = True
                self._replies.release()
                failure: BaseException | None = None
                try:
                    self._read_reply()
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    self._replies.acquire()
                    self._reading = False
                    if failure is not None:
                        self._broken = self._broken or _reason(failure)
                        self._pending.pop(cookie, None)
                    self._replies.notify_all()
        del self._pending[cookie]
        names = {v: k for k, v in self.contexts.items()}
        return Reply(
            pending.error,
            pending.message,
            None if pending.data is None or pending.error else bytes(pending.data),
            {names.get(k, str(k)): v for k, v in pending.extents.items()},
            tuple(pending.holes),
        )

    def _lose(self, exc: BaseException) -> None:
        """The stream is lost: every waiter, now or later, raises."""
        with self._replies:
            if self._broken is None:
                self._broken = _reason(exc)
            self._replies.notify_all()

    def _read_reply(self) -> None:
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._recv(12))
            pending = self._pending[cookie]
            pending.error = error
            if pending.command == Cmd.READ and not error and pending.data is not None:
                pending.data[:] = self._recv(pending.length)
            pending.done = True
            return
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ConnectionError(f"bad reply magic 0x{magic:08x}")
        flags, kind, cookie, length = struct.unpack(">HHQI", self._recv(16))
        pending = self._pending[cookie]
        body = self._recv(length) if length else b""
        if kind == ReplyType.OFFSET_DATA:
            (offset,) = struct.unpack(">Q", body[:8])
            assert pending.data is not None
            start = offset - pending.offset
            pending.data[start:start + len(body) - 8] = body[8:]
        elif kind == ReplyType.OFFSET_HOLE:
            pending.holes.append(struct.unpack(">QI", body[:12]))  # the buffer is zeroed already
        elif kind == ReplyType.BLOCK_STATUS:
            (context,) = struct.unpack(">I", body[:4])
            pending.extents[context] = [
                struct.unpack(">II", body[i:i + 8]) for i in range(4, len(body), 8)
            ]
        elif kind & 0x8000:
            error, mlen = struct.unpack(">IH", body[:6])
            pending.error = error
            pending.message = body[6:6 + mlen].decode(errors="replace")
        if flags & ReplyFlag.DONE:
            pending.done = True

    def _check(self, reply: Reply) -> Reply:
        if reply.error:
            raise NBDError(reply.error, reply.message or os.strerror(reply.error))
        return reply

    # -- one request at a time -----------------------------------------------------------------
    def pread(self, offset: int, length: int, flags: CmdFlag = _NO_FLAGS) -> bytes:
        """``length`` bytes at ``offset``; ``NBDError`` when the server fails the read."""
        data = self._check(self.wait(self.submit(Cmd.READ, offset, length, flags))).data
        return b"" if data is None else data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
               flags: CmdFlag = _NO_FLAGS) -> None:
        """Write ``data`` at ``offset``; ``NBDError`` on failure."""
        self._check(self.wait(self.submit(Cmd.WRITE, offset, flags=flags, payload=data)))

    def pwrite_file(self, offset: int, fd: int, host: int, length: int,
                    flags: CmdFlag = _NO_FLAGS) -> None:
        """Write ``length`` bytes of the open file ``fd`` from ``host`` at ``offset`` (see
        :meth:`submit_file_write`); ``NBDError`` on failure."""
        self._check(self.wait(self.submit_file_write(offset, fd, host, length, flags)))

    def flush(self) -> None:
        """``NBD_CMD_FLUSH``; ``NBDError`` on failure."""
        self._check(self.wait(self.submit(Cmd.FLUSH)))

    def trim(self, offset: int, length: int) -> None:
        """``NBD_CMD_TRIM``; ``NBDError`` on failure."""
        self._check(self.wait(self.submit(Cmd.TRIM, offset, length)))

    def zero(self, offset: int, length: int, flags: CmdFlag = _NO_FLAGS) -> None:
        """``NBD_CMD_WRITE_ZEROES``; ``NBDError`` on failure."""
        self._check(self.wait(self.submit(Cmd.WRITE_ZEROES, offset, length, flags)))

    def block_status(
        self, offset: int, length: int, context: str = BASE_ALLOCATION
    ) -> list[tuple[int, int]]:
        """The ``(length, flags)`` extents of ``context`` from ``offset``; ``NBDError``."""
        reply = self._check(self.wait(self.submit(Cmd.BLOCK_STATUS, offset, length)))
        return reply.extents.get(context, [])

    def close(self) -> None:
        """Send ``NBD_CMD_DISC`` and close the socket (idempotent)."""
        if self.sock.fileno() < 0:
            return
        try:
            self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
