"""The snapshot's block status after copy-before-write, fleece against qemu-storage-daemon.

The same scenario runs on both daemons, driven over QMP with raw sockets: a 64 MiB qcow2 source
that ``qemu-img``/``qemu-io`` made (iotest 222's four patterns, plus a 128 KiB range of qcow2
zero clusters written with ``write -z``), a snapshot of it, and the guest's writes (``qemu-io``
over a writable NBD export of the copy-before-write filter) over data clusters, over clusters
that read as zeroes because nothing allocates them, and over the allocated zero clusters. Then
``nbdinfo --map --json`` of the read-only snapshot export must be the same on both daemons:
QEMU copies a cluster that reads as zeroes by writing zeroes into the target, so the snapshot
keeps it a hole reading zeroes (backup tools skip it) instead of data.

Both fleecing schemes:

- **backing**: ``blockdev-add`` of a ``qemu-img create -b`` target over the source,
  ``blockdev-backup sync=none`` with ``filter-node-name``; the target is the snapshot.
- **filter**: ``copy-before-write`` over the source with a qcow2 target without backing, and
  ``snapshot-access`` over the filter; the access node is the snapshot.

The snapshot's content is checked too (``nbdcopy`` of the export equals the source before the
guest's writes), so a map that matches QEMU's cannot hide wrong data.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import DaemonProcess, RawQMP, fleece_argv
from tests.peers import PEER_ENV, require

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB

#: what the source holds at the point in time: iotest 222's patterns, and qcow2 zero clusters
BEFORE = ("write -P 0x5d 0 64k", "write -P 0xd5 1M 64k", "write -P 0xdc 32M 64k",
          "write -P 0xcd 0x3ff0000 64k", "write -z 8M 128k")
#: the guest's writes after it: iotest 222's (over data and over unallocated clusters), one over
#: the allocated zero clusters, and a sequential run over zeroes then data (0xdc at 32M)
GUEST = ("write -P 0xab 0 64k", "write -P 0xad 0x00f8000 64k", "write -P 0x1d 0x2008000 64k",
         "write -P 0xea 0x3fe0000 64k", "write -P 0x11 0x0808000 64k",
         "write -P 0x22 0x1f00000 64k", "write -P 0x22 0x1f10000 64k",
         "write -P 0x22 0x1f20000 1M")


def peer(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a peer from /usr/bin; fails the test with its output when it fails."""
    proc = subprocess.run([require(args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=PEER_ENV)
    if proc.returncode != 0 or "failed" in proc.stdout + proc.stderr:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc


def qsd_argv(qmp: Path) -> list[str]:
    return [require("qemu-storage-daemon"), "--chardev",
            f"socket,path={qmp},server=on,wait=off,id=mon0", "--monitor", "chardev=mon0"]


def uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def merged(extents: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """``(offset, length, type)`` runs, adjacent extents of one type merged (where a server
    splits its replies is not part of what it says about the image)."""
    runs: list[list[int]] = []
    for extent in extents:
        offset, length, kind = int(extent["offset"]), int(extent["length"]), int(extent["type"])
        if runs and runs[-1][2] == kind and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += length
        else:
            runs.append([offset, length, kind])
    return [(offset, length, kind) for offset, length, kind in runs]


def kind_at(runs: list[tuple[int, int, int]], at: int) -> int:
    """The NBD type (0 data, 3 hole reading zeroes, ...) of the run holding byte ``at``."""
    (kind,) = [kind for offset, length, kind in runs if offset <= at < offset + length]
    return kind


class Scenario:
    """One daemon, its source and its snapshot export."""

    def __init__(self, tmp: Path, flavour: str, scheme: str) -> None:
        self.tmp = tmp / f"{flavour}-{scheme}"
        self.tmp.mkdir()
        self.scheme = scheme
        self.src = self.tmp / "src.qcow2"
        peer("qemu-img", "create", "-f", "qcow2", str(self.src), str(SIZE))
        for command in BEFORE:
            peer("qemu-io", "-f", "qcow2", "-c", command, str(self.src))
        self.point_in_time = self.tmp / "pit.raw"
        peer("qemu-img", "convert", "-O", "raw", str(self.src), str(self.point_in_time))
        qmp = self.tmp / "qmp.sock"
        argv = qsd_argv(qmp) if flavour == "qsd" else fleece_argv("--qmp", f"unix:{qmp}")
        self.daemon = DaemonProcess(argv, qmp, self.tmp)
        self.client: RawQMP | None = None
        self.nbd = self.tmp / "nbd.sock"

    def start(self) -> None:
        self.daemon.wait_socket()
        self.client = client = RawQMP(self.daemon.qmp)
        client.negotiate()
        client.ok("blockdev-add", {"driver": "qcow2", "node-name": "src",
                                   "file": {"driver": "file", "filename": str(self.src)}})
        client.ok("nbd-server-start", {"addr": {"type": "unix",
                                                "data": {"path": str(self.nbd)}}})
        if self.scheme == "backing":
            target = self.tmp / "pit.qcow2"
            peer("qemu-img", "create", "-f", "qcow2", "-b", str(self.src), "-F", "qcow2",
                 str(target), str(SIZE))
            client.ok("blockdev-add", {"driver": "qcow2", "node-name": "pit0", "backing": "src",
                                       "file": {"driver": "file", "filename": str(target)}})
            client.ok("blockdev-backup", {"device": "src", "target": "pit0", "sync": "none",
                                          "job-id": "fleecing", "filter-node-name": "fl"})
            snapshot = "pit0"
        else:
            target = self.tmp / "tgt.qcow2"
            peer("qemu-img", "create", "-f", "qcow2", str(target), str(SIZE))
            client.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                       "file": {"driver": "file", "filename": str(target)}})
            client.ok("blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                       "file": "src", "target": "tgt"})
            client.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                       "file": "fl"})
            snapshot = "acc"
        client.ok("block-export-add", {"type": "nbd", "id": "snap", "node-name": snapshot,
                                       "name": "snap", "writable": False})
        client.ok("block-export-add", {"type": "nbd", "id": "live", "node-name": "fl",
                                       "name": "live", "writable": True})

    def guest_writes(self) -> None:
        for command in GUEST:
            peer("qemu-io", "-f", "raw", "-c", command, uri(self.nbd, "live"))

    def snapshot_map(self) -> list[tuple[int, int, int]]:
        out = peer("nbdinfo", "--map", "--json", uri(self.nbd, "snap")).stdout
        return merged(json.loads(out))

    def target_map(self) -> list[tuple[int, int, int]]:
        """The filter scheme's target, exported read-only beside the snapshot."""
        assert self.client is not None
        self.client.ok("block-export-add", {"type": "nbd", "id": "tgt", "node-name": "tgt",
                                            "name": "tgt", "writable": False})
        out = peer("nbdinfo", "--map", "--json", uri(self.nbd, "tgt")).stdout
        return merged(json.loads(out))

    def snapshot_bytes(self) -> bytes:
        out = self.tmp / "snap.raw"
        peer("nbdcopy", uri(self.nbd, "snap"), str(out))
        return out.read_bytes()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.daemon.stop()


