"""Helpers shared by the drills: scaling, events, images, daemons, certificates."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

from tests.daemons import DaemonProcess as DaemonProcess  # re-exported for the drills
from tests.daemons import RawQMP as RawQMP
from tests.daemons import fleece_argv
from tests.peers import PEER_ENV as PEER_ENV
from tests.peers import make_ca as make_ca
from tests.peers import make_cert as make_cert
from tests.peers import require as require
from tests.peers import run as run

KiB = 1 << 10
MiB = 1 << 20
WAIT = 10.0


def long_mode() -> bool:
    """True with ``--long-drills`` (set by the folder's conftest before collection)."""
    return os.environ.get("FLEECE_LONG_DRILLS") == "1"


def scale(short: int, long: int) -> int:
    """``short`` by default, ``long`` with ``--long-drills``."""
    return long if long_mode() else short


def pattern(size: int, seed: int = 0) -> bytes:
    """Every 512-byte sector filled with its own number plus ``seed``: no two sectors alike."""
    sectors = np.arange(seed, seed + size // 512, dtype="<u4")
    return bytes(np.repeat(sectors, 128).tobytes())


# -- a daemon subprocess and a raw QMP client -----------------------------------------------------
def fleece_daemon(qmp: Path, options: list[str], log_dir: Path) -> DaemonProcess:
    """``python -m fleece daemon --qmp unix:QMP OPTIONS`` (drills allow 20 s to start and stop:
    they run it under load)."""
    return DaemonProcess(fleece_argv("--qmp", f"unix:{qmp}", *options), qmp, log_dir,
                         start_timeout=20.0, exit_timeout=20.0)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from ``sock``; ``ConnectionError`` if it closes first."""
    out = b""
    while len(out) < size:
        data = sock.recv(size - len(out))
        if not data:
            raise ConnectionError("closed")
        out += data
    return out
