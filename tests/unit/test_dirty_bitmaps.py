"""Dirty bitmaps and incremental backup through :class:`fleece.storage.Storage`.

What is tested (through ``Storage.execute`` and the device, as a harness drives it; images are
qcow2 made by :func:`fleece.block.qcow2.create`):

- **Recording**: device writes, write-zeroes and discards (``discard=unmap``) mark exactly the
  granules they touch (unaligned requests mark every granule they overlap); a discard ignored
  without ``discard=unmap`` and a ``pwrite(unchanged=True)`` (a stream copy-up) mark nothing;
  writes through a qcow2 node mark a bitmap on its ``file`` node as well.
- **Commands**: add (default granularity from the cluster size clamped to [4 KiB, 64 KiB];
  granularity errors; duplicate, empty and unknown names; a device name as ``node``),
  enable/disable (recording), clear, remove, merge (names, ``{node, name}``, other
  granularities, size mismatch, unknown source), each with QEMU's messages; the two-phase
  ``prepare_bitmap_*`` actions change nothing until applied and undo restores the state.
- **Queries**: ``query-block`` ``inserted.dirty-bitmaps`` and ``query-named-block-nodes``
  ``dirty-bitmaps`` with name, count (bytes), granularity, recording, busy, persistent; nodes
  without bitmaps have no such member.
- **Busy rules**: a bitmap published by an NBD export, or frozen by a backup job, is busy:
  remove, clear, enable, merge into it, merge from it, a backup using it are refused with
  QEMU's message; once the export is gone or the job ended it is usable again.
- **iotest 257's combination matrix** (sync x bitmap given x bitmap-mode) as a table: which
  combinations QEMU refuses, with its messages, and that the accepted ones start a job.
- **Incremental backup**: sync=incremental copies exactly the dirty clusters; bitmap-mode
  on-success leaves only the writes made during the job, never leaves the bitmap as it was
  (plus those writes), always on a cancelled job keeps the clusters it did not copy.
- **Persistence**: a persistent bitmap survives close and reopen with its bits, granularity and
  recording state (a non-persistent one does not); a bitmap stored while the image was open
  for writing (a crash copy) comes back inconsistent: unusable, removable; v2 images and raw
  nodes refuse persistent bitmaps; NBD block status of ``qemu:dirty-bitmap:NAME`` extents.

Run on the compiled extensions and with ``FLEECE_NO_EXTENSIONS=1``; every test is bounded
(``pytest-timeout`` 20 s; waits time out after a few seconds).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.dirty_bitmap import DirtyBitmap, find_bitmap, publish, status_extents, unpublish
from fleece.block.qcow2 import create
from fleece.errors import GenericError, QMPError
from fleece.events import Event
from fleece.jobs.backup import BackupJob
from fleece.storage import Storage

pytestmark = pytest.mark.timeout(20)

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
WAIT = 10.0


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait(self, name: str, job: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for event in self.events:
                data = event.get("data") or {}
                if event["event"] == name and data.get("device") == job:
                    return dict(data)
            return None

        with self.cond:
            self.cond.wait_for(lambda: found() is not None, WAIT)
            result = found()
        if result is None:
            pytest.fail(f"no {name} for {job} within {WAIT} s")
        return result


class Env:
    """A Storage with a qcow2 image ``disk0`` (device ``virtio0``) in ``tmp``."""

    def __init__(self, tmp: Path, *, cluster_size: int = 64 * KiB, version: int = 3,
                 image: str | None = None, **options: Any) -> None:
        self.tmp = tmp
        self.image = image or str(tmp / "disk.qcow2")
        if image is None:
            create(self.image, SIZE, cluster_size=cluster_size, version=version)
        self.options = options
        self.storage, self.events = self.open()

    def open(self) -> tuple[Storage, Events]:
        storage = Storage()
        events = Events()
        storage.subscribe(events)
        storage.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "disk0",
            "file": {"driver": "file", "filename": self.image, **self.options},
        })
        storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0",
                                       "drive": "disk0"})
        return storage, events

    def reopen(self) -> None:
        self.storage.close()
        self.storage, self.events = self.open()

    def x(self, command: str, /, **args: Any) -> Any:
        return self.storage.execute(command, {k.replace("_", "-"): v for k, v in args.items()})

    @property
    def device(self) -> Any:
        return self.storage.device("virtio0")

    def bitmap(self, name: str, node: str = "disk0") -> DirtyBitmap:
        found = find_bitmap(self.storage.graph.get(node), name)
        assert found is not None
        return found

    def dirty(self, name: str) -> list[tuple[int, int]]:
        return list(self.bitmap(name).dirty_runs())

    def info(self, name: str) -> dict[str, Any]:
        for entry in self.x("query-block")[0]["inserted"].get("dirty-bitmaps", []):
            if entry["name"] == name:
                return dict(entry)
        raise AssertionError(f"no bitmap {name}")

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def error(env: Env, command: str, /, **args: Any) -> str:
    with pytest.raises(QMPError) as info:
        env.x(command, **args)
    return str(info.value)


# -- recording -------------------------------------------------------------------------------------
def test_writes_zeroes_and_discards_mark_the_granules_they_touch(tmp_path: Path) -> None:
    e = Env(tmp_path, **{})
    e.close()
    # discard=unmap on the qcow2 node, so that guest discards reach the node
    storage = Storage()
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                     "discard": "unmap",
                                     "file": {"driver": "file", "filename": e.image}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    try:
        storage.execute("block-dirty-bitmap-add", {"node": "virtio0", "name": "b"})
        dev = storage.device("virtio0")
        dev.pwrite(100, b"x" * 10)  # inside granule 0
        dev.pwrite(64 * KiB - 1, b"yy")  # straddles granules 0 and 1
        dev.pwrite_zeroes(4 * MiB, 128 * KiB)  # granules 64, 65
        dev.pdiscard(8 * MiB, 64 * KiB)  # granule 128
        bitmap = find_bitmap(storage.graph.get("disk0"), "b")
        assert bitmap is not None
        assert list(bitmap.dirty_runs()) == [
            (0, 128 * KiB), (4 * MiB, 128 * KiB), (8 * MiB, 64 * KiB),
        ]
        info = storage.execute("query-block")[0]["inserted"]["dirty-bitmaps"]
        assert info == [{"name": "b", "recording": True, "persistent": False, "busy": False,
                         "granularity": 65536, "count": 5 * 64 * KiB}]
    finally:
        storage.close()


def test_ignored_discards_and_unchanged_writes_mark_nothing(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="b")
    env.device.pdiscard(0, MiB)  # discard=ignore (the default): nothing reaches the image
    node = env.storage.graph.get("disk0")
    node.pwrite(2 * MiB, bytes(4096), unchanged=True)  # a stream job's copy-up
    assert env.dirty("b") == []
    assert env.info("b")["count"] == 0


def test_a_bitmap_on_the_file_node_sees_the_writes_through_qcow2(env: Env) -> None:
    file_node = env.storage.graph.get("disk0").file_child()
    assert file_node is not None
    env.x("block-dirty-bitmap-add", node=file_node.name, name="f", granularity=4096)
    env.device.pwrite(3 * MiB, b"z" * 4096)
    assert env.bitmap("f", file_node.name).count() > 0
    nodes = {n["node-name"]: n for n in env.x("query-named-block-nodes")}
    assert [b["name"] for b in nodes[file_node.name]["dirty-bitmaps"]] == ["f"]
    assert "dirty-bitmaps" not in nodes["disk0"]


def test_enable_disable_clear_and_remove(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="virtio0", name="b", disabled=True)
    assert env.info("b")["recording"] is False
    env.device.pwrite(0, b"a")
    assert env.dirty("b") == []
    env.x("block-dirty-bitmap-enable", node="disk0", name="b")
    assert env.info("b")["recording"] is True
    env.device.pwrite(MiB, b"a")
    assert env.dirty("b") == [(MiB, 64 * KiB)]
    env.x("block-dirty-bitmap-disable", node="disk0", name="b")
    env.device.pwrite(2 * MiB, b"a")
    assert env.dirty("b") == [(MiB, 64 * KiB)]
    env.x("block-dirty-bitmap-clear", node="disk0", name="b")
    assert env.dirty("b") == [] and env.info("b")["count"] == 0
    env.x("block-dirty-bitmap-remove", node="disk0", name="b")
    assert "dirty-bitmaps" not in env.x("query-block")[0]["inserted"]
    assert error(env, "block-dirty-bitmap-remove", node="disk0", name="b") == (
        "Dirty bitmap 'b' not found"
    )
    env.device.pwrite(0, b"still fine")  # writes go on once the last bitmap went


def test_query_lists_newest_first(env: Env) -> None:
    for name in ("a", "b", "c"):
        env.x("block-dirty-bitmap-add", node="disk0", name=name)
    assert [b["name"] for b in env.x("query-block")[0]["inserted"]["dirty-bitmaps"]] == [
        "c", "b", "a",
    ]


# -- add errors and granularity --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cluster", "expected"),
    [(512, 4096), (4096, 4096), (16 * KiB, 16 * KiB), (64 * KiB, 64 * KiB), (2 * MiB, 64 * KiB)],
)
def test_default_granularity_follows_the_cluster_size(
    tmp_path: Path, cluster: int, expected: int
) -> None:
    e = Env(tmp_path, cluster_size=cluster)
    try:
        e.x("block-dirty-bitmap-add", node="disk0", name="b")
        assert e.info("b")["granularity"] == expected
    finally:
        e.close()


@pytest.mark.parametrize(
    ("granularity", "message"),
    [
        (0, "Granularity must be power of 2 and at least 512"),
        (256, "Granularity must be power of 2 and at least 512"),
        (1000, "Granularity must be power of 2 and at least 512"),
        (1 << 32, "Parameter 'granularity' expects uint32_t"),
    ],
)
def test_bad_granularity(env: Env, granularity: int, message: str) -> None:
    assert error(env, "block-dirty-bitmap-add", node="disk0", name="b",
                 granularity=granularity) == message


def test_granularity_rounds_writes_out_to_whole_granules(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="small", granularity=512)
    env.x("block-dirty-bitmap-add", node="disk0", name="huge", granularity=1 << 31)
    env.device.pwrite(1000, b"q" * 100)  # bytes 1000..1099: sectors 1 and 2
    assert env.dirty("small") == [(512, 1024)]
    assert env.dirty("huge") == [(0, SIZE)]  # one granule, clipped to the disk
    assert env.info("huge")["count"] == 1 << 31  # QEMU counts whole granules
    assert env.info("small")["count"] == 1024


def test_add_errors(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="b")
    assert error(env, "block-dirty-bitmap-add", node="disk0", name="b") == (
        "Bitmap already exists: b"
    )
    assert error(env, "block-dirty-bitmap-add", node="disk0", name="") == (
        "Bitmap name cannot be empty"
    )
    assert error(env, "block-dirty-bitmap-add", node="nope", name="x") == (
        "Cannot find device='nope' nor node-name='nope'"
    )
    assert error(env, "block-dirty-bitmap-add", node="disk0", name="n" * 1024).startswith(
        "Bitmap name too long"
    )
    assert error(env, "block-dirty-bitmap-clear", node="nope", name="b") == (
        "Node 'nope' not found"
    )
    assert error(env, "block-dirty-bitmap-enable", node="disk0", name="zz") == (
        "Dirty bitmap 'zz' not found"
    )


def test_persistent_refused_on_v2_and_raw(tmp_path: Path) -> None:
    e = Env(tmp_path, version=2)
    try:
        msg = error(e, "block-dirty-bitmap-add", node="disk0", name="p", persistent=True)
        assert msg == "Can't make bitmap 'p' persistent in 'disk0': Cannot store dirty bitmaps " \
                      "in qcow2 v2 files"
        e.x("block-dirty-bitmap-add", node="disk0", name="p")  # a transient one is fine
        file_node = e.storage.graph.get("disk0").file_child()
        assert file_node is not None
        msg = error(e, "block-dirty-bitmap-add", node=file_node.name, name="p",
                    persistent=True)
        assert msg == f"Can't store persistent bitmaps to {file_node.name}: Operation not " \
                      "supported"
    finally:
        e.close()


# -- merge -----------------------------------------------------------------------------------------
def test_merge_names_external_and_other_granularities(env: Env) -> None:
    file_node = env.storage.graph.get("disk0").file_child()
    assert file_node is not None
    env.x("block-dirty-bitmap-add", node="disk0", name="t", disabled=True)
    env.x("block-dirty-bitmap-add", node="disk0", name="a", granularity=4096)
    env.device.pwrite(0, b"a")
    env.x("block-dirty-bitmap-disable", node="disk0", name="a")
    env.x("block-dirty-bitmap-add", node="disk0", name="b", granularity=1 * MiB)
    env.device.pwrite(5 * MiB + 10, b"b")
    env.x("block-dirty-bitmap-merge", node="disk0", target="t", bitmaps=["a", "b"])
    assert env.dirty("t") == [(0, 64 * KiB), (5 * MiB, MiB)]
    assert env.dirty("a") == [(0, 4096)]  # sources unchanged
    # {node, name}: a bitmap of another node of the same size
    other = str(env.tmp / "other.qcow2")
    create(other, SIZE)
    env.x("blockdev-add", driver="qcow2", node_name="other",
          file={"driver": "file", "filename": other})
    env.x("block-dirty-bitmap-add", node="other", name="o")
    env.storage.graph.get("other").pwrite(12 * MiB, b"o")
    env.x("block-dirty-bitmap-merge", node="disk0", target="t",
          bitmaps=[{"node": "other", "name": "o"}])
    assert env.dirty("t")[-1] == (12 * MiB, 64 * KiB)
    # a file node is bigger than the disk: sizes differ
    env.x("block-dirty-bitmap-add", node=file_node.name, name="f")
    msg = error(env, "block-dirty-bitmap-merge", node="disk0", target="t",
                bitmaps=[{"node": file_node.name, "name": "f"}])
    assert msg.startswith("Bitmaps are of different sizes (destination size is 16777216")
    assert error(env, "block-dirty-bitmap-merge", node="disk0", target="t",
                 bitmaps=["a", "missing"]) == "Dirty bitmap 'missing' not found"
    assert error(env, "block-dirty-bitmap-merge", node="disk0", target="missing",
                 bitmaps=["a"]) == "Dirty bitmap 'missing' not found"


def test_two_phase_actions_change_nothing_until_applied_and_undo(env: Env) -> None:
    storage = env.storage
    env.x("block-dirty-bitmap-add", node="disk0", name="a")
    env.device.pwrite(0, b"a")
    add = storage.bitmap_commands.prepare_bitmap_add("disk0", "new")
    clear = storage.bitmap_commands.prepare_bitmap_clear("disk0", "a")
    disable = storage.bitmap_commands.prepare_bitmap_disable("disk0", "a")
    assert [b["name"] for b in env.x("query-block")[0]["inserted"]["dirty-bitmaps"]] == ["a"]
    assert env.dirty("a") == [(0, 64 * KiB)]
    for action in (add, clear, disable):
        action.apply()
    assert env.dirty("a") == [] and env.info("a")["recording"] is False
    assert env.info("new")["count"] == 0
    for action in (disable, clear, add):
        action.undo()
    assert env.dirty("a") == [(0, 64 * KiB)] and env.info("a")["recording"] is True
    assert [b["name"] for b in env.x("query-block")[0]["inserted"]["dirty-bitmaps"]] == ["a"]
    with pytest.raises(GenericError, match="Bitmap already exists: a"):
        storage.bitmap_commands.prepare_bitmap_add("disk0", "a")


# -- busy bitmaps ----------------------------------------------------------------------------------
BUSY = "Bitmap 'b' is currently in use by another operation and cannot be used"


def test_an_exported_bitmap_is_busy(env: Env) -> None:
    sock = str(env.tmp / "nbd.sock")
    env.x("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    env.x("block-dirty-bitmap-add", node="disk0", name="b")
    env.x("block-dirty-bitmap-add", node="disk0", name="t")
    env.device.pwrite(0, b"b")
    assert error(env, "nbd-server-add", device="virtio0", bitmap="b") == (
        "Enabled bitmap 'b' incompatible with readonly export"
    )
    assert error(env, "nbd-server-add", device="virtio0", bitmap="zz") == (
        "Bitmap 'zz' is not found"
    )
    env.x("block-dirty-bitmap-disable", node="disk0", name="b")
    env.x("nbd-server-add", device="virtio0", bitmap="b")
    assert env.info("b")["busy"] is True
    cases: list[tuple[str, dict[str, Any]]] = [
        ("block-dirty-bitmap-remove", {"name": "b"}),
        ("block-dirty-bitmap-clear", {"name": "b"}),
        ("block-dirty-bitmap-enable", {"name": "b"}),
        ("block-dirty-bitmap-merge", {"target": "b", "bitmaps": ["t"]}),
        ("block-dirty-bitmap-merge", {"target": "t", "bitmaps": ["b"]}),
    ]
    for command, args in cases:
        assert error(env, command, node="disk0", **args) == BUSY, command
    assert error(env, "drive-backup", device="virtio0", sync="incremental", bitmap="b",
                 target=str(env.tmp / "inc.qcow2"), format="qcow2") == BUSY
    assert error(env, "block-export-add", type="nbd", id="e2", node_name="disk0",
                 name="again", bitmaps=["b"]) == BUSY
    # block status of the context, as the server answers it
    node = env.storage.graph.get("disk0")
    assert status_extents(node, "b", 0, 4 * MiB, False, 100) == [(64 * KiB, 1),
                                                                (4 * MiB - 64 * KiB, 0)]
    assert status_extents(node, "b", 100, 4 * MiB, True, 100) == [(64 * KiB - 100, 1)]
    env.x("nbd-server-remove", name="virtio0")
    assert env.info("b")["busy"] is False
    env.x("block-dirty-bitmap-clear", node="disk0", name="b")


def test_status_extents_without_a_published_bitmap_is_einval(env: Env) -> None:
    node = env.storage.graph.get("disk0")
    with pytest.raises(OSError, match="no dirty bitmap 'x'"):
        status_extents(node, "x", 0, 4096, False, 10)
    bitmap = DirtyBitmap("x", SIZE, 1 * MiB)
    bitmap.mark(3 * MiB, 1)
    owner = object()
    publish(owner, node, [bitmap])
    try:
        assert status_extents(node, "x", 0, SIZE, False, 2) == [(3 * MiB, 0), (MiB, 1)]
        assert status_extents(node, "x", 2 * MiB, SIZE, False, 100) == [
            (MiB, 0), (MiB, 1), (SIZE - 4 * MiB, 0),
        ]
    finally:
        unpublish(owner)
    assert bitmap.busy is False


# -- iotest 257: the sync x bitmap x bitmap-mode matrix --------------------------------------------
MATRIX: list[tuple[str, bool, str | None, str | None]] = [
    # sync, bitmap given, bitmap-mode, expected error (None: a job starts)
    ("incremental", False, None, "must provide a valid bitmap name for 'incremental' sync mode"),
    ("incremental", False, "on-success",
     "must provide a valid bitmap name for 'incremental' sync mode"),
    ("incremental", True, None, None),
    ("incremental", True, "on-success", None),
    ("incremental", True, "never",
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ("incremental", True, "always",
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ("bitmap", False, None, "must provide a valid bitmap name for 'bitmap' sync mode"),
    ("bitmap", False, "always", "must provide a valid bitmap name for 'bitmap' sync mode"),
    ("bitmap", True, None, "Bitmap sync mode must be given when providing a bitmap"),
    ("bitmap", True, "on-success", None),
    ("bitmap", True, "never", None),
    ("bitmap", True, "always", None),
    ("full", False, None, None),
    ("full", False, "on-success", "Cannot specify bitmap sync mode without a bitmap"),
    ("full", True, None, "Bitmap sync mode must be given when providing a bitmap"),
    ("full", True, "on-success", None),
    ("full", True, "always", None),
    ("full", True, "never",
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"),
    ("top", False, "never", "Cannot specify bitmap sync mode without a bitmap"),
    ("top", True, "on-success", None),
    ("top", True, "always", None),
    ("top", True, "never",
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'top'"),
    ("none", True, None, "Bitmap sync mode must be given when providing a bitmap"),
    ("none", True, "on-success", "sync mode 'none' does not produce meaningful bitmap outputs"),
    ("none", True, "always", "sync mode 'none' does not produce meaningful bitmap outputs"),
    ("none", True, "never", "sync mode 'none' does not produce meaningful bitmap outputs"),
    ("none", False, "never", "Cannot specify bitmap sync mode without a bitmap"),
]


@pytest.mark.parametrize(("sync", "given", "mode", "expected"), MATRIX)
@pytest.mark.parametrize("command", ["drive-backup", "blockdev-backup"])
def test_iotest_257_matrix(
    env: Env, command: str, sync: str, given: bool, mode: str | None, expected: str | None
) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="bm")
    env.device.pwrite(0, b"d" * 4096)
    target = str(env.tmp / "target.qcow2")
    args: dict[str, Any] = {"device": "virtio0", "sync": sync, "job-id": "j",
                            "speed": 1}  # slow: the job is still there to look at
    if given:
        args["bitmap"] = "bm"
    if mode is not None:
        args["bitmap-mode"] = mode
    if command == "drive-backup":
        args.update(target=target, format="qcow2")
    else:
        create(target, SIZE)
        env.x("blockdev-add", driver="qcow2", node_name="tgt",
              file={"driver": "file", "filename": target})
        args["target"] = "tgt"
    if expected is not None:
        with pytest.raises(QMPError) as info:
            env.storage.execute(command, args)
        assert str(info.value) == expected
        assert env.x("query-block-jobs") == []
        assert env.info("bm")["busy"] is False
        return
    env.storage.execute(command, args)
    assert [j["device"] for j in env.x("query-block-jobs")] == ["j"]
    assert env.info("bm")["busy"] is given
    env.x("block-job-cancel", device="j", force=True)
    env.events.wait("BLOCK_JOB_CANCELLED", "j")
    assert env.info("bm")["busy"] is False
    if mode != "always":  # a cancelled job gives every bit back (always: see below)
        assert env.dirty("bm") == [(0, 64 * KiB)]


# -- incremental backup and bitmap modes -----------------------------------------------------------
def run_backup(env: Env, job: str, **args: Any) -> dict[str, Any]:
    env.x("drive-backup", device="virtio0", job_id=job, format="qcow2", **args)
    return env.events.wait("BLOCK_JOB_COMPLETED", job)


def allocated_clusters(path: str) -> list[int]:
    from fleece.storage import Storage as S

    s = S()
    try:
        s.execute("blockdev-add", {"driver": "qcow2", "node-name": "n", "read-only": True,
                                   "file": {"driver": "file", "filename": path}})
        node = s.graph.get("n")
        out: list[int] = []
        for status in node.extents(0, node.size, above=False):
            if status.allocated:
                out += range(status.offset // (64 * KiB),
                             (status.offset + status.length) // (64 * KiB))
        return out
    finally:
        s.close()


def test_incremental_copies_exactly_the_dirty_clusters_and_on_success_clears(env: Env) -> None:
    dev = env.device
    dev.pwrite(0, b"\x01" * (4 * MiB))
    env.x("block-dirty-bitmap-add", node="virtio0", name="b")
    dev.pwrite(MiB + 5, b"\x02" * 3)
    dev.pwrite_zeroes(2 * MiB, 128 * KiB)  # zeroes are dirty too: the increment must hold them
    dev.pwrite(15 * MiB, b"\x03" * (64 * KiB + 1))
    inc = str(env.tmp / "inc.qcow2")
    done = run_backup(env, "i", sync="incremental", bitmap="b", target=inc)
    assert "error" not in done
    expected = [16, 32, 33, 240, 241]
    assert allocated_clusters(inc) == expected
    assert env.dirty("b") == []
    assert env.info("b") == {"name": "b", "recording": True, "persistent": False,
                             "busy": False, "granularity": 65536, "count": 0}


def test_writes_during_the_job_stay_dirty(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="virtio0", name="b")
    env.device.pwrite(0, b"x" * (2 * MiB))
    env.x("drive-backup", device="virtio0", job_id="i", sync="incremental", bitmap="b",
          target=str(env.tmp / "inc.qcow2"), format="qcow2", speed=64 * KiB)
    assert env.info("b")["busy"] is True and env.info("b")["recording"] is True
    env.device.pwrite(8 * MiB, b"during")
    env.x("block-job-set-speed", device="i", speed=0)
    env.events.wait("BLOCK_JOB_COMPLETED", "i")
    assert env.dirty("b") == [(8 * MiB, 64 * KiB)]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # cancelled: on-success keeps everything (frozen bits + writes during the job)
        ("on-success", [(0, 2 * MiB), (8 * MiB, 64 * KiB)]),
        ("never", [(0, 2 * MiB), (8 * MiB, 64 * KiB)]),
        # always: the writes during the job plus what was left uncopied (the copied first
        # cluster is gone)
        ("always", [(64 * KiB, 2 * MiB - 64 * KiB), (8 * MiB, 64 * KiB)]),
    ],
)
def test_bitmap_modes_on_a_cancelled_job(
    env: Env, mode: str, expected: list[tuple[int, int]]
) -> None:
    env.x("block-dirty-bitmap-add", node="virtio0", name="b")
    env.device.pwrite(0, b"x" * (2 * MiB))
    env.x("drive-backup", device="virtio0", job_id="j", sync="bitmap", bitmap="b",
          bitmap_mode=mode, target=str(env.tmp / "t.qcow2"), format="qcow2", speed=64 * KiB)
    job = env.storage.jobs["j"]
    assert isinstance(job, BackupJob)
    deadline = time.monotonic() + WAIT
    while job.cbw.copied_clusters < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.cbw.copied_clusters == 1  # the first chunk, then the throttle sleeps
    env.device.pwrite(8 * MiB, b"during")
    env.x("block-job-cancel", device="j", force=True)
    env.events.wait("BLOCK_JOB_CANCELLED", "j")
    assert env.dirty("b") == expected
    assert env.info("b")["busy"] is False and env.info("b")["recording"] is True


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("on-success", [(8 * MiB, 64 * KiB)]), ("always", [(8 * MiB, 64 * KiB)]),
     ("never", [(0, 2 * MiB), (8 * MiB, 64 * KiB)])],
)
def test_bitmap_modes_on_success(env: Env, mode: str, expected: list[tuple[int, int]]) -> None:
    env.x("block-dirty-bitmap-add", node="virtio0", name="b")
    env.device.pwrite(0, b"x" * (2 * MiB))
    env.x("drive-backup", device="virtio0", job_id="j", sync="bitmap", bitmap="b",
          bitmap_mode=mode, target=str(env.tmp / "t.qcow2"), format="qcow2", speed=64 * KiB)
    env.device.pwrite(8 * MiB, b"during")
    env.x("block-job-set-speed", device="j", speed=0)
    assert "error" not in env.events.wait("BLOCK_JOB_COMPLETED", "j")
    assert env.dirty("b") == expected


def test_full_backup_with_on_success_clears_the_bitmap(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="virtio0", name="b")
    env.device.pwrite(3 * MiB, b"x")
    run_backup(env, "f", sync="full", bitmap="b", bitmap_mode="on-success",
               target=str(env.tmp / "full.qcow2"))
    assert env.dirty("b") == []


# -- persistence -----------------------------------------------------------------------------------
def test_persistent_bitmaps_survive_close_and_reopen(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="p", persistent=True)
    env.x("block-dirty-bitmap-add", node="disk0", name="q", persistent=True, disabled=True,
          granularity=512 * KiB)
    env.x("block-dirty-bitmap-add", node="disk0", name="t")  # transient
    env.device.pwrite(5 * MiB, b"y" * (3 * MiB))
    env.x("block-dirty-bitmap-merge", node="disk0", target="q", bitmaps=["p"])
    env.device.pwrite(15 * MiB, b"z")
    before = {name: env.dirty(name) for name in ("p", "q")}
    env.reopen()
    names = [b["name"] for b in env.x("query-block")[0]["inserted"]["dirty-bitmaps"]]
    assert sorted(names) == ["p", "q"]
    assert {name: env.dirty(name) for name in ("p", "q")} == before
    assert env.info("p") == {"name": "p", "recording": True, "persistent": True,
                             "busy": False, "granularity": 65536,
                             "count": 3 * MiB + 64 * KiB}
    assert env.info("q")["recording"] is False and env.info("q")["granularity"] == 512 * KiB
    env.device.pwrite(0, b"after reopen")  # still recording
    assert env.dirty("p")[0] == (0, 64 * KiB)
    # removing a persistent bitmap removes it from the image at the next close
    env.x("block-dirty-bitmap-remove", node="disk0", name="q")
    env.reopen()
    assert [b["name"] for b in env.x("query-block")[0]["inserted"]["dirty-bitmaps"]] == ["p"]
    env.x("block-dirty-bitmap-remove", node="disk0", name="p")
    env.reopen()
    assert "dirty-bitmaps" not in env.x("query-block")[0]["inserted"]


def test_a_bitmap_left_in_use_by_a_crash_is_inconsistent(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="p", persistent=True)
    env.device.pwrite(0, b"x")
    env.reopen()  # stored, then flagged in use by this writable open
    crash = str(env.tmp / "crash.qcow2")
    shutil.copyfile(env.image, crash)  # what a kill -9 now would leave
    env.close()
    e = Env(env.tmp, image=crash)
    try:
        info = e.info("p")
        assert info["inconsistent"] is True and info["recording"] is False
        message = ("Bitmap 'p' is inconsistent and cannot be used (try "
                   "block-dirty-bitmap-remove to delete this bitmap from disk)")
        assert error(e, "block-dirty-bitmap-clear", node="disk0", name="p") == message
        assert error(e, "drive-backup", device="virtio0", sync="incremental", bitmap="p",
                     target=str(e.tmp / "i.qcow2"), format="qcow2") == message
        e.reopen()  # an inconsistent bitmap stays inconsistent
        assert e.info("p")["inconsistent"] is True
        e.x("block-dirty-bitmap-remove", node="disk0", name="p")
        e.reopen()
        assert "dirty-bitmaps" not in e.x("query-block")[0]["inserted"]
    finally:
        e.close()
    env.storage, env.events = env.open()  # the fixture closes it


def test_read_only_node_loads_read_only_bitmaps(env: Env) -> None:
    env.x("block-dirty-bitmap-add", node="disk0", name="p", persistent=True)
    env.device.pwrite(0, b"x")
    env.close()
    storage = Storage()
    try:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                                         "file": {"driver": "file", "filename": env.image}})
        bitmap = find_bitmap(storage.graph.get("ro"), "p")
        assert bitmap is not None and bitmap.readonly
        assert list(bitmap.dirty_runs()) == [(0, 64 * KiB)]
        with pytest.raises(QMPError, match="Bitmap 'p' is readonly and cannot be modified"):
            storage.execute("block-dirty-bitmap-clear", {"node": "ro", "name": "p"})
    finally:
        storage.close()
    env.storage, env.events = env.open()
