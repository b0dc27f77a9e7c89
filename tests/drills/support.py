"""Helpers shared by the drills: scaling, events, images, daemons, certificates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

KiB = 1 << 10
MiB = 1 << 20
PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
WAIT = 10.0


def long_mode() -> bool:
    """True with ``--long-drills`` (set by the folder's conftest before collection)."""
    return os.environ.get("FLEECE_LONG_DRILLS") == "1"


def scale(short: int, long: int) -> int:
    """``short`` by default, ``long`` with ``--long-drills``."""
    return long if long_mode() else short


def require(tool: str) -> str:
    """The path of ``tool``; fails (never skips) when it is missing."""
    path = shutil.which(tool, path=PEER_ENV["PATH"])
    if path is None:
        pytest.fail(f"{tool} is not installed: run `make test` (it installs the Debian peers)")
    return path


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a peer; fails the test with its output when ``check`` and it exits non-zero."""
    require(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=PEER_ENV)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def pattern(size: int, seed: int = 0) -> bytes:
    """Every 512-byte sector filled with its own number plus ``seed``: no two sectors alike."""
    sectors = np.arange(seed, seed + size // 512, dtype="<u4")
    return bytes(np.repeat(sectors, 128).tobytes())


# -- a daemon subprocess and a raw QMP client -----------------------------------------------------
class DaemonProcess:
    """``python -m fleece daemon`` with its QMP socket at ``qmp``; stdout/stderr to files."""

    def __init__(self, qmp: Path, options: list[str], log_dir: Path) -> None:
        self.qmp = qmp
        self.argv = [sys.executable, "-m", "fleece", "daemon", "--qmp", f"unix:{qmp}", *options]
        stamp = time.monotonic_ns()
        self.out_path = log_dir / f"daemon-{stamp}.out"
        self.err_path = log_dir / f"daemon-{stamp}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, env=PEER_ENV, cwd=log_dir)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_socket(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp.exists():
            if self.process.poll() is not None:
                pytest.fail(f"daemon exited {self.process.returncode}: {self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no QMP socket after {timeout} s: {self.stderr}")
            time.sleep(0.01)

    def kill9(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(20)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL when it does not go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(20)


class RawQMP:
    """A QMP client on raw bytes; replies are CRLF-terminated JSON lines."""

    def __init__(self, path: Path, timeout: float = WAIT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()

    def recv_line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def recv(self) -> Any:
        return json.loads(self.recv_line())

    def reply(self) -> dict[str, Any]:
        while True:
            message = self.recv()
            assert isinstance(message, dict), message
            if "event" in message:
                self.events.append(message)
                continue
            return message

    def negotiate(self) -> None:
        greeting = self.recv()
        assert "QMP" in greeting, greeting
        assert self.command("qmp_capabilities") == {"return": {}}

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": name}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode())
        return self.reply()

    def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = self.command(name, arguments)
        assert "return" in reply, reply
        return reply["return"]

    def wait_event(self, name: str, timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name:
                    del self.events[: index + 1]
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {name} within {timeout} s; got {self.events}")
            self.sock.settimeout(remaining)
            message = self.recv()
            assert isinstance(message, dict) and "event" in message, message
            self.events.append(message)


# -- certificates (GnuTLS certtool, QEMU's and libnbd's layouts) ----------------------------------
def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, info = directory / "ca-key.pem", directory / "ca-cert.pem", directory / "ca.info"
    info.write_text(f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 30\n")
    run("certtool", "--generate-privkey", "--outfile", str(key))
    run("certtool", "--generate-self-signed", "--load-privkey", str(key), "--template",
        str(info), "--outfile", str(cert))
    return key, cert


def make_cert(directory: Path, ca: tuple[Path, Path], role: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, info = (directory / f"{role}-key.pem", directory / f"{role}-cert.pem",
                       directory / f"{role}.info")
    usage = "tls_www_server" if role == "server" else "tls_www_client"
    info.write_text(
        f"organization = fleece drills\ncn = localhost\ndns_name = localhost\n"
        f"ip_address = 127.0.0.1\n{usage}\nencryption_key\nsigning_key\nexpiration_days = 30\n"
    )
    run("certtool", "--generate-privkey", "--outfile", str(key))
    run("certtool", "--generate-certificate", "--load-ca-certificate", str(ca[1]),
        "--load-ca-privkey", str(ca[0]), "--load-privkey", str(key), "--template", str(info),
        "--outfile", str(cert))
    (directory / "ca-cert.pem").write_bytes(ca[1].read_bytes())
