"""Benchmark of the NBD server: ``nbdcopy`` of a fully written 256 MiB raw export to ``null:``.

Group ``nbdcopy-256MiB``: fleece's server (read-only export, multi-conn, so nbdcopy uses four
connections) against ``qemu-storage-daemon`` exporting the same file, when it is installed.
The image is written and the servers started outside the timed function; each round is one
``nbdcopy`` run (pedantic, three rounds). Run::

    python -m pytest benchmarks/bench_nbd.py --benchmark-only
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from fleece.storage import Storage

SIZE = 256 * 1024 * 1024
PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "full.raw"
    chunk = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(SIZE >> 20):
            f.write(chunk)
    return path


def serve_fleece(image: Path, tmp: Path) -> Generator[str, None, None]:
    sock = str(tmp / "fleece.sock")
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk",
                                         "file": {"driver": "file", "filename": str(image)}})
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        storage.execute("nbd-server-add", {"device": "disk"})
        yield f"nbd+unix:///disk?socket={sock}"


def serve_qsd(image: Path, tmp: Path) -> Generator[str, None, None]:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        pytest.fail("qemu-storage-daemon is not installed")
    sock = str(tmp / "qsd.sock")
    blockdev = {"driver": "raw", "node-name": "disk", "read-only": True,
                "file": {"driver": "file", "filename": str(image), "locking": "off"}}
    proc = subprocess.Popen([
        qsd, "--blockdev", json.dumps(blockdev),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=off",
    ])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


SERVERS: dict[str, Callable[[Path, Path], Generator[str, None, None]]] = {
    "fleece": serve_fleece,
    "qemu-storage-daemon": serve_qsd,
}


@pytest.mark.parametrize("server", list(SERVERS))
def test_nbdcopy_to_null(benchmark: Any, image: Path, tmp_path: Path, server: str) -> None:
    benchmark.group = "nbdcopy-256MiB"
    serving = SERVERS[server](image, tmp_path)
    uri = next(serving)

    def copy() -> None:
        subprocess.run(["nbdcopy", uri, "null:"], check=True, env=PEER_ENV, timeout=60)

    try:
        benchmark.pedantic(copy, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        serving.close()
    benchmark.extra_info["MiB/s"] = SIZE / (1 << 20) / benchmark.stats.stats.mean
