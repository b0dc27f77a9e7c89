"""What only one command needs is imported when that command runs (issue 14, item 5).

An idle daemon (``python -m fleece daemon --qmp ...``) imports its command layer, the QMP and
NBD servers, but not numpy (about 20 MiB): the cluster bitmap and the copy-before-write planner
load their twin, and numpy with it, when the first bitmap is made. Checked in a fresh
interpreter, as the daemon starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fleece.bitmap
import fleece.cbw_plan
from fleece._impl import extensions_disabled


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return set(out.split())


def test_the_daemon_imports_no_numpy_until_a_bitmap_is_made() -> None:
    loaded = _modules_after("import fleece.daemon, fleece.storage, fleece.nbd.server")
    assert "fleece.storage" in loaded
    assert "numpy" not in loaded
    made = _modules_after("from fleece.storage import Storage\n"
                          "from fleece.bitmap import ClusterBitmap\nClusterBitmap(8)")
    # Only the pure twins use numpy; the compiled ones keep their words in arrays.
    assert ("numpy" in made) is extensions_disabled()


FLEECING = """
from fleece.block.qcow2.create import create
from fleece.storage import Storage
create({src!r}, 64 << 20)
create({pit!r}, 64 << 20, backing_file={src!r}, backing_format="qcow2")
storage = Storage()
for name, path in (("src", {src!r}), ("pit0", {pit!r})):
    options = {{"driver": "qcow2", "node-name": name,
                "file": {{"driver": "file", "filename": path}}}}
    if name == "pit0":
        options["backing"] = "src"
    storage.execute("blockdev-add", options)
storage.execute("device_add", {{"driver": "virtio-blk", "id": "vd0", "drive": "src"}})
storage.execute("block-dirty-bitmap-add", {{"node": "src", "name": "b0"}})
storage.execute("blockdev-backup", {{"device": "src", "target": "pit0", "sync": "none",
                                     "job-id": "j"}})
storage.device("vd0").pwrite(0, bytes(range(256)) * 4096)
assert storage.find_node("pit0").pread(0, 4096) == bytes(4096)
"""


def test_a_fleecing_daemon_imports_numpy_only_with_the_pure_twins(tmp_path: Path) -> None:
    """numpy costs a daemon about 15 MiB (issue 14's memory target): with the compiled twins a
    qcow2 image fleeced under a dirty bitmap, written and read, never imports it."""
    loaded = _modules_after(FLEECING.format(src=str(tmp_path / "src.qcow2"),
                                            pit=str(tmp_path / "pit.qcow2")))
    assert {"fleece.block.drivers.qcow2", "fleece.block.cbw"} <= loaded
    assert ("numpy" in loaded) is extensions_disabled()


#: what an idle daemon must not have imported: numpy and what only one command or driver needs
NOT_WHEN_IDLE = ("numpy", "numpy.ma", "fleece.block.drivers.qcow2", "fleece.block.qcow2.create",
                 "fleece.block.qcow2.bitmaps", "fleece.nbd.client", "fleece.jobs.stream")

IDLE_DAEMON = """
import os
from fleece.daemon import DaemonConfig, DaemonThread
work = {work!r}
daemon = DaemonThread(DaemonConfig(qmp=["unix:" + work + "/qmp"],
                                   nbd_server=["addr.type=unix,addr.path=" + work + "/nbd"]))
daemon.start()
assert os.path.exists(work + "/qmp")
"""


def test_an_idle_daemon_imports_what_no_command_needs_yet(tmp_path: Path) -> None:
    loaded = _modules_after(IDLE_DAEMON.format(work=str(tmp_path)))  # (its sockets go with it)
    assert "fleece.storage" in loaded and "fleece.nbd.server" in loaded
    assert sorted(loaded.intersection(NOT_WHEN_IDLE)) == []


def test_opening_a_qcow2_image_leaves_numpy_ma_out(tmp_path: Path) -> None:
    """``np.unique`` and ``np.intersect1d`` import ``numpy.ma`` (1.2 MiB); the qcow2 metadata
    checks of an open do without them."""
    image = tmp_path / "a.qcow2"
    loaded = _modules_after(
        "from fleece.block.qcow2.create import create\n"
        f"create({str(image)!r}, 1 << 30)\n"
        "from fleece.storage import Storage\n"
        f"Storage().execute('blockdev-add', {{'driver': 'qcow2', 'node-name': 'a', "
        f"'file': {{'driver': 'file', 'filename': {str(image)!r}}}}})\n")
    assert "fleece.block.drivers.qcow2" in loaded
    assert "numpy.ma" not in loaded


def test_the_lazy_names_resolve_once_and_stay() -> None:
    cls = fleece.bitmap.ClusterBitmap
    assert vars(fleece.bitmap)["ClusterBitmap"] is cls
    assert fleece.bitmap.IMPLEMENTATION in ("fast", "pure")
    assert fleece.cbw_plan.plan_runs is vars(fleece.cbw_plan)["plan_runs"]
    table = fleece.cbw_plan.RangeLockTable()
    assert table is not None
    try:
        fleece.bitmap.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchName" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
