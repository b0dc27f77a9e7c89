"""``fleece demo --push`` as a user runs it (``python -m fleece``, a subprocess, a timeout).

The demo pushes the snapshot of its sample disk, through the filter scheme (``copy-before-write``
and ``snapshot-access``) and an ``nbd`` node, to a local backup server while two guest vCPUs
write; it exits 0 only when the pushed image equals the point-in-time content byte for byte.

- to ``qemu-nbd -e 4`` with ``--multi-conn 4``: the report names the server, says four
  connections carried the push, that the guest wrote during it, that ``discard-source`` left
  the fleecing image small, and that the pushed image verified.
- to fleece's own server (``--push-server fleece``): its writable export does not offer
  multi-conn, so the report says one connection; the pushed image verifies all the same.
- ``--multi-conn`` without ``--push``, or out of range, is refused (exit 2) with a message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import require

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleece", "demo", *args], capture_output=True,
                          text=True, timeout=100, cwd=cwd, env={**ENV, "PYTHONPATH": str(ROOT)})


def test_demo_push_to_qemu_nbd_with_multi_conn(tmp_path: Path) -> None:
    require("qemu-nbd")
    proc = demo("--push", "--size", "64M", "--multi-conn", "4", "--dir", str(tmp_path),
                cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "backup server                qemu-nbd -e 4" in out
    assert re.search(r"push\s+64.0 MiB in [0-9.]+ s .*, over 4 connections", out), out
    written = re.search(r"guest writes during push\s+([0-9.]+) (KiB|MiB)", out)
    assert written and float(written.group(1)) > 0, out
    assert re.search(r"fleecing image\s+.* copied, .* left after discard-source", out), out
    assert "pushed image                 equals the point in time byte for byte" in out
    assert "live disk                    equals the guest's writes" in out
    assert out.rstrip().endswith("fleece demo: the pushed backup verified")
    assert (tmp_path / "backup.raw").stat().st_size == 64 << 20  # --dir keeps the files


def test_demo_push_to_fleece(tmp_path: Path) -> None:
    proc = demo("--push", "--push-server", "fleece", "--size", "32M", "--multi-conn", "2",
                cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "backup server                fleece (a second Storage)" in out
    assert re.search(r"push\s+32.0 MiB in .*, over 1 connection \(the server does not offer "
                     r"multi-conn\)", out), out
    assert "pushed image                 equals the point in time byte for byte" in out
    assert out.rstrip().endswith("fleece demo: the pushed backup verified")
    assert list(tmp_path.iterdir()) == []  # a temporary folder, gone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--multi-conn", "2"], "--multi-conn and --push-server need --push"),
        (["--push-server", "fleece"], "--multi-conn and --push-server need --push"),
        (["--push", "--multi-conn", "17"], "--multi-conn: from 1 to 16, got 17"),
        (["--push", "--push-server", "nbdkit"], "invalid choice: 'nbdkit'"),
    ],
)
def test_demo_push_options_refused(tmp_path: Path, args: list[str], message: str) -> None:
    proc = demo(*args, "--size", "8M", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr
