"""Test helpers: a storage daemon as a subprocess (fleece or qemu-storage-daemon) and a QMP
client on raw bytes, so that the tests do not share fleece's own QMP splitter."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers import PEER_ENV

IO_TIMEOUT = 10.0


def fleece_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "fleece", "daemon", *options]


class DaemonProcess:
    """A daemon subprocess with its QMP socket at ``qmp``; stdout and stderr go to files."""

    def __init__(self, argv: list[str], qmp: Path, log_dir: Path, *,
                 start_timeout: float = 15.0, exit_timeout: float = 15.0) -> None:
        self.argv = argv
        self.qmp = qmp
        self.start_timeout = start_timeout
        self.exit_timeout = exit_timeout
        self.stdout = log_dir / f"daemon-{time.monotonic_ns()}.out"
        self.stderr_path = self.stdout.with_suffix(".err")
        with open(self.stdout, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env=PEER_ENV, cwd=log_dir)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_socket(self, timeout: float | None = None) -> None:
        """Poll for the QMP socket file; fails if the daemon exits or is too slow."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self.qmp.exists():
            if self.process.poll() is not None:
                pytest.fail(f"daemon exited {self.process.returncode}: {self.stderr}",
                            pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"no QMP socket after {timeout} s: {self.stderr}", pytrace=False)
            time.sleep(0.01)

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(self.exit_timeout if timeout is None else timeout)

    def kill9(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(self.exit_timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go (teardown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(self.exit_timeout)


class RawQMP:
    """Bytes on a socket; messages are CRLF-terminated lines decoded with ``json.loads``.
    Replies are the next non-event message; events are kept in ``events``."""

    def __init__(self, path: Path, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, message: bytes | dict[str, Any]) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> Any:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        assert line.endswith(b"\r"), line  # QEMU ends every message with CRLF
        return json.loads(line)

    def greeting(self) -> dict[str, Any]:
        message: dict[str, Any] = self.recv()
        return message

    def negotiate(self) -> None:
        assert "QMP" in self.greeting()
        assert self.command("qmp_capabilities") == {"return": {}}

    def reply(self, timeout: float | None = None) -> dict[str, Any]:
        while True:
            message = self.recv(timeout)
            assert isinstance(message, dict), message
            if "event" in message:
                self.events.append(message)
                continue
            return message

    def command(self, name: str, arguments: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(message)
        return self.reply()

    def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = self.command(name, arguments)
        assert "return" in reply, reply
        return reply["return"]

    def wait_event(self, name: str, timeout: float | None = None,
                   match: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name and (match is None or match(event)):
                    del self.events[: index + 1]
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {name} within {timeout} s; got {self.events}")
            message = self.recv(remaining)
            assert isinstance(message, dict) and "event" in message, message
            self.events.append(message)
