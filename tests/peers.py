"""Test helpers for the real peers (qemu-img, nbdinfo, certtool, ...): a missing peer fails the
test, never skips it. Peers run with /usr/bin first in PATH (Debian's nbdsh imports Debian's
Python, not the venv's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def require(tool: str) -> str:
    """The path of ``tool``; fails the test (never skips) when it is not installed."""
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


# -- certificates with GnuTLS's certtool, in QEMU's (server) and libnbd's (client) layouts --------
def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA in ``directory``: ``(key, cert)``."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, info = directory / "ca-key.pem", directory / "ca-cert.pem", directory / "ca.info"
    info.write_text(f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 30\n")
    run("certtool", "--generate-privkey", "--outfile", str(key))
    run("certtool", "--generate-self-signed", "--load-privkey", str(key), "--template",
        str(info), "--outfile", str(cert))
    return key, cert


def make_cert(directory: Path, ca: tuple[Path, Path], role: str) -> None:
    """``{role}-key.pem``/``{role}-cert.pem`` (role ``server`` or ``client``) signed by ``ca``,
    with a copy of the CA's certificate, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, info = (directory / f"{role}-key.pem", directory / f"{role}-cert.pem",
                       directory / f"{role}.info")
    usage = "tls_www_server" if role == "server" else "tls_www_client"
    info.write_text(
        f"organization = fleece tests\ncn = localhost\ndns_name = localhost\n"
        f"ip_address = 127.0.0.1\n{usage}\nencryption_key\nsigning_key\nexpiration_days = 30\n"
    )
    run("certtool", "--generate-privkey", "--outfile", str(key))
    run("certtool", "--generate-certificate", "--load-ca-certificate", str(ca[1]),
        "--load-ca-privkey", str(ca[0]), "--load-privkey", str(key), "--template", str(info),
        "--outfile", str(cert))
    (directory / "ca-cert.pem").write_bytes(ca[1].read_bytes())
