"""The runnable examples, as a user runs them (``sys.executable``, a subprocess, a timeout).

- ``python examples/harness.py``: the in-process hypervisor harness (vCPU threads writing through
  ``Storage().device("virtio0")`` while the snapshot is exported over NBD and checked) exits 0
  and reports the snapshot identical, the live disk matching, ``pit0`` gone and the target kept.
- ``python examples/push_backup.py`` (push backup with fleecing: a guest thread writing while
  the snapshot-access node is pushed with ``blockdev-backup discard-source=true`` to qemu-nbd, and
  with ``--server fleece`` to a second ``Storage``) exits 0 and reports the pushed image equal
  to the point in time, the guest having written during the push, the fleecing image emptied by
  ``discard-source`` and the live disk matching.
- ``python -m fleece demo --size 64M`` exits 0 and prints its report: ``the snapshot verified``,
  ``gone from the graph``, ``kept``; the read with fleece's own NBD client is labelled so, and
  nbdcopy's copy of the snapshot is ``identical (sha256)``, with its rate. Without nbdcopy on
  ``PATH`` the demo still verifies and says to ``apt-get install libnbd-bin``. With ``--dir``
  the files stay: ``qemu-img check`` passes on the target and ``qemu-img info`` names the demo
  disk as its backing file.
- ``fleece demo`` refuses a size that is not a multiple of its 4 MiB chunk (exit 2).
- The README's embedding snippet (``with Storage() as storage:``), run as written in a folder
  holding a ``disk.qcow2``, exits 0 with nothing on stderr (no ``ResourceWarning`` either); the
  NBD socket is gone afterwards, ``qemu-img check`` passes on the disk and the target, the disk
  starts with ``new data`` and the target, read through its backing, with the old zeroes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import require

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 45.0
ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def run_python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=ENV)


def test_harness_example_exits_0(tmp_path: Path) -> None:
    script = ROOT / "examples" / "harness.py"
    assert script.exists()
    proc = run_python(str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "snapshot over NBD: identical" in out
    assert "live disk matches the guest's writes: True" in out
    assert "pit0 is gone" in out
    assert "target kept" in out
    assert out.rstrip().endswith("harness: the snapshot verified")
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


@pytest.mark.parametrize("server", ["qemu-nbd", "fleece"])
def test_push_backup_example_exits_0(tmp_path: Path, server: str) -> None:
    if server == "qemu-nbd":
        require("qemu-nbd")
    script = ROOT / "examples" / "push_backup.py"
    proc = run_python(str(script), "--server", server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"backup server {server}; the push of 32 MiB completed" in out
    assert "pushed image equals the point in time: True" in out
    assert "live disk matches the guest's writes: True" in out
    left = re.search(r"(\d+) KiB of it left after discard-source", out)
    assert left is not None and int(left.group(1)) <= 2048, out
    assert "the guest wrote 0 blocks" not in out
    assert out.rstrip().endswith("push_backup: the pushed image verified")
    assert list(tmp_path.iterdir()) == []


def test_demo_64m_exits_0_and_reports(tmp_path: Path) -> None:
    proc = run_python("-m", "fleece", "demo", "--size", "64M", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "fleece demo report" in out
    assert "the snapshot verified" in out
    assert "gone from the graph" in out
    assert "kept" in out
    assert "verified byte for byte" in out
    assert "with fleece's own Python NBD client, verified byte for byte" in out
    (nbdcopy,) = [line for line in out.splitlines() if "snapshot read by nbdcopy" in line]
    assert nbdcopy.endswith("/s into a file, identical (sha256)"), nbdcopy
    assert "still serving" in out
    assert "FAILED" not in out and "WRONG" not in out and "MISSING" not in out


def test_demo_without_nbdcopy_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fleece", "demo", "--size", "8M"],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
                          env={**os.environ, "PATH": str(empty)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nbdcopy not installed, skipped (apt-get install libnbd-bin)" in proc.stdout
    assert "the snapshot verified" in proc.stdout


def test_demo_with_dir_leaves_clean_images(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    proc = run_python("-m", "fleece", "demo", "--size", "8M", "--dir", str(folder),
                      "--seed", "7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    disk, target = folder / "disk.qcow2", folder / "pit.qcow2"
    assert disk.exists() and target.exists()
    qemu_img = require("qemu-img")
    for image in (disk, target):
        check = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True,
                               timeout=TIMEOUT)
        assert check.returncode == 0, check.stdout + check.stderr
    info = subprocess.run([qemu_img, "info", "--output=json", str(target)], capture_output=True,
                          text=True, timeout=TIMEOUT, check=True)
    assert json.loads(info.stdout)["backing-filename"] == str(disk)
    assert not list(folder.glob("*.sock"))


def readme_snippet(heading: str) -> str:
    """The first ``python`` code block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_readme_embedding_snippet_runs(tmp_path: Path) -> None:
    qemu_img = require("qemu-img")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"),
                    "16M"], check=True, timeout=TIMEOUT)
    snippet = readme_snippet("## Embedding it in a harness")
    assert "with Storage() as storage:" in snippet
    proc = run_python("-W", "error::ResourceWarning", "-c", snippet, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    assert not (tmp_path / "nbd.sock").exists()
    for image in ("disk.qcow2", "pit.qcow2"):
        check = subprocess.run([qemu_img, "check", str(tmp_path / image)], capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert check.returncode == 0, check.stdout + check.stderr
    for image, want in (("disk.qcow2", b"new data"), ("pit.qcow2", bytes(8))):
        raw = tmp_path / f"{image}.raw"
        subprocess.run([qemu_img, "convert", "-O", "raw", str(tmp_path / image), str(raw)],
                       check=True, timeout=TIMEOUT, cwd=tmp_path)
        assert raw.read_bytes()[:8] == want


def test_demo_refuses_a_size_that_is_not_whole_chunks(tmp_path: Path) -> None:
    proc = run_python("-m", "fleece", "demo", "--size", "5M", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--size" in proc.stdout + proc.stderr
