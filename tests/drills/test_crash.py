"""Crash drills: ``kill -9`` of the daemon at random moments; images stay consistent.

Each round copies a 32 MiB qcow2 source full of data, starts ``python -m fleece daemon`` with
the source as ``--blockdev disk0``, an NBD server and a writable export ``guest`` of it, then:

- **fleecing**: ``drive-backup sync=none target-id=pit0`` (a qcow2 whose backing is the
  source) exported read-only, while a guest loop (``fleece.nbd.client``) writes random ranges
  through ``guest`` and a reader reads ``pit0``;
- **full backup**: ``drive-backup sync=full`` into a new qcow2, with the same guest writes.

At a random moment (seeded, 50..700 ms after the job started) the daemon gets SIGKILL. Then
``qemu-img check`` exits 0 or 3 (leaked clusters only) for the source and the target, and a new
daemon opens both with ``--blockdev`` (the target's backing given as the source node) and lists
them in ``query-named-block-nodes``. Rounds: 4 per scenario, 50 with ``--long-drills``.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from fleece.block.qcow2 import create
from fleece.nbd.client import NBDClient
from fleece.storage import Storage
from tests.drills.support import KiB, MiB, RawQMP, fleece_daemon, pattern, run, scale

ROUNDS = scale(5, 50)
SIZE = 32 * MiB

pytestmark = pytest.mark.timeout(scale(120, 3600))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 source with data in every cluster."""
    path = tmp_path_factory.mktemp("crash") / "template.qcow2"
    create(str(path), SIZE)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "t",
                                         "file": {"driver": "file", "filename": str(path)}})
        node = storage.graph.get("t")
        node.pwrite(0, pattern(SIZE, seed=3))
        node.flush()
    return path


def blockdev(node: str, path: Path, backing: str | None = None) -> str:
    value = f"driver=qcow2,node-name={node},file.driver=file,file.filename={path}"
    return value + (f",backing={backing}" if backing else "")


class Guest(threading.Thread):
    """Writes random ranges through the writable export until the connection dies."""

    def __init__(self, sock: Path, seed: int, export: str = "guest", read: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock, self.export, self.read = sock, export, read
        self.rng = random.Random(seed)
        self.done = 0

    def run(self) -> None:
        with contextlib.suppress(OSError):
            client = NBDClient.connect_unix(str(self.sock), self.export)
            while True:
                length = self.rng.choice([4 * KiB, 64 * KiB, 192 * KiB, 1 * MiB])
                offset = self.rng.randrange(0, SIZE - length) // 512 * 512
                if self.read:
                    client.pread(offset, length)
                else:
                    client.pwrite(offset, bytes([self.rng.randrange(256)]) * length)
                self.done += 1


def check_image(path: Path) -> int:
    proc = run("qemu-img", "check", "-f", "qcow2", str(path), check=False)
    assert proc.returncode in (0, 3), f"qemu-img check {path}: {proc.returncode}\n{proc.stdout}"
    return proc.returncode


def crash_round(tmp: Path, template: Path, scenario: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    tmp.mkdir()
    src, target = tmp / "src.qcow2", tmp / "target.qcow2"
    shutil.copyfile(template, src)
    qmp, nbd = tmp / "qmp.sock", tmp / "nbd.sock"
    daemon = fleece_daemon(qmp, [
        "--blockdev", blockdev("disk0", src),
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
    ], tmp)
    guests: list[Guest] = []
    try:
        daemon.wait_socket()
        monitor = RawQMP(qmp)
        monitor.negotiate()
        guests.append(Guest(nbd, seed))
        guests[0].start()
        if scenario == "fleecing":
            monitor.ok("drive-backup", {"device": "disk0", "target": str(target),
                                        "format": "qcow2", "sync": "none",
                                        "target-id": "pit0", "job-id": "fleece"})
            monitor.ok("nbd-server-add", {"device": "pit0", "writable": False})
            guests.append(Guest(nbd, seed + 1, export="pit0", read=True))
            guests[1].start()
        else:
            monitor.ok("drive-backup", {"device": "disk0", "target": str(target),
                                        "format": "qcow2", "sync": "full", "job-id": "full"})
        time.sleep(rng.uniform(0.05, 0.7))
        daemon.kill9()
        monitor.close()
    finally:
        daemon.kill9()
    for guest in guests:
        guest.join(10)
    figures = {"guest_requests": sum(g.done for g in guests)}
    figures["src_check"] = check_image(src)
    figures["target_check"] = check_image(target) if target.exists() else -1
    # The daemon reopens both.
    (qmp.unlink() if qmp.exists() else None)
    options = ["--blockdev", blockdev("disk0", src)]
    if target.exists():
        backing = "disk0" if scenario == "fleecing" else None
        options += ["--blockdev", blockdev("pit0", target, backing)]
    again = fleece_daemon(qmp, options, tmp)
    try:
        again.wait_socket()
        monitor = RawQMP(qmp)
        monitor.negotiate()
        names = {n["node-name"] for n in monitor.ok("query-named-block-nodes")}
        assert "disk0" in names
        if target.exists():
            assert "pit0" in names
        monitor.close()
    finally:
        again.stop()
    return figures


@pytest.mark.parametrize("scenario", ["fleecing", "full-backup"])
def test_kill9_leaves_consistent_images(tmp_path: Path, template: Path, scenario: str) -> None:
    rounds: list[dict[str, int]] = []
    for i in range(ROUNDS):
        rounds.append(crash_round(tmp_path / f"round{i}", template, scenario, seed=1000 + i))
    leaks = sum(1 for r in rounds if 3 in (r["src_check"], r["target_check"]))
    requests = sum(r["guest_requests"] for r in rounds)
    print(f"\nDRILL crash {scenario}: {ROUNDS} kill -9 survived, {leaks} with leaks only, "
          f"{requests} guest requests before the kills")
    assert all(r["target_check"] != -1 for r in rounds), rounds  # every kill hit a running job
