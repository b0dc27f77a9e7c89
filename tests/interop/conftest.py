"""Interop tests run the real peers. A missing peer is a failure, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers import make_ca, make_cert, require, run

PEERS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "nbdcopy", "nbdsh",
         "nbdkit", "fio")

__all__ = ["PEERS", "require", "run"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test PKI made with certtool: ``server`` and ``client`` hold certificates of one CA
    (with its ``ca-cert.pem``), ``wrong`` a client certificate of another CA."""
    require("certtool")
    root = tmp_path_factory.mktemp("pki")
    good = make_ca(root / "ca", "fleece test CA")
    bad = make_ca(root / "other-ca", "some other CA")
    dirs = {"server": root / "server", "client": root / "client", "wrong": root / "wrong"}
    for d in dirs.values():
        d.mkdir()
    make_cert(dirs["server"], good, "server")
    make_cert(dirs["client"], good, "client")
    make_cert(dirs["wrong"], bad, "client")
    return dirs
