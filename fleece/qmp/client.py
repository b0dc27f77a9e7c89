"""A small synchronous QMP client: what the demo and tests use when ``qemu.qmp`` is absent.

It speaks the protocol as the daemon does (greeting, ``qmp_capabilities``, commands with ids,
events kept in arrival order). It is not a general client: one command at a time.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

from fleece.errors import CommandNotFound, DeviceNotActive, DeviceNotFound, GenericError, QMPError
from fleece.qmp.framing import Message, Splitter, encode

_ERRORS: dict[str, type[QMPError]] = {
    "GenericError": GenericError,
    "CommandNotFound": CommandNotFound,
    "DeviceNotFound": DeviceNotFound,
    "DeviceNotActive": DeviceNotActive,
}


class QMPClient:
    """Connected to a unix socket path or a ``(host, port)`` TCP address."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 30.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self._splitter = Splitter()
        self._pending: list[Any] = []
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.greeting = self._next()
        self.execute("qmp_capabilities")

    def _next(self) -> Any:
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the QMP server closed the connection")
            for event in self._splitter.feed(data):
                if isinstance(event, Message):
                    self._pending.append(event.value)
        return self._pending.pop(0)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command``; returns its ``return`` value or raises the matching ``QMPError``."""
        ident = f"fleece-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(encode(message))
        while True:
            reply = self._next()
            if isinstance(reply, dict) and "event" in reply:
                self.events.append(reply)
                continue
            if isinstance(reply, dict) and reply.get("id") == ident:
                if "error" in reply:
                    error = reply["error"]
                    raise _ERRORS.get(error.get("class"), GenericError)(error.get("desc", ""))
                return reply.get("return")

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first event ``name`` not yet taken (it and those before it are consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event.get("event") == name:
                    del self.events[: index + 1]
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {name} event within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                message = self._next()
            except TimeoutError:
                continue
            if isinstance(message, dict) and "event" in message:
                self.events.append(message)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
