"""Interop tests run the real peers. A missing peer is a failure, never a skip."""

from __future__ import annotations

import shutil
import subprocess

import pytest

PEERS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "nbdcopy", "nbdsh",
         "nbdkit", "fio")


def require(tool: str) -> str:
    """The path of ``tool``; fails the test (never skips) when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run `make test` (it installs the Debian peers)")
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a peer, failing the test with its output if ``check`` and it exits non-zero."""
    require(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
