"""The block graph's refcounted lifetime, permissions, command errors and backing chains.

What is tested, through :class:`fleece.storage.Storage` the way a QMP client drives it:

- **Every kind of user holds a reference**: the monitor (``blockdev-add`` / ``blockdev-del``), a
  device (``device_add`` / ``device_del``, i.e. hot unplug with QEMU's ``DEVICE_DELETED`` event),
  a parent's child link (an inline ``file`` child closes with its parent; a node named as the
  ``file`` of another survives that parent), and a job or export user (``add_user``).
  ``blockdev-del`` of a node anyone but the monitor uses fails with ``GenericError``
  ``Node 'x' is busy: <user>`` and the node stays. The last release closes the node: it leaves
  ``query-named-block-nodes``, its ``on_close`` callbacks run, and its image file stays on disk.
- **Names**: automatic node names start with ``#block`` and are unique; a duplicate node name is
  refused without disturbing the node that has it; a failed open leaves nothing behind.
- **Permissions** are checked when a link or user is made: two writable devices on one node
  conflict unless both set ``share-rw``; read-only nodes refuse writers; two writable parents
  cannot share a ``file`` node.
- :meth:`Storage.close` closes every node, whoever holds it.
- :meth:`Storage.execute` error classes: ``CommandNotFound``, ``GenericError`` naming the bad
  argument, ``DeviceNotFound``.
- :func:`fleece.block.chain.drop_intermediate`: relinking, and the dropped middle node closing
  unless still referenced (raw nodes linked with ``attach_child(..., ChildRole.BACKING)``; the
  header rewrite is stubbed because raw has no backing file; real qcow2 chains when that driver
  exists), plus its error paths.
- :meth:`BlockNode.block_status_above` over a chain of in-memory test nodes.
"""

from __future__ import annotations

import importlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from fleece.block.chain import backing_chain, drop_intermediate
from fleece.block.driver import BlockStatus, Driver, Status
from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import ChildRole, Perm
from fleece.errors import CommandNotFound, DeviceNotFound, GenericError, QMPError
from fleece.events import Event
from fleece.storage import Storage

MiB = 1 << 20



