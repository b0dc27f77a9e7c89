"""Listening sockets for the NBD and QMP servers: bound one way, accepted one way.

Design note: both servers accept clients themselves (:class:`Listener`) rather than through
asyncio's ``Server``, so that a server can refuse a client at its limits, name the peer in its
log, and back off for a moment (instead of spinning or logging a storm) when ``accept()`` fails
for want of descriptors or memory; then one spare descriptor (:class:`SpareDescriptor`) lets it
accept and close the waiting client rather than leave it hanging. A unix socket is owner-only
(0600) unless the embedder asks otherwise, and appears at its path only once it accepts (bound
and listening under a temporary name, then renamed into place); its owner unlinks it when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

#: connections accepted per wake-up of a listener, and the pause after accept() failed
ACCEPT_BATCH = 32
ACCEPT_RETRY = 0.1
LISTEN_BACKLOG = 128
#: descriptors kept free under the open-file limit (QMP, images): a server may refuse clients
#: past it (see :func:`fd_ceiling`)
FD_RESERVE = 64
#: accept() failed for want of descriptors or memory: the listener backs off
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PEERCRED = struct.Struct("3i")


def bind_unix(path: str, mode: int = 0o600, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A socket listening at ``path`` with permissions ``mode``; a stale socket there is
    replaced. The path appears only once the socket listens. ``OSError`` when it cannot be
    bound (nothing is left behind)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    temporary = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock.bind(temporary)
        os.chmod(temporary, mode)
        sock.listen(backlog)
        os.replace(temporary, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return sock


async def bind_tcp(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> list[socket.socket]:
    """Sockets listening on every address ``host`` resolves to (only the first with port 0,
    whose port the kernel chooses; ``""``: every local address), IPv6 ones v6-only.
    ``socket.gaierror`` when ``host`` does not resolve, ``OSError`` when an address cannot be
    bound (nothing is left open)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
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
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def fd_ceiling() -> int:
    """Accepted sockets should stay below this descriptor number: ``FD_RESERVE`` descriptors
    under the open-file limit stay free for QMP, images and the server's own needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        return 1 << 24
    return max(soft - FD_RESERVE, soft // 2)


def peer_name(sock: socket.socket, addr: Any) -> str:
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


class SpareDescriptor:
    """One descriptor given up at the open-file limit, to accept and refuse a waiting client
    (which would otherwise wait in the backlog, and wake the listener again and again)."""

    def __init__(self) -> None:
        self._fd: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def refuse(self, sock: socket.socket) -> None:
        """Accept one client waiting on ``sock`` and close it at once."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        with contextlib.suppress(OSError):
            conn, _ = sock.accept()
            conn.close()
        with contextlib.suppress(OSError):
            self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Listener:
    """A listening socket whose clients go to ``accepted(sock, addr)`` (loop thread). When
    accept() fails, ``failed(exc)`` hears of it (to log it), a client waiting at the open-file
    limit is refused with ``spare``, and accepting pauses for ``ACCEPT_RETRY`` seconds."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        accepted: Callable[[socket.socket, Any], None],
        failed: Callable[[OSError], None],
        spare: SpareDescriptor | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self._accepted = accepted
        self._failed = failed
        self._spare = spare
        sock.setblocking(False)
        self._retry: asyncio.TimerHandle | None = None
        self.watch()

    def watch(self) -> None:
        self._retry = None
        self.loop.add_reader(self.sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self._failed(exc)
                if exc.errno in RESOURCE_ERRNOS and self._spare is not None:
                    self._spare.refuse(self.sock)
                self.pause(ACCEPT_RETRY)
                return
            self._accepted(conn, addr)

    def pause(self, seconds: float) -> None:
        """Stop accepting for ``seconds``."""
        if self._retry is None:
            self.loop.remove_reader(self.sock.fileno())
            self._retry = self.loop.call_later(seconds, self.watch)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
