"""In-process checks of the native data plane: run once with it, once with FLEECE_NO_DATAPLANE=1.

The Storage runs in this process, so the CPU figures are this process's (``getrusage``):

    PATH=/usr/bin:$PATH .venv/bin/python benchmarks/plane_inprocess.py nbdcopy
    FLEECE_NO_DATAPLANE=1 PATH=/usr/bin:$PATH .venv/bin/python benchmarks/plane_inprocess.py nbdcopy

``nbdcopy``: a 1 GiB qcow2 copied twice through the live export, then twice through the
fleecing snapshot (drive-backup sync=none, pit0), to ``null:``. ``randwrite``: fio 4 KiB random
writes to a writable export of the device, then again under fleecing. ``seqwrite``: fio 64 KiB
sequential writes (iodepth 16) over the first half of a 1 GiB qcow2, then over the second
half under fleecing (every cluster copied before its first write). ``device``: 64 KiB
sequential ``Storage.device()`` writes, then again under a fresh snapshot (every cluster copied
before its first write), in five rounds; the median ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fleece.nbd import dataplane
from fleece.storage import Storage

MiB = 1 << 20


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _source(folder: Path, size: int) -> Storage:
    image = folder / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), str(size)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {size}", str(image)],
                   check=True, capture_output=True)
    storage = Storage()
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src",
                                   "share-rw": True})
    storage.execute("nbd-server-start",
                    {"addr": {"type": "unix", "data": {"path": str(folder / "nbd.sock")}}})
    return storage


def _fleece(storage: Storage, folder: Path, name: str = "pit0") -> Path:
    """Start fleecing ``virtio0`` into a new qcow2 node ``name`` (its job: ``virtio0``); the
    target's file."""
    target = folder / f"{name}.qcow2"
    storage.execute("drive-backup", {"device": "virtio0", "target": str(target),
                                     "format": "qcow2", "target-id": name, "sync": "none"})
    return target


def nbdcopy(folder: Path) -> None:
    storage = _source(folder, 1024 * MiB)
    sock = folder / "nbd.sock"
    storage.execute("nbd-server-add", {"device": "virtio0", "name": "live"})

    def copy(name: str) -> None:
        native, cpu, start = dataplane.native_requests(), _cpu(), time.perf_counter()
        subprocess.run(["nbdcopy", f"nbd+unix:///{name}?socket={sock}", "null:"], check=True)
        seconds, cpu = time.perf_counter() - start, _cpu() - cpu
        print(f"{name:5} {1024 / seconds:6.0f} MiB/s  CPU {cpu:.2f} s/GiB  "
              f"native {dataplane.native_requests() - native}")

    copy("live")
    copy("live")
    _fleece(storage, folder)
    storage.execute("nbd-server-add", {"device": "pit0", "name": "pit0"})
    copy("pit0")
    copy("pit0")
    storage.close()


def _fio_write(sock: Path, *options: str) -> tuple[dict[str, Any], float, int]:
    """fio writing to the ``live`` export with ``options``: its write section, the CPU seconds
    per GiB this process spent meanwhile, and how many requests the planes served natively."""
    native, cpu = dataplane.native_requests(), _cpu()
    out = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///live?socket={sock}",
         *options, "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job: dict[str, Any] = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    gib = job["io_bytes"] / (1 << 30)
    return job, (_cpu() - cpu) / gib, dataplane.native_requests() - native


def randwrite(folder: Path) -> None:
    storage = _source(folder, 512 * MiB)
    sock = folder / "nbd.sock"
    storage.execute("nbd-server-add", {"device": "virtio0", "name": "live", "writable": True})

    def fio(label: str) -> None:
        job, cpu, native = _fio_write(sock, "--rw=randwrite", "--bs=4k", "--iodepth=16",
                                      "--size=512M", "--time_based", "--runtime=4")
        print(f"{label:9} {job['iops']:7.0f} IOPS  CPU {cpu:.1f} s/GiB  native {native}")

    fio("plain")
    _fleece(storage, folder)
    fio("fleecing")
    storage.close()


def seqwrite(folder: Path) -> None:
    storage = _source(folder, 1024 * MiB)
    sock = folder / "nbd.sock"
    storage.execute("nbd-server-add", {"device": "virtio0", "name": "live", "writable": True})

    def fio(label: str, offset: int) -> None:
        job, cpu, native = _fio_write(sock, "--rw=write", "--bs=64k", "--iodepth=16",
                                      f"--offset={offset}", "--size=512M")
        print(f"{label:9} {job['bw'] / 1024:7.0f} MiB/s  CPU {cpu:.2f} s/GiB  native {native}")

    fio("plain", 0)
    _fleece(storage, folder)
    fio("fleecing", 512 * MiB)
    storage.close()


def device(folder: Path, rounds: int = 5) -> None:
    storage = _source(folder, 512 * MiB)
    disk = storage.device("virtio0")
    data = bytes(range(256)) * 256

    def write(start: int, end: int) -> float:
        began = time.perf_counter()
        for offset in range(start, end, len(data)):
            disk.pwrite(offset, data)
        return (end - start) / MiB / (time.perf_counter() - began)

    write(0, 64 * MiB)  # warm: the route learns the source
    ratios = []
    for number in range(rounds):  # each round: a fresh snapshot, every cluster still owed
        plain = write(0, 256 * MiB)
        target = _fleece(storage, folder, f"pit{number}")
        fleecing = write(256 * MiB, 512 * MiB)
        storage.execute("block-job-cancel", {"device": "virtio0"})
        while storage.execute("query-block-jobs"):
            time.sleep(0.01)
        target.unlink()
        ratios.append(fleecing / plain)
        print(f"plain {plain:.0f} MiB/s  fleecing {fleecing:.0f} MiB/s  "
              f"ratio {fleecing / plain:.2f}")
    print(f"median ratio {statistics.median(ratios):.2f}")
    storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["nbdcopy", "randwrite", "seqwrite", "device"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        checks = {"nbdcopy": nbdcopy, "randwrite": randwrite, "seqwrite": seqwrite,
                  "device": device}
        checks[args.check](Path(folder))


if __name__ == "__main__":
    main()
