"""fleece's file driver and real QEMU (``qemu-io``) see each other's image locks.

QEMU's ``file-posix`` protects images with open-file-description byte-range locks; fleece's
``file`` driver takes the same bytes, so neither side can open an image for writing while the
other one writes it. What is tested:

- while fleece holds a writable ``raw`` node on a file, ``qemu-io -f raw -c 'write 0 512' FILE``
  fails with a lock error and the file is unchanged; ``qemu-io -r`` (which shares writes) reads
  fleece's data; ``qemu-img convert`` (which does not share writes) is refused with QEMU's
  ``Failed to get shared "write" lock`` unless given ``-U``;
- after fleece releases the node (``blockdev-del``, or ``Storage.close``), ``qemu-io`` can write;
- while ``qemu-io`` (a long-running process reading commands from stdin) holds the file for
  writing, fleece's ``blockdev-add`` of a writable raw node on it fails with ``GenericError``
  mentioning the lock and leaves no node behind; once ``qemu-io`` quits, fleece opens the file and
  reads what ``qemu-io`` wrote.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import GenericError
from fleece.storage import Storage
from tests.interop.conftest import require, run

pytestmark = pytest.mark.interop

MiB = 1 << 20


def raw_options(name: str, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "filename": path},
        **extra,
    }


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


class QemuIo:
    """A ``qemu-io -f raw FILE`` process kept open, fed commands on stdin."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [require("qemu-io"), "-f", "raw", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._seen = ""
        self._wait_for(self.PROMPT, "startup", 10.0)

    PROMPT = "qemu-io> "

    def _wait_for(self, expect: str, what: str, timeout: float) -> str:
        """Read until ``expect`` appears; return everything up to and including it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while expect not in self._seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                pytest.fail(f"qemu-io did not answer {what!r} with {expect!r}: {self._seen!r}")
            if self._selector.select(min(left, 0.5)):
                self._seen += self.proc.stdout.read() or ""
        before, _, after = self._seen.partition(expect)
        self._seen = after
        return before + expect

    def command(self, line: str, expect: str = "", timeout: float = 10.0) -> str:
        """Send ``line`` once qemu-io prompted; return its output (which must hold ``expect``).

        Returns after the next prompt: qemu-io reads stdin line by line from its main loop, so a
        line sent before it is ready for it may sit unread in its stdio buffer.
        """
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self._wait_for(self.PROMPT, line, timeout)
        assert expect in answer, f"qemu-io answered {line!r} with {answer!r}"
        return answer

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        return self.proc.wait(10)

    def kill(self) -> None:
        self._selector.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "locked.img"
    with open(path, "wb") as f:
        f.write(b"\x11" * 4096)
        f.truncate(MiB)
    return str(path)


@pytest.fixture
def storage() -> Iterator[Storage]:
    s = Storage()
    try:
        yield s
    finally:
        s.close()


def read_head(path: str, length: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


def test_qemu_io_cannot_write_while_fleece_holds_a_writer(storage: Storage, image: str) -> None:
    require("qemu-io")
    storage.execute("blockdev-add", raw_options("disk0", image))
    node = storage.graph.find("disk0")
    assert node is not None
    node.pwrite(0, b"\x22" * 512)
    node.flush()

    refused = run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 512", image, check=False)
    assert refused.returncode != 0
    assert 'Failed to get "write" lock' in output(refused), output(refused)
    assert read_head(image) == b"\x22" * 512

    # qemu-io's read-only opener shares writes, so it may read beside fleece's writer
    reader = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x22 0 512", image)
    assert "read 512/512 bytes" in reader.stdout
    # qemu-img convert reads without sharing writes: refused unless told to force-share
    copy = str(Path(image).with_name("copy.img"))
    convert = run("qemu-img", "convert", "-f", "raw", "-O", "raw", image, copy, check=False)
    assert convert.returncode != 0
    assert 'Failed to get shared "write" lock' in output(convert), output(convert)
    run("qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", image, copy)
    assert read_head(copy) == b"\x22" * 512

    storage.execute("blockdev-del", {"node-name": "disk0"})
    wrote = run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 512", image)
    assert "wrote 512/512 bytes" in wrote.stdout
    assert read_head(image) == b"\x33" * 512


def test_storage_close_releases_the_lock(image: str) -> None:
    storage = Storage()
    storage.execute("blockdev-add", raw_options("disk0", image))
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    refused = run("qemu-io", "-f", "raw", "-c", "write 0 512", image, check=False)
    assert refused.returncode != 0 and "lock" in output(refused)
    storage.close()
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 512", image)
    assert read_head(image) == b"\x44" * 512


def test_fleece_cannot_open_a_writer_while_qemu_io_writes(storage: Storage, image: str) -> None:
    qemu = QemuIo(image)
    try:
        # once this answers, qemu-io has the image open for writing and holds its locks
        qemu.command("write -P 0x5a 0 4096", "wrote 4096/4096 bytes")
        qemu.command("flush")

        with pytest.raises(GenericError) as info:
            storage.execute("blockdev-add", raw_options("disk0", image))
        assert "lock" in str(info.value)
        assert image in str(info.value)
        assert storage.graph.nodes() == []
        with pytest.raises(GenericError, match="lock"):
            storage.execute("blockdev-add", raw_options("ro", image, **{"read-only": True}))
        assert storage.graph.nodes() == []

        # qemu-io was not disturbed and keeps writing
        qemu.command("write -P 0x5b 4096 512", "wrote 512/512 bytes")
        assert qemu.quit() == 0
    finally:
        qemu.kill()

    storage.execute("blockdev-add", raw_options("disk0", image))
    node = storage.graph.find("disk0")
    assert node is not None
    assert node.pread(0, 4096) == b"\x5a" * 4096
    assert node.pread(4096, 512) == b"\x5b" * 512
    node.pwrite(0, b"fleece writes now")