def _qcow2_create() -> Callable[..., None] | None:
    """fleece's qcow2 ``create(path, size, ...)``, or None while there is no qcow2 driver."""
    for module_name in ("fleece.block.drivers.qcow2", "fleece.block.qcow2.create"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        create = getattr(module, "create", None)
        if callable(create):
            return cast("Callable[..., None]", create)
    return None


def _qcow2_rewrites_backing() -> bool:
    """The qcow2 driver implements ``change_backing_file`` (drop_intermediate needs it)."""
    try:
        from fleece.block.drivers.qcow2 import Qcow2Driver
    except ImportError:
        return False
    return Qcow2Driver.change_backing_file is not Driver.change_backing_file


QCOW2_CREATE = _qcow2_create()
QCOW2_DROP = QCOW2_CREATE is not None and _qcow2_rewrites_backing()


# -- helpers -----------------------------------------------------------------------------------
def make_image(directory: Path, name: str, size: int = MiB, fill: bytes = b"") -> str:
    """A raw image file of ``size`` bytes starting with ``fill``; returns its path."""
    path = directory / name
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return str(path)


def raw_options(name: str | None, path_or_ref: str, *, ref: bool = False, **extra: Any) -> dict[
    str, Any
]:
    """``blockdev-add`` options of a raw node over a file (inline) or over a named node."""
    options: dict[str, Any] = {
        "driver": "raw",
        "file": path_or_ref if ref else {"driver": "file", "filename": path_or_ref},
        **extra,
    }
    if name is not None:
        options["node-name"] = name
    return options


def node_names(storage: Storage) -> set[str]:
    return {info["node-name"] for info in storage.execute("query-named-block-nodes")}


def closed_log(node: BlockNode) -> list[str]:
    """A list that receives the node's name when its ``on_close`` callbacks run."""
    log: list[str] = []
    node.on_close.append(lambda n: log.append(n.name))
    return log


def get(storage: Storage, name: str) -> BlockNode:
    node = storage.graph.find(name)
    assert node is not None, f"node {name!r} is not in the graph"
    return node


@pytest.fixture
def storage() -> Iterator[Storage]:
    s = Storage()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def events(storage: Storage) -> list[Event]:
    received: list[Event] = []
    storage.subscribe(received.append)
    return received


@pytest.fixture
def image(tmp_path: Path) -> str:
    return make_image(tmp_path, "disk.img", MiB, b"fleece" * 100)


# -- the monitor's reference -------------------------------------------------------------------
def test_blockdev_add_gives_monitor_reference_and_file_child_link(
    storage: Storage, image: str
) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    file = disk.file_child()
    assert file is not None
    assert [u.kind for u in disk.users] == [UserKind.MONITOR]
    assert disk.refcount == 1
    assert [u.kind for u in file.users] == [UserKind.CHILD]
    assert file.users[0].description == "used as file of 'disk0'"
    assert file.auto_named and file.name.startswith("#block")
    assert file.parents() == [disk]
    assert node_names(storage) == {"disk0", file.name}


def test_query_named_block_nodes_describes_each_node(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image, **{"read-only": True}))
    storage.execute("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 4096})
    infos = {i["node-name"]: i for i in storage.execute("query-named-block-nodes", {"flat": True})}
    file = get(storage, "disk0").file_child()
    assert file is not None
    assert set(infos) == {"disk0", file.name, "null0"}
    disk = infos["disk0"]
    assert (disk["drv"], disk["file"], disk["ro"], disk["backing_file_depth"]) == (
        "raw", image, True, 0
    )
    assert disk["image"]["virtual-size"] == MiB
    assert disk["image"]["format"] == "raw"
    assert infos[file.name]["drv"] == "file" and infos[file.name]["ro"] is True
    assert infos["null0"]["image"]["virtual-size"] == 4096
    assert infos["null0"]["file"] == "null-co://"


def test_blockdev_del_closes_node_and_inline_child_and_keeps_image(
    storage: Storage, image: str
) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    disk.pwrite(4096, b"\xaa" * 512)
    file = disk.file_child()
    assert file is not None
    closed = closed_log(disk)
    file_closed = closed_log(file)

    assert storage.execute("blockdev-del", {"node-name": "disk0"}) == {}

    assert closed == ["disk0"] and file_closed == [file.name]
    assert disk.closed and file.closed
    assert node_names(storage) == set()
    assert storage.graph.find("disk0") is None
    # the image file stays on disk with what was written
    with open(image, "rb") as f:
        data = f.read()
    assert len(data) == MiB
    assert data[:600] == b"fleece" * 100
    assert data[4096:4608] == b"\xaa" * 512
    # and a closed node refuses I/O and new users
    with pytest.raises(OSError):
        disk.pread(0, 512)
    with pytest.raises(GenericError, match="closed"):
        disk.add_user(UserKind.JOB, "used by job 'late'")


def test_blockdev_del_unknown_node(storage: Storage) -> None:
    with pytest.raises(GenericError, match="nosuch"):
        storage.execute("blockdev-del", {"node-name": "nosuch"})


def test_blockdev_del_of_auto_named_child_is_refused(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    file = get(storage, "disk0").file_child()
    assert file is not None
    with pytest.raises(GenericError, match="not owned by the monitor"):
        storage.execute("blockdev-del", {"node-name": file.name})
    assert not file.closed
    assert file.name in node_names(storage)


def test_blockdev_add_requires_node_name_for_root(storage: Storage, image: str) -> None:
    with pytest.raises(GenericError, match="node-name"):
        storage.execute("blockdev-add", raw_options(None, image))
    assert node_names(storage) == set()


def test_auto_names_start_with_block_and_are_unique(storage: Storage, tmp_path: Path) -> None:
    for i in range(5):
        path = make_image(tmp_path, f"d{i}.img")
        storage.execute("blockdev-add", raw_options(f"disk{i}", path))
    auto = [n for n in storage.graph.nodes() if n.auto_named]
    assert len(auto) == 5
    assert all(n.name.startswith("#block") for n in auto)
    assert len({n.name for n in auto}) == 5
    # a user cannot pick a name from the automatic namespace
    with pytest.raises(GenericError, match="node-name"):
        storage.execute("blockdev-add", raw_options("#block999", make_image(tmp_path, "x.img")))


def test_duplicate_node_name_is_refused_and_first_node_untouched(
    storage: Storage, image: str, tmp_path: Path
) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    before = node_names(storage)
    other = make_image(tmp_path, "other.img")
    with pytest.raises(GenericError, match="disk0"):
        storage.execute("blockdev-add", raw_options("disk0", other))
    assert node_names(storage) == before
    disk = get(storage, "disk0")
    assert disk.refcount == 1 and not disk.closed
    assert disk.driver.filename() == image
    assert disk.pread(0, 6) == b"fleece"


def test_duplicate_name_inside_one_blockdev_add_leaves_nothing(
    storage: Storage, image: str
) -> None:
    options = raw_options("same", image)
    options["file"]["node-name"] = "same"
    with pytest.raises(GenericError, match="same"):
        storage.execute("blockdev-add", options)
    assert node_names(storage) == set()


def test_node_cannot_be_its_own_file(storage: Storage) -> None:
    with pytest.raises(GenericError, match="own"):
        storage.execute("blockdev-add", raw_options("loop", "loop", ref=True))
    assert node_names(storage) == set()


def test_failed_open_releases_reference_on_named_child(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "small.img", 4096)
    storage.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": path})
    f = get(storage, "f")
    with pytest.raises(GenericError, match="offset"):
        storage.execute("blockdev-add", raw_options("r", "f", ref=True, offset=8192))
    assert node_names(storage) == {"f"}
    assert [u.kind for u in f.users] == [UserKind.MONITOR]
    assert f.parents() == []


def test_failed_open_closes_inline_child(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "small.img", 4096)
    with pytest.raises(GenericError, match="size"):
        storage.execute("blockdev-add", raw_options("r", path, size=8192))
    assert node_names(storage) == set()
    assert os.path.getsize(path) == 4096


# -- devices -----------------------------------------------------------------------------------
def test_device_reference_and_hot_unplug(
    storage: Storage, image: str, events: list[Event]
) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    assert disk.refcount == 2
    assert {u.kind for u in disk.users} == {UserKind.MONITOR, UserKind.DEVICE}
    device = storage.device("virtio0")
    assert device.node is disk

    with pytest.raises(GenericError) as info:
        storage.execute("blockdev-del", {"node-name": "disk0"})
    assert str(info.value) == "Node 'disk0' is busy: attached to device 'virtio0'"
    assert info.value.qmp_class == "GenericError"
    assert not disk.closed and "disk0" in node_names(storage)
    device.pwrite(0, b"still works")
    assert device.pread(0, 11) == b"still works"

    [block] = storage.execute("query-block")
    assert block["device"] == "virtio0"
    assert block["inserted"]["node-name"] == "disk0"

    assert events == []
    assert storage.execute("device_del", {"id": "virtio0"}) == {}
    assert [e["event"] for e in events] == ["DEVICE_DELETED"]
    assert events[0]["data"] == {"device": "virtio0", "path": "/machine/peripheral/virtio0"}
    assert set(events[0]["timestamp"]) == {"seconds", "microseconds"}
    with pytest.raises(DeviceNotFound):
        storage.device("virtio0")
    assert storage.execute("query-block") == []

    # the monitor still holds the node; now blockdev-del closes it
    assert not disk.closed and disk.refcount == 1
    closed = closed_log(disk)
    storage.execute("blockdev-del", {"node-name": "disk0"})
    assert closed == ["disk0"] and node_names(storage) == set()


def test_device_add_errors(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    with pytest.raises(GenericError, match="nosuch"):
        storage.execute("device_add", {"driver": "virtio-blk", "id": "v0", "drive": "nosuch"})
    with pytest.raises(GenericError, match="bogus-model"):
        storage.execute("device_add", {"driver": "bogus-model", "id": "v0", "drive": "disk0"})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "v0", "drive": "disk0"})
    with pytest.raises(GenericError, match="v0"):
        storage.execute(
            "device_add", {"driver": "virtio-blk", "id": "v0", "drive": "disk0", "share-rw": True}
        )
    assert get(storage, "disk0").refcount == 2


@pytest.mark.parametrize(
    ("first_shares", "second_shares", "allowed"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_two_writable_devices_need_share_rw(
    storage: Storage, image: str, first_shares: bool, second_shares: bool, allowed: bool
) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    storage.execute(
        "device_add",
        {"driver": "virtio-blk", "id": "v0", "drive": "disk0", "share-rw": first_shares},
    )
    second = {"driver": "virtio-blk", "id": "v1", "drive": "disk0", "share-rw": second_shares}
    if not allowed:
        with pytest.raises(GenericError, match="write") as info:
            storage.execute("device_add", second)
        assert "v0" in str(info.value)
        with pytest.raises(DeviceNotFound):
            storage.device("v1")
        assert disk.refcount == 2
        return
    storage.execute("device_add", second)
    assert disk.refcount == 3
    storage.device("v0").pwrite(0, b"zero")
    storage.device("v1").pwrite(512, b"one!")
    assert storage.device("v0").pread(512, 4) == b"one!"
    assert storage.device("v1").pread(0, 4) == b"zero"


def test_read_only_node_refuses_writers(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", raw_options("ro", image, **{"read-only": True}))
    node = get(storage, "ro")
    # a device on a read-only node is a read-only device
    storage.execute("device_add", {"driver": "virtio-blk", "id": "v0", "drive": "ro"})
    device = storage.device("v0")
    assert device.read_only
    assert device.pread(0, 6) == b"fleece"
    with pytest.raises(OSError) as err:
        device.pwrite(0, b"x")
    assert err.value.errno == 30  # EROFS
    # a user that wants to write is refused when it is made
    with pytest.raises(GenericError, match="read-only"):
        node.add_user(UserKind.JOB, "used by job 'j'", Perm.CONSISTENT_READ | Perm.WRITE)
    assert node.refcount == 2


def test_writable_parent_refused_on_read_only_file_node(storage: Storage, image: str) -> None:
    storage.execute(
        "blockdev-add", {"driver": "file", "node-name": "f", "filename": image, "read-only": True}
    )
    with pytest.raises(GenericError, match="read-only"):
        storage.execute("blockdev-add", raw_options("r", "f", ref=True))
    assert node_names(storage) == {"f"}
    # a read-only parent is fine
    storage.execute("blockdev-add", raw_options("r", "f", ref=True, **{"read-only": True}))
    assert get(storage, "f").refcount == 2


def test_two_writable_parents_conflict_on_shared_file(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": image})
    storage.execute("blockdev-add", raw_options("r1", "f", ref=True))
    with pytest.raises(GenericError) as info:
        storage.execute("blockdev-add", raw_options("r2", "f", ref=True))
    assert info.value.desc == (  # QEMU's words
        "Permission conflict on node 'f': permissions 'write' are both required by node 'r1' "
        "(uses node 'f' as 'file' child) and unshared by node 'r2' (uses node 'f' as 'file' "
        "child).")
    assert node_names(storage) == {"f", "r1"}
    assert get(storage, "f").refcount == 2


# -- child links -------------------------------------------------------------------------------
def test_named_file_node_survives_its_parent(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": image})
    storage.execute("blockdev-add", raw_options("r", "f", ref=True))
    f, r = get(storage, "f"), get(storage, "r")
    assert r.file_child() is f
    assert f.refcount == 2

    with pytest.raises(GenericError) as info:
        storage.execute("blockdev-del", {"node-name": "f"})
    assert str(info.value) == "Node 'f' is busy: used as file of 'r'"
    assert not f.closed

    f_closed = closed_log(f)
    storage.execute("blockdev-del", {"node-name": "r"})
    assert r.closed and not f.closed and f_closed == []
    assert node_names(storage) == {"f"}
    assert [u.kind for u in f.users] == [UserKind.MONITOR]
    assert f.pread(0, 6) == b"fleece"

    storage.execute("blockdev-del", {"node-name": "f"})
    assert f.closed and f_closed == ["f"]
    assert node_names(storage) == set()
    assert os.path.exists(image)


# -- jobs and exports --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "description"),
    [(UserKind.JOB, "used by job 'backup0'"), (UserKind.EXPORT, "exported as 'pit0' over NBD")],
)
def test_job_or_export_user_blocks_blockdev_del(
    storage: Storage, image: str, kind: UserKind, description: str
) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    user = disk.add_user(kind, description, Perm.CONSISTENT_READ)
    assert disk.busy_users() == [user]

    with pytest.raises(GenericError) as info:
        storage.execute("blockdev-del", {"node-name": "disk0"})
    assert str(info.value) == f"Node 'disk0' is busy: {description}"
    assert not disk.closed and "disk0" in node_names(storage)
    assert disk.monitor_user() is not None  # the refused blockdev-del dropped nothing

    closed = closed_log(disk)
    user.release()
    assert not disk.closed and closed == [] and disk.refcount == 1
    storage.execute("blockdev-del", {"node-name": "disk0"})
    assert closed == ["disk0"]


@pytest.mark.parametrize("kind", [UserKind.JOB, UserKind.EXPORT, UserKind.DEVICE])
def test_last_release_closes_whoever_it_is(storage: Storage, image: str, kind: UserKind) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    user = disk.add_user(kind, f"held by a {kind.value}")
    monitor = disk.monitor_user()
    assert monitor is not None
    closed = closed_log(disk)

    monitor.release()  # e.g. the monitor let go first; the other user keeps the node alive
    assert not disk.closed and disk.refcount == 1
    assert "disk0" in node_names(storage)
    assert disk.pread(0, 6) == b"fleece"

    user.release()
    assert disk.closed and closed == ["disk0"]
    assert node_names(storage) == set()
    assert os.path.exists(image)


def test_release_is_idempotent(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    users: list[NodeUser] = [disk.add_user(UserKind.JOB, f"job {i}") for i in range(3)]
    assert disk.refcount == 4
    users[0].release()
    users[0].release()
    assert disk.refcount == 3 and not disk.closed
    for user in users[1:]:
        user.release()
    assert disk.refcount == 1 and not disk.closed


def test_add_user_racing_last_release_never_gets_a_closed_node(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.execute("blockdev-add", {"driver": "null-co", "node-name": "n"})
    node = get(storage, "n")
    closing, proceed = threading.Event(), threading.Event()
    real_close = node.close

    def slow_close() -> None:  # widen the window between "last user gone" and "closed"
        closing.set()
        proceed.wait(5)
        real_close()

    monkeypatch.setattr(node, "close", slow_close)
    deleter = threading.Thread(
        target=storage.execute, args=("blockdev-del", {"node-name": "n"}), daemon=True
    )
    deleter.start()
    assert closing.wait(5)
    try:
        user: NodeUser | None = node.add_user(UserKind.EXPORT, "exported as 'e0'")
    except GenericError:
        user = None  # refusing is correct: the node is going away
    finally:
        proceed.set()
        deleter.join(5)
    if user is not None:
        assert not node.closed, "add_user succeeded but the node closed under its new user"


def test_on_close_callbacks_run_once_in_order(storage: Storage, image: str) -> None:
    storage.execute("blockdev-add", raw_options("disk0", image))
    disk = get(storage, "disk0")
    calls: list[tuple[str, BlockNode]] = []
    disk.on_close.append(lambda n: calls.append(("first", n)))
    disk.on_close.append(lambda n: calls.append(("second", n)))
    storage.execute("blockdev-del", {"node-name": "disk0"})
    disk.close()  # closing again does nothing
    assert calls == [("first", disk), ("second", disk)]


# -- Storage.close -----------------------------------------------------------------------------
def test_storage_close_closes_everything(tmp_path: Path) -> None:
    storage = Storage()
    paths = [make_image(tmp_path, f"d{i}.img") for i in range(3)]
    storage.execute("blockdev-add", raw_options("d0", paths[0]))
    storage.execute("blockdev-add", {"driver": "file", "node-name": "f1", "filename": paths[1]})
    storage.execute("blockdev-add", raw_options("d1", "f1", ref=True))
    storage.execute("blockdev-add", raw_options("d2", paths[2]))
    storage.execute("blockdev-add", {"driver": "null-co", "node-name": "null0"})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "v0", "drive": "d0"})
    get(storage, "d2").add_user(UserKind.JOB, "used by job 'forgotten'")
    get(storage, "null0").add_user(UserKind.EXPORT, "exported as 'e0'")
    nodes = storage.graph.nodes()
    assert len(nodes) == 7
    closed: list[str] = []
    for node in nodes:
        node.on_close.append(lambda n: closed.append(n.name))

    storage.close()

    assert all(node.closed for node in nodes)
    assert sorted(closed) == sorted(node.name for node in nodes)
    assert storage.graph.nodes() == []
    assert storage.devices == {}
    assert all(os.path.exists(p) for p in paths)
    with pytest.raises(GenericError, match="shutting down"):
        storage.execute("query-named-block-nodes")
    storage.close()  # idempotent
    with Storage() as other:
        other.execute("blockdev-add", raw_options("again", paths[0]))
    assert other.graph.nodes() == []


def test_storage_close_closes_parents_before_their_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage()
    path = make_image(tmp_path, "disk.img")
    storage.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": path})
    storage.execute("blockdev-add", raw_options("r", "f", ref=True))
    r, f = get(storage, "r"), get(storage, "f")
    r.add_user(UserKind.JOB, "used by job 'still-running'")
    file_open_when_parent_closed: list[bool] = []
    real_close = r.driver.close

    def close() -> None:  # a format would write its header / flush its caches here
        file_open_when_parent_closed.append(not f.closed)
        real_close()

    monkeypatch.setattr(r.driver, "close", close)
    storage.close()
    assert r.closed and f.closed
    assert file_open_when_parent_closed == [True]


# -- command errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "arguments", "error", "needle"),
    [
        ("no-such-command", {}, CommandNotFound, "no-such-command"),
        ("blockdev-del", {}, GenericError, "'node-name'"),
        ("blockdev-del", {"node-name": 7}, GenericError, "'node-name'"),
        ("blockdev-del", {"node-name": "x", "force": True}, GenericError, "'force'"),
        ("query-named-block-nodes", {"flat": "yes"}, GenericError, "'flat'"),
        ("device_add", {"driver": "virtio-blk", "id": 3}, GenericError, "'id'"),
        ("device_add", {"driver": "virtio-blk", "id": "v", "share-rw": 1}, GenericError,
         "'share-rw'"),
        ("device_del", {}, GenericError, "'id'"),
        ("device_del", {"id": "ghost"}, DeviceNotFound, "ghost"),
        ("blockdev-add", {"driver": "no-such-driver", "node-name": "n"}, GenericError,
         "'driver'"),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "bogus": 1}, GenericError,
         "'bogus'"),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": "big"}, GenericError,
         "'size'"),
    ],
)
def test_execute_error_classes(
    storage: Storage, command: str, arguments: dict[str, Any], error: type[QMPError], needle: str
) -> None:
    with pytest.raises(QMPError) as info:
        storage.execute(command, arguments)
    assert type(info.value) is error
    assert info.value.qmp_class == error.__name__
    assert needle in info.value.desc
    assert node_names(storage) == set()


def test_execute_refuses_non_object_arguments(storage: Storage) -> None:
    with pytest.raises(GenericError, match="arguments"):
        storage.execute("query-block", ["not", "an", "object"])  # type: ignore[call-overload]


def test_storage_device_not_found(storage: Storage) -> None:
    with pytest.raises(DeviceNotFound, match="virtio9") as info:
        storage.device("virtio9")
    assert info.value.qmp_class == "DeviceNotFound"


# -- drop_intermediate -------------------------------------------------------------------------
class BackingChain:
    """``top -> mid -> base`` of raw nodes linked with ``attach_child(..., BACKING)``."""

    def __init__(self, storage: Storage, tmp_path: Path, *, mid_named: bool) -> None:
        self.paths = {n: make_image(tmp_path, f"{n}.img") for n in ("top", "mid", "base")}
        storage.execute("blockdev-add", raw_options("base", self.paths["base"]))
        storage.execute("blockdev-add", raw_options("top", self.paths["top"]))
        self.top, self.base = get(storage, "top"), get(storage, "base")
        if mid_named:  # the monitor holds the middle node too
            storage.execute("blockdev-add", raw_options("mid", self.paths["mid"]))
            self.mid = get(storage, "mid")
            self.top.attach_child("backing", self.mid, ChildRole.BACKING)
        else:  # only top's backing link holds it
            self.mid = storage.graph.open_child(
                self.top,
                "backing",
                {"driver": "raw", "file": {"driver": "file", "filename": self.paths["mid"]}},
                ChildRole.BACKING,
            )
        self.mid.attach_child("backing", self.base, ChildRole.BACKING)
        self.rewrites: list[tuple[str | None, str | None]] = []

    def stub_header_rewrite(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Record the header rewrite raw cannot do, so the graph logic can be tested alone."""

        def change_backing_file(filename: str | None, fmt: str | None) -> None:
            self.rewrites.append((filename, fmt))

        monkeypatch.setattr(self.top.driver, "change_backing_file", change_backing_file)


def test_backing_links_hold_references(storage: Storage, tmp_path: Path) -> None:
    chain = BackingChain(storage, tmp_path, mid_named=False)
    assert backing_chain(chain.top) == [chain.top, chain.mid, chain.base]
    assert chain.mid.auto_named
    assert [u.description for u in chain.mid.users] == ["used as backing of 'top'"]
    with pytest.raises(GenericError, match="Node 'base' is busy: used as backing of "):
        storage.execute("blockdev-del", {"node-name": "base"})
    # deleting the top closes the whole chain the top alone held
    mid_file = chain.mid.file_child()
    assert mid_file is not None
    storage.execute("blockdev-del", {"node-name": "top"})
    assert chain.mid.closed and mid_file.closed and not chain.base.closed
    assert chain.base.refcount == 1
    base_file = chain.base.file_child()
    assert base_file is not None
    assert node_names(storage) == {"base", base_file.name}


def test_drop_intermediate_on_raw_refuses_and_keeps_chain(
    storage: Storage, tmp_path: Path
) -> None:
    chain = BackingChain(storage, tmp_path, mid_named=False)
    with pytest.raises(GenericError, match="raw"):
        drop_intermediate(chain.top, chain.base)
    assert backing_chain(chain.top) == [chain.top, chain.mid, chain.base]
    assert not chain.mid.closed and chain.mid.refcount == 1
    assert chain.base.refcount == 2


def test_drop_intermediate_base_not_in_chain(storage: Storage, tmp_path: Path) -> None:
    chain = BackingChain(storage, tmp_path, mid_named=False)
    storage.execute("blockdev-add", raw_options("stranger", make_image(tmp_path, "s.img")))
    with pytest.raises(GenericError, match="'stranger' is not in the backing chain of 'top'"):
        drop_intermediate(chain.top, get(storage, "stranger"))
    with pytest.raises(GenericError, match="not in the backing chain"):
        drop_intermediate(chain.top, chain.top)  # a node is not its own base
    assert backing_chain(chain.top) == [chain.top, chain.mid, chain.base]


def test_drop_intermediate_relinks_and_closes_unreferenced_middle(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = BackingChain(storage, tmp_path, mid_named=False)
    chain.stub_header_rewrite(monkeypatch)
    mid_file = chain.mid.file_child()
    assert mid_file is not None
    closed = closed_log(chain.mid)

    dropped = drop_intermediate(chain.top, chain.base)

    assert dropped == [chain.mid]
    assert chain.rewrites == [(chain.paths["base"], "raw")]
    assert backing_chain(chain.top) == [chain.top, chain.base]
    assert closed == [chain.mid.name] and chain.mid.closed and mid_file.closed
    assert storage.graph.find(chain.mid.name) is None
    # base lost mid's link and gained top's
    assert [u.description for u in chain.base.busy_users()] == ["used as backing of 'top'"]
    assert chain.base.refcount == 2
    assert os.path.exists(chain.paths["mid"])


def test_drop_intermediate_keeps_middle_still_referenced(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = BackingChain(storage, tmp_path, mid_named=True)
    chain.stub_header_rewrite(monkeypatch)
    assert chain.mid.refcount == 2

    assert drop_intermediate(chain.top, chain.base) == [chain.mid]

    assert backing_chain(chain.top) == [chain.top, chain.base]
    assert not chain.mid.closed
    assert [u.kind for u in chain.mid.users] == [UserKind.MONITOR]
    assert chain.mid.backing() is chain.base  # its own link is untouched
    assert chain.base.refcount == 3  # monitor, mid's link, top's link
    storage.execute("blockdev-del", {"node-name": "mid"})
    assert chain.mid.closed and chain.base.refcount == 2


def test_drop_intermediate_to_no_base(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = BackingChain(storage, tmp_path, mid_named=False)
    chain.stub_header_rewrite(monkeypatch)
    assert drop_intermediate(chain.top, None) == [chain.mid, chain.base]
    assert chain.rewrites == [(None, None)]
    assert chain.top.backing() is None
    assert chain.mid.closed
    assert not chain.base.closed and chain.base.refcount == 1


def qcow2_chain(tmp_path: Path) -> tuple[str, str, str]:
    """``top.qcow2 -> mid.qcow2 -> base.qcow2`` on disk; base holds ``b"base"`` at 0, mid
    ``b"mid!"`` at 64 KiB, top ``b"top!"`` at 128 KiB."""
    assert QCOW2_CREATE is not None
    paths = tuple(str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top"))
    base, mid, top = paths
    QCOW2_CREATE(base, MiB)
    QCOW2_CREATE(mid, MiB, backing_file=base, backing_format="qcow2")
    QCOW2_CREATE(top, MiB, backing_file=mid, backing_format="qcow2")
    with Storage() as prep:
        for i, (path, data) in enumerate(zip(paths, (b"base", b"mid!", b"top!"), strict=True)):
            prep.execute(
                "blockdev-add",
                {"driver": "qcow2", "node-name": f"n{i}", "backing": None,
                 "file": {"driver": "file", "filename": path}},
            )
            get(prep, f"n{i}").pwrite(i * 65536, data)
    return base, mid, top


def open_qcow2(storage: Storage, name: str, path: str) -> BlockNode:
    storage.execute(
        "blockdev-add",
        {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}},
    )
    return get(storage, name)


@pytest.mark.skipif(QCOW2_CREATE is None, reason="the qcow2 driver is not written yet")
def test_qcow2_backing_chain_references(storage: Storage, tmp_path: Path) -> None:
    base, mid, top = qcow2_chain(tmp_path)
    top_node = open_qcow2(storage, "top", top)
    chain = backing_chain(top_node)
    assert [n.driver.filename() for n in chain] == [top, mid, base]
    assert all(n.auto_named and n.name.startswith("#block") for n in chain[1:])
    assert [u.description for u in chain[1].users] == ["used as backing of 'top'"]
    assert top_node.pread(0, 4) == b"base"
    assert top_node.pread(65536, 4) == b"mid!"
    assert top_node.pread(131072, 4) == b"top!"
    assert top_node.block_status_above(0, 4096).depth == 3
    assert top_node.block_status_above(65536, 4096).depth == 2
    closed: list[str] = []
    for node in storage.graph.nodes():
        node.on_close.append(lambda n: closed.append(n.name))
    storage.execute("blockdev-del", {"node-name": "top"})
    assert len(closed) == 6  # three formats and their three file nodes
    assert storage.graph.nodes() == []
    assert all(os.path.exists(p) for p in (base, mid, top))


@pytest.mark.skipif(
    not QCOW2_DROP, reason="the qcow2 driver cannot rewrite its backing file name yet"
)
@pytest.mark.parametrize("mid_held", [False, True])
def test_drop_intermediate_on_qcow2_chain(
    storage: Storage, tmp_path: Path, mid_held: bool
) -> None:
    base, _, top = qcow2_chain(tmp_path)
    top_node = open_qcow2(storage, "top", top)
    _, mid_node, base_node = backing_chain(top_node)
    if mid_held:
        job = mid_node.add_user(UserKind.JOB, "used by job 'stream0'")
    mid_closed = closed_log(mid_node)

    assert drop_intermediate(top_node, base_node) == [mid_node]

    assert backing_chain(top_node) == [top_node, base_node]
    assert top_node.driver.backing_filename() == base
    assert top_node.pread(0, 4) == b"base"
    assert top_node.pread(65536, 4) == bytes(4)  # mid's data is no longer under top
    if mid_held:
        assert not mid_node.closed and mid_closed == []
        assert mid_node.pread(65536, 4) == b"mid!"
        job.release()
    assert mid_node.closed and mid_closed == [mid_node.name]
    assert base_node.refcount == 1 and not base_node.closed
    # the new chain is what the image header says now
    storage.execute("blockdev-del", {"node-name": "top"})
    with Storage() as again:
        reopened = open_qcow2(again, "top", top)
        assert [n.driver.filename() for n in backing_chain(reopened)] == [top, base]
        assert reopened.pread(0, 4) == b"base"


# -- block_status_above ------------------------------------------------------------------------
class MapDriver(Driver):
    """An in-memory test layer: ``extents`` are the ranges this layer allocates."""

    name: ClassVar[str] = "test-map"

    def __init__(self, node: BlockNode, size: int, extents: list[tuple[int, int, Status]]) -> None:
        super().__init__(node)
        self._size = size
        self.extents = sorted(extents)

    def size(self) -> int:
        return self._size

    def preadv(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    def block_status(self, offset: int, length: int) -> BlockStatus:
        end = offset + length
        for start, ext_len, flags in self.extents:
            if start <= offset < start + ext_len:
                return BlockStatus(
                    offset, min(end, start + ext_len) - offset, flags | Status.ALLOCATED
                )
            if start > offset:
                return BlockStatus(offset, min(end, start) - offset, Status(0))
        return BlockStatus(offset, length, Status(0))


def map_node(
    storage: Storage, name: str, size: int, extents: list[tuple[int, int, Status]]
) -> BlockNode:
    node = BlockNode(storage.graph, name, "test-map", read_only=True, auto_named=False)
    node.driver = MapDriver(node, size, extents)
    return node


@pytest.fixture
def map_chain(storage: Storage) -> tuple[BlockNode, BlockNode, BlockNode]:
    """``top -> mid -> low``, 64 KiB each except ``low`` (32 KiB: a short backing)."""
    top = map_node(storage, "top", 65536, [(0, 4096, Status.DATA)])
    mid = map_node(storage, "mid", 65536, [(8192, 8192, Status.ZERO)])
    low = map_node(storage, "low", 32768, [(0, 32768, Status.DATA)])
    top.attach_child("backing", mid, ChildRole.BACKING)
    mid.attach_child("backing", low, ChildRole.BACKING)
    return top, mid, low


def test_block_status_above_depths(map_chain: tuple[BlockNode, BlockNode, BlockNode]) -> None:
    top, mid, low = map_chain
    assert top.block_status_above(0, 65536) == BlockStatus(
        0, 4096, Status.DATA | Status.ALLOCATED, 1
    )
    # top does not allocate [4096, 8192): low does, and mid leaves it to low
    assert top.block_status_above(4096, 60000) == BlockStatus(
        4096, 4096, Status.DATA | Status.ALLOCATED, 3
    )
    assert top.block_status_above(8192, 4096) == BlockStatus(
        8192, 4096, Status.ZERO | Status.ALLOCATED, 2
    )
    # beyond the short backing nothing allocates: reads as zeroes, depth 0
    status = top.block_status_above(40960, 8192)
    assert (status.offset, status.length, status.flags, status.depth) == (
        40960, 8192, Status.ZERO, 0
    )
    # low's extent is clipped where low ends
    assert top.block_status_above(16384, 49152).length == 16384
    # with a base, the walk stops above it
    assert top.block_status_above(4096, 4096, base=low) == BlockStatus(4096, 4096, Status(0), 0)
    assert top.block_status_above(8192, 4096, base=low).depth == 2
    assert mid.block_status_above(0, 4096) == BlockStatus(
        0, 4096, Status.DATA | Status.ALLOCATED, 2
    )


def test_extents_cover_the_range(map_chain: tuple[BlockNode, BlockNode, BlockNode]) -> None:
    top = map_chain[0]
    walked = list(top.extents(0, 65536))
    assert walked[0].offset == 0
    assert sum(e.length for e in walked) == 65536
    for a, b in itertools.pairwise(walked):
        assert a.offset + a.length == b.offset
    assert [(e.offset, e.depth) for e in walked] == [
        (0, 1), (4096, 3), (8192, 2), (16384, 3), (32768, 0)
    ]
    with pytest.raises(OSError):
        top.block_status_above(65536 - 512, 1024)  # past the end


@pytest.mark.parametrize(("key", "word"), [("direct", "O_DIRECT"), ("no-flush", "flushes")])
def test_cache_options_fleece_cannot_honour_are_refused(tmp_path: Path, key: str,
                                                        word: str) -> None:
    """blockdev-add over QMP refuses cache.direct=on and cache.no-flush=on as the daemon's
    command line does, instead of accepting and ignoring them; off is fine."""
    from fleece.storage import Storage

    image = tmp_path / "d.raw"
    image.write_bytes(bytes(65536))
    with Storage() as storage:
        with pytest.raises(GenericError, match=f"cache.{key}=on is not supported.*{word}"):
            storage.execute("blockdev-add", {"driver": "raw", "node-name": "d",
                                             "cache": {key: True},
                                             "file": {"driver": "file",
                                                      "filename": str(image)}})
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "d",
                                         "cache": {key: False},
                                         "file": {"driver": "file", "filename": str(image)}})
