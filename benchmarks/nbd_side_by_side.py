"""The NBD server side by side with qemu-storage-daemon: nbdcopy throughput and fio IOPS.

Both serve the same image over a unix socket, one after the other in this run; nbdcopy copies
the export to ``null:`` and fio reads 4 KiB at random (``ioengine=nbd``, iodepth 16). Run::

    python benchmarks/nbd_side_by_side.py [--size 1G] [--format raw|qcow2] [--repeat 3]

Prints the best of ``--repeat`` runs for each server and the ratio fleece / QEMU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fleece.storage import Storage
from fleece.units import parse_size

PEER_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


@contextmanager
def fleece_server(image: Path, fmt: str, sock: Path) -> Iterator[None]:
    storage = Storage()
    try:
        storage.execute("blockdev-add", {"driver": fmt, "node-name": "d", "read-only": True,
                                         "file": {"driver": "file", "filename": str(image)}})
        storage.execute("nbd-server-start",
                        {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        storage.execute("nbd-server-add", {"device": "d", "writable": False})
        yield
    finally:
        storage.close()


@contextmanager
def qemu_server(image: Path, fmt: str, sock: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={image},read-only=on",
         "--blockdev", f"driver={fmt},node-name=d,file=f,read-only=on",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=d,name=d"],
        env=PEER_ENV,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def nbdcopy_rate(sock: Path, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "-C", "4", f"nbd+unix:///d?socket={sock}", "null:"],
                   check=True, env=PEER_ENV)
    return size / (time.perf_counter() - start)


def fio_iops(sock: Path, seconds: int) -> float:
    out = subprocess.run(
        ["fio", "--name=r", "--ioengine=nbd", f"--uri=nbd+unix:///d?socket={sock}",
         "--rw=randread", "--bs=4k", "--iodepth=16", f"--runtime={seconds}", "--time_based",
         "--output-format=json"],
        check=True, capture_output=True, text=True, env=PEER_ENV,
    ).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fio-seconds", type=int, default=4)
    args = parser.parse_args()
    for tool in ("nbdcopy", "fio", "qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool, path=PEER_ENV["PATH"]) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="fleece-nbd-bench-") as tmp:
        work = Path(tmp)
        raw = work / "image.raw"
        with raw.open("wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size >> 20):
                f.write(chunk)
        image = raw
        if args.format == "qcow2":
            image = work / "image.qcow2"
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)],
                           check=True, env=PEER_ENV)
        servers: dict[str, Callable[[Path, str, Path], object]] = {
            "fleece": fleece_server, "qemu": qemu_server}
        results: dict[str, dict[str, float]] = {}
        for name, server in servers.items():
            sock = work / f"{name}.sock"
            with server(image, args.format, sock):  # type: ignore[attr-defined]
                results[name] = {
                    "nbdcopy MiB/s": max(nbdcopy_rate(sock, args.size)
                                         for _ in range(args.repeat)) / (1 << 20),
                    "randread 4k IOPS": max(fio_iops(sock, args.fio_seconds)
                                            for _ in range(args.repeat)),
                }
    print(f"{'figure':<22}{'fleece':>12}{'qemu':>12}{'ratio':>8}   ({args.format})")
    for figure in results["fleece"]:
        ours, theirs = results["fleece"][figure], results["qemu"][figure]
        print(f"{figure:<22}{ours:>12.0f}{theirs:>12.0f}{ours / theirs:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
