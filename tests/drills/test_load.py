"""Load drill: 64 NBD connections x 64 requests in flight while the guest writes and jobs run.

In one process (so ``VmRSS`` of ``/proc/self/status`` covers the server): a 32 MiB qcow2 source
full of known data on device ``virtio0``; a fleecing job (``drive-backup sync=none
target-id=pit0``) and a speed-limited ``drive-backup sync=full`` of the same device running;
``pit0`` exported read-only. 64 client threads (``fleece.nbd.client``) each keep 64 pipelined
READs (4 KiB to 64 KiB, random offsets) in flight and check every reply against the point-in-time
content, while a guest thread writes random ranges through ``Storage.device``. After a warm-up,
RSS is sampled at the start and the end of the soak (5 s, 60 s with ``--long-drills``): growth
stays under 50 MiB; no request fails and no reply is wrong.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from fleece.block.qcow2 import create
from fleece.nbd.client import NBDClient
from fleece.nbd.constants import Cmd
from fleece.storage import Storage
from tests.drills.support import KiB, MiB, pattern, scale
from tests.events import EventLog

SIZE = 32 * MiB
CONNECTIONS = 64
IN_FLIGHT = 64
WARMUP = 1.5
SOAK = float(scale(5, 60))
RSS_GROWTH_LIMIT = 50 * MiB
CONTENT = pattern(SIZE, seed=11)

pytestmark = pytest.mark.timeout(scale(90, 600))


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Reader(threading.Thread):
    def __init__(self, sock: str, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.sock, self.stop = sock, stop
        self.rng = random.Random(seed)
        self.served = 0
        self.bytes = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with NBDClient.connect_unix(self.sock, "pit0") as client:
                while not self.stop.is_set():
                    batch: list[tuple[int, int, int]] = []
                    for _ in range(IN_FLIGHT):
                        length = self.rng.choice([4 * KiB, 4 * KiB, 16 * KiB, 64 * KiB])
                        offset = self.rng.randrange(0, SIZE - length)
                        batch.append((client.submit(Cmd.READ, offset, length), offset, length))
                    for cookie, offset, length in batch:
                        reply = client.wait(cookie)
                        if reply.error or reply.data != CONTENT[offset:offset + length]:
                            self.errors.append(f"read {offset}+{length}: error {reply.error}")
                        self.served += 1
                        self.bytes += length
        except Exception as exc:  # reported by the test, never lost in a thread
            self.errors.append(f"{type(exc).__name__}: {exc}")


def test_64_connections_64_in_flight(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    create(str(src), SIZE)
    sock = str(tmp_path / "nbd.sock")
    storage = Storage()
    log = EventLog()
    storage.subscribe(log)
    stop = threading.Event()
    readers: list[Reader] = []
    try:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                         "file": {"driver": "file", "filename": str(src)}})
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                       "drive": "disk0"})
        device = storage.device("virtio0")
        device.pwrite(0, CONTENT)
        storage.execute("drive-backup", {"device": "virtio0", "target": str(tmp_path / "p.qcow2"),
                                         "format": "qcow2", "sync": "none", "target-id": "pit0",
                                         "job-id": "fleece"})
        storage.execute("drive-backup", {"device": "virtio0", "sync": "full", "format": "qcow2",
                                         "target": str(tmp_path / "full.qcow2"), "job-id": "full",
                                         "speed": 2 * MiB})
        storage.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        storage.execute("nbd-server-add", {"device": "pit0"})

        writes = [0]

        def guest() -> None:
            rng = random.Random(5)
            while not stop.is_set():
                length = rng.choice([4 * KiB, 64 * KiB, 256 * KiB])
                offset = rng.randrange(0, SIZE - length)
                device.pwrite(offset, bytes([rng.randrange(256)]) * length)
                writes[0] += 1
                time.sleep(0.002)

        readers = [Reader(sock, seed, stop) for seed in range(CONNECTIONS)]
        for reader in readers:
            reader.start()
        writer = threading.Thread(target=guest, daemon=True)
        writer.start()
        time.sleep(WARMUP)
        rss_start, served_start = rss(), sum(r.served for r in readers)
        time.sleep(SOAK)
        rss_end, served_end = rss(), sum(r.served for r in readers)
        stop.set()
        for reader in readers:
            reader.join(30)
        writer.join(30)
        errors = [e for r in readers for e in r.errors]
        assert not errors, errors[:10]
        assert all(not r.is_alive() for r in readers)
        served = served_end - served_start
        jobs = {j["device"]: j for j in storage.execute("query-block-jobs")}
        completed = {e["device"]: e for e in log.data("BLOCK_JOB_COMPLETED")}
        print(f"\nDRILL load: {CONNECTIONS} connections x {IN_FLIGHT} in flight x {SOAK:.0f} s: "
              f"{served} requests in the soak ({served / SOAK:.0f}/s), "
              f"{sum(r.served for r in readers)} in all, {writes[0]} guest writes, "
              f"RSS {rss_start / MiB:.1f} -> {rss_end / MiB:.1f} MiB, "
              f"full backup {'completed' if 'full' in completed else 'running'}")
        assert served > 0 and writes[0] > 0
        assert "fleece" in jobs  # the fleecing job ran all along
        # The full backup runs on, or completed cleanly (copy-before-write of the guest's
        # writes, with copy-ahead, counts toward it and may finish it early).
        assert "full" in jobs or "error" not in completed["full"], completed
        assert rss_end - rss_start < RSS_GROWTH_LIMIT, (rss_start, rss_end)
        assert not log.data("BLOCK_JOB_ERROR")
    finally:
        stop.set()
        storage.close()
