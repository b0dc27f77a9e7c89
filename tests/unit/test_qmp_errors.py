"""Errors in QEMU's words and classes, through ``Storage.execute`` and the QMP server.

What is tested: a nested option is named by its path (``file.filename``, ``file.file.filename``)
while an enum's refusal names the member alone, as QEMU's visitor does; a child named by a
node that does not exist; failed device-or-node lookups answer ``GenericError`` (``block-commit``
alone ``DeviceNotFound``); a permission conflict in QEMU's sentence; an exception fleece did not
foresee reaches the client as ``GenericError`` with no Python text, and its traceback the log.
(Each text here was taken from qemu-storage-daemon 7.2; ``tests/interop/test_qmp_daemon.py``
compares them against the running daemon.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fleece.errors import QMPError
from fleece.qmp.server import UNEXPECTED, QMPServer
from fleece.storage import Storage

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def storage() -> Any:
    with Storage() as storage:
        yield storage


def error_of(storage: Storage, name: str, arguments: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(QMPError) as info:
        storage.execute(name, arguments)
    return info.value.qmp_class, info.value.desc


@pytest.mark.parametrize(("file", "desc"), [
    ({"driver": "file"}, "Parameter 'file.filename' is missing"),
    ({"driver": "file", "filename": 5},
     "Invalid parameter type for 'file.filename', expected: string"),
    ({"driver": "raw", "file": {"driver": "file"}}, "Parameter 'file.file.filename' is missing"),
    ({"driver": "file", "filename": "x", "aio": "x"}, "Parameter 'aio' does not accept value 'x'"),
    ({"driver": "nosuch"}, "Parameter 'driver' does not accept value 'nosuch'"),
    ("nonode", "Cannot find device='nonode' nor node-name='nonode'"),
])
def test_nested_options_are_named_by_their_path(storage: Storage, file: Any, desc: str) -> None:
    assert error_of(storage, "blockdev-add", {"driver": "qcow2", "node-name": "a",
                                              "file": file}) == ("GenericError", desc)
    assert storage.graph.nodes() == []


def test_nested_file_not_found_is_qemus_sentence(storage: Storage, tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.qcow2"
    assert error_of(storage, "blockdev-add", {
        "driver": "qcow2", "node-name": "a", "file": {"driver": "file", "filename": str(missing)},
    }) == ("GenericError", f"Could not open '{missing}': No such file or directory")


@pytest.mark.parametrize(("name", "arguments", "expected"), [
    ("drive-backup", {"device": "x", "target": "t.qcow2", "sync": "none"},
     ("GenericError", "Cannot find device='x' nor node-name='x'")),
    ("blockdev-backup", {"device": "x", "target": "y", "sync": "none"},
     ("GenericError", "Cannot find device='x' nor node-name='x'")),
    ("transaction", {"actions": [{"type": "blockdev-backup",
                                  "data": {"device": "x", "target": "y", "sync": "none"}}]},
     ("GenericError", "Cannot find device='x' nor node-name='x'")),
    ("block-stream", {"device": "x"}, ("GenericError", "Cannot find device='x' nor node-name='x'")),
    ("block-commit", {"device": "x"}, ("DeviceNotFound", "Device 'x' not found")),
    ("block-dirty-bitmap-add", {"node": "x", "name": "b"},
     ("GenericError", "Cannot find device='x' nor node-name='x'")),
    ("block-dirty-bitmap-remove", {"node": "x", "name": "b"},
     ("GenericError", "Node 'x' not found")),
    ("block-job-cancel", {"device": "x"}, ("DeviceNotActive", "Block job 'x' not found")),
    ("device_del", {"id": "x"}, ("DeviceNotFound", "Device 'x' not found")),
])
def test_lookup_error_classes_are_qemus(storage: Storage, name: str, arguments: dict[str, Any],
                                        expected: tuple[str, str]) -> None:
    assert error_of(storage, name, arguments) == expected


def test_lookup_of_a_node_name_below_a_device(storage: Storage, tmp_path: Path) -> None:
    storage.execute("blockdev-add", {"driver": "null-co", "node-name": "src"})
    assert error_of(storage, "block-stream", {"device": "src", "base-node": "x"}) == (
        "GenericError", "Cannot find device='' nor node-name='x'")
    assert error_of(storage, "block-commit", {"device": "src", "top-node": "x"}) == (
        "GenericError", "Cannot find device='' nor node-name='x'")


def test_permission_conflict_is_qemus_sentence(storage: Storage, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    storage.execute("blockdev-add", {"driver": "raw", "node-name": "disk0",
                                     "file": {"driver": "file", "filename": str(image)}})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "v0", "drive": "disk0"})
    assert error_of(storage, "device_add", {"driver": "virtio-blk", "id": "v1",
                                            "drive": "disk0"}) == (
        "GenericError",
        "Permission conflict on node 'disk0': permissions 'write' are both required by block "
        "device 'v0' (uses node 'disk0' as 'root' child) and unshared by block device 'v1' "
        "(uses node 'disk0' as 'root' child).")


# -- the QMP server --------------------------------------------------------------------------------
class _Broken(Storage):
    def execute(self, name: str, arguments: Any = None) -> Any:
        if name == "query-block":
            raise RuntimeError("secret Python text")
        return super().execute(name, arguments)


def test_unexpected_exception_is_a_generic_error_and_a_logged_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "qmp.sock")

    async def session() -> list[Any]:
        with _Broken() as storage:
            server = QMPServer(storage)
            await server.listen_unix(path)
            reader, writer = await asyncio.open_unix_connection(path)
            replies = [json.loads(await reader.readline())]
            for message in ({"execute": "qmp_capabilities"},
                            {"execute": "query-block", "id": 7},
                            {"execute": "query-version", "id": 8}):
                writer.write(json.dumps(message).encode())
                replies.append(json.loads(await reader.readline()))
            writer.close()
            await server.close()
            return replies

    with caplog.at_level(logging.ERROR, logger="fleece.qmp.server"):
        replies = asyncio.run(asyncio.wait_for(session(), 30))
    assert replies[2] == {"error": {"class": "GenericError",
                                    "desc": UNEXPECTED.format(command="query-block")}, "id": 7}
    assert "secret" not in replies[2]["error"]["desc"]
    assert replies[3]["id"] == 8 and "return" in replies[3]  # the daemon serves on
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert logged and "secret Python text" in str(logged[0])
