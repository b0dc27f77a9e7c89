"""Interop tests run the real peers. A missing peer is a failure, never a skip."""

from __future__ import annotations

from tests.peers import require, run

PEERS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "nbdcopy", "nbdsh",
         "nbdkit", "fio")

__all__ = ["PEERS", "require", "run"]