@pytest.fixture
def scenarios(tmp_path: Path) -> Iterator[list[Scenario]]:
    made: list[Scenario] = []
    yield made
    for scenario in made:
        scenario.stop()


@pytest.mark.parametrize("scheme", ["backing", "filter"])
def test_snapshot_map_after_copy_before_write_matches_qemu(
    tmp_path: Path, scenarios: list[Scenario], scheme: str
) -> None:
    before: dict[str, list[tuple[int, int, int]]] = {}
    after: dict[str, list[tuple[int, int, int]]] = {}
    target: dict[str, list[tuple[int, int, int]]] = {}
    for flavour in ("qsd", "fleece"):
        scenario = Scenario(tmp_path, flavour, scheme)
        scenarios.append(scenario)
        scenario.start()
        before[flavour] = scenario.snapshot_map()
        scenario.guest_writes()
        after[flavour] = scenario.snapshot_map()
        assert scenario.snapshot_bytes() == scenario.point_in_time.read_bytes(), flavour
        if scheme == "filter":
            target[flavour] = scenario.target_map()
    assert before["fleece"] == before["qsd"]
    # fleece: the guest's writes do not change how the snapshot maps (zeroes stay holes)
    assert after["fleece"] == before["fleece"]
    if scheme == "backing":
        assert after["fleece"] == after["qsd"]
        # a cluster copied as zeroes (0x3fe0000: nothing allocated it) is a hole reading zeroes
        assert kind_at(after["qsd"], 0x3FE0000) == 3
    else:
        # QEMU 7.2's snapshot-access says "data" for every cluster it serves from the target,
        # even those its target holds as zero clusters: compare the targets themselves
        assert target["fleece"] == target["qsd"]
        assert kind_at(target["qsd"], 0x3FE0000) == 3
