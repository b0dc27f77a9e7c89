"""The protocol, format and filter drivers, driven through nodes and devices of a ``Storage``.

What is tested:

- ``file``: read/write round trips (checked against the file on disk); reads past the end of the
  file node refused with ``OSError(EINVAL)`` at node level; writes past the end grow the file;
  ``pwrite_zeroes(may_unmap=True)`` punches a hole that ``block_status`` reports as
  ``ZERO|ALLOCATED`` with ``DATA|ALLOCATED`` around it; discard; flush reaching ``fdatasync``
  through a format; a missing file or a directory refused with ``GenericError`` naming it; the
  byte-range locks between two nodes of one process (and ``locking=off``).
- ``raw``: the ``offset``/``size`` window (reads, writes, block status host offsets) and its
  bounds errors, at open and at I/O time.
- ``null-co``: its size, zero reads, dropped writes, and block status ``ZERO`` only with
  ``read-zeroes``.
- ``blkdebug``: ``inject-error`` rules on ``read_aio`` / ``write_aio`` / ``flush_to_disk``, the
  ``errno`` value, ``sector`` matching, ``once`` removing the rule, the ``iotype`` filter, and
  unknown options refused with ``GenericError`` ``Parameter '...' is unexpected``.
- Devices: eight threads writing disjoint random blocks through ``Storage.device("virtio0")``
  at once, then every block verified through the device and on disk; failures raise ``OSError``
  carrying an errno.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.driver import BlockStatus, Status
from fleece.block.node import BlockNode
from fleece.errors import GenericError
from fleece.storage import Storage

KiB = 1 << 10
MiB = 1 << 20

DATA = Status.DATA | Status.ALLOCATED
ZERO = Status.ZERO | Status.ALLOCATED


# -- helpers -----------------------------------------------------------------------------------
def pattern(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def make_image(directory: Path, name: str, size: int = MiB, fill: bytes = b"") -> str:
    path = directory / name
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return str(path)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def get(storage: Storage, name: str) -> BlockNode:
    node = storage.graph.find(name)
    assert node is not None, f"node {name!r} is not in the graph"
    return node


def file_node(
    storage: Storage, path: str, extra: dict[str, Any] | None = None, name: str = "f"
) -> BlockNode:
    storage.execute(
        "blockdev-add", {"driver": "file", "node-name": name, "filename": path, **(extra or {})}
    )
    return get(storage, name)


def raw_node(storage: Storage, path: str, name: str = "r", **extra: Any) -> BlockNode:
    storage.execute(
        "blockdev-add",
        {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": path},
         **extra},
    )
    return get(storage, name)


def node_names(storage: Storage) -> set[str]:
    return {info["node-name"] for info in storage.execute("query-named-block-nodes")}


def os_error(call: Callable[[], object]) -> int:
    """The errno of the ``OSError`` ``call`` raises (fails the test when it does not raise)."""
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


@pytest.fixture
def storage() -> Iterator[Storage]:
    s = Storage()
    try:
        yield s
    finally:
        s.close()


# -- file --------------------------------------------------------------------------------------
def test_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "f.img", MiB)
    f = file_node(storage, path)
    assert f.size == MiB
    writes = [(0, pattern(4096, 1)), (12345, pattern(70000, 2)), (MiB - 512, pattern(512, 3))]
    for offset, data in writes:
        f.pwrite(offset, data)
    on_disk = read_file(path)
    for offset, data in writes:
        assert f.pread(offset, len(data)) == data
        assert on_disk[offset : offset + len(data)] == data
    buf = bytearray(70000)
    f.pread_into(12345, memoryview(buf))
    assert bytes(buf) == writes[1][1]
    assert f.pread(8192, 4096) == bytes(4096)  # never written: zeroes
    assert f.size == MiB


def test_file_read_past_eof_is_einval(storage: Storage, tmp_path: Path) -> None:
    f = file_node(storage, make_image(tmp_path, "f.img", 64 * KiB))
    assert os_error(lambda: f.pread(64 * KiB - 100, 200)) == errno.EINVAL
    assert os_error(lambda: f.pread(64 * KiB, 1)) == errno.EINVAL
    assert os_error(lambda: f.pread(-512, 512)) == errno.EINVAL
    assert os_error(lambda: f.pread_into(60 * KiB, bytearray(8 * KiB))) == errno.EINVAL
    assert os_error(lambda: f.block_status(64 * KiB - 512, 1024)) == errno.EINVAL
    assert f.pread(64 * KiB - 100, 100) == bytes(100)
    assert f.pread(64 * KiB, 0) == b""


def test_file_write_past_end_grows(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "f.img", 64 * KiB)
    f = file_node(storage, path)
    data = pattern(3000, 7)
    f.pwrite(64 * KiB + 4096, data)
    assert f.size == 64 * KiB + 4096 + 3000
    assert os.path.getsize(path) == f.size
    assert f.pread(64 * KiB, 4096) == bytes(4096)
    assert f.pread(64 * KiB + 4096, 3000) == data
    f.pwrite_zeroes(f.size, 8192)
    assert f.size == 64 * KiB + 4096 + 3000 + 8192
    assert os_error(lambda: f.pwrite(-1, b"x")) == errno.EINVAL


def test_file_zeroes_with_unmap_punch_a_hole(storage: Storage, tmp_path: Path) -> None:
    size = MiB
    path = make_image(tmp_path, "f.img", size, b"\xaa" * size)
    f = file_node(storage, path)
    f.flush()
    blocks_before = os.stat(path).st_blocks
    assert f.block_status(0, size) == BlockStatus(0, size, DATA, 1, 0)

    f.pwrite_zeroes(256 * KiB, 64 * KiB, may_unmap=True)

    assert f.pread(256 * KiB, 64 * KiB) == bytes(64 * KiB)
    assert f.pread(256 * KiB - 512, 512) == b"\xaa" * 512
    assert f.pread(320 * KiB, 512) == b"\xaa" * 512
    assert os.stat(path).st_blocks == blocks_before - 64 * KiB // 512
    assert f.size == size
    assert f.block_status(0, size) == BlockStatus(0, 256 * KiB, DATA, 1, 0)
    assert f.block_status(256 * KiB, size - 256 * KiB) == BlockStatus(
        256 * KiB, 64 * KiB, ZERO, 1, 256 * KiB
    )
    assert f.block_status(320 * KiB, size - 320 * KiB) == BlockStatus(
        320 * KiB, size - 320 * KiB, DATA, 1, 320 * KiB
    )
    walked = [(e.offset, e.length, e.flags) for e in f.extents(0, size)]
    assert walked == [
        (0, 256 * KiB, DATA), (256 * KiB, 64 * KiB, ZERO), (320 * KiB, size - 320 * KiB, DATA)
    ]


def test_file_zeroes_without_unmap(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "f.img", MiB, b"\x55" * MiB)
    f = file_node(storage, path)
    f.pwrite_zeroes(1000, 5000, may_unmap=False)  # unaligned on purpose
    data = read_file(path)
    assert data[1000:6000] == bytes(5000)
    assert data[:1000] == b"\x55" * 1000 and data[6000:7000] == b"\x55" * 1000
    assert len(data) == MiB


def test_file_zeroes_past_eof_never_shrink_a_concurrent_extension(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zeroes past the end grow the file without truncating it, so an extending write that
    lands meanwhile (another vCPU thread) is never cut off."""
    path = make_image(tmp_path, "f.img", 64 * KiB)
    f = file_node(storage, path)
    payload = pattern(4096, 31)

    def no_truncate(fd: int, length: int) -> None:
        raise AssertionError(f"ftruncate({length}) would race with extending writes")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    for _ in range(20):
        other = threading.Thread(target=f.pwrite, args=(128 * KiB, payload))
        other.start()
        f.pwrite_zeroes(64 * KiB, 4096)
        other.join(5)
        assert f.size == 128 * KiB + 4096
        assert f.pread(128 * KiB, 4096) == payload
        assert f.pread(64 * KiB, 4096) == bytes(4096)


def test_file_sparse_file_is_all_zero(storage: Storage, tmp_path: Path) -> None:
    f = file_node(storage, make_image(tmp_path, "f.img", MiB))
    status = f.block_status(4096, MiB - 4096)
    assert (status.offset, status.length, status.flags) == (4096, MiB - 4096, ZERO)


def test_file_discard(storage: Storage, tmp_path: Path) -> None:
    size = MiB
    path = make_image(tmp_path, "f.img", size, b"\x77" * size)
    f = file_node(storage, path, {"discard": "unmap"})
    f.flush()
    f.pdiscard(512 * KiB, 128 * KiB)
    assert f.pread(512 * KiB, 128 * KiB) == bytes(128 * KiB)
    assert f.pread(512 * KiB - 1, 1) == b"\x77" and f.pread(640 * KiB, 1) == b"\x77"
    assert f.block_status(512 * KiB, 128 * KiB).flags == ZERO
    assert f.size == size


def test_file_discard_ignored_by_default(storage: Storage, tmp_path: Path) -> None:
    """QEMU's default is discard=ignore: the data stays."""
    path = make_image(tmp_path, "f.img", MiB, b"\x77" * MiB)
    f = file_node(storage, path)
    f.pdiscard(512 * KiB, 128 * KiB)
    assert f.pread(512 * KiB, 128 * KiB) == b"\x77" * (128 * KiB)


def test_flush_reaches_fdatasync_through_raw(
    storage: Storage, tmp_path: Path, file_syscalls: list[tuple[str, int]]
) -> None:
    r = raw_node(storage, make_image(tmp_path, "f.img"))
    file = r.file_child()
    assert file is not None
    r.pwrite(0, b"durable")
    r.flush()
    file_syscalls.clear()
    r.flush()
    assert file_syscalls == [("fdatasync", file.driver.fd)]  # type: ignore[attr-defined]


def test_a_fua_write_is_durable_alone_on_a_file_and_through_raw_and_flushed_above_others(
    storage: Storage, tmp_path: Path, file_syscalls: list[tuple[str, int]]
) -> None:
    """A file makes one write durable by itself (``RWF_DSYNC``: its other dirty pages stay),
    and ``raw``, a window onto it, passes that on; a driver that cannot (``blkdebug``) writes,
    then flushes everything below it, as QEMU emulates ``BDRV_REQ_FUA``."""
    r = raw_node(storage, make_image(tmp_path, "f.img"))
    file = r.file_child()
    assert file is not None
    storage.execute("blockdev-add", {"driver": "blkdebug", "node-name": "dbg", "image": {
        "driver": "file", "filename": make_image(tmp_path, "g.img")}})
    debug = get(storage, "dbg")
    assert file.native_fua() and r.native_fua() and not debug.native_fua()
    calls = file_syscalls
    calls.clear()
    file.pwrite(0, b"alone", fua=True)
    r.pwrite(8, b"through", fua=True)
    assert calls == [("pwritev", os.RWF_DSYNC)] * 2
    assert r.pread(0, 15) == b"alone\0\0\0through"
    calls.clear()
    debug.pwrite(8, b"emulated", fua=True)
    debug_file = debug.child("image")
    assert debug_file is not None
    debug_fd = debug_file.driver.fd  # type: ignore[attr-defined]
    assert calls == [("pwritev", 0), ("fdatasync", debug_fd)]
    assert debug.pread(8, 8) == b"emulated"


def test_read_only_file_node_refuses_writes(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "f.img", 64 * KiB, b"ro")
    f = file_node(storage, path, {"read-only": True})
    assert f.read_only
    assert os_error(lambda: f.pwrite(0, b"x")) == errno.EROFS
    assert os_error(lambda: f.pwrite_zeroes(0, 512)) == errno.EROFS
    assert os_error(lambda: f.pdiscard(0, 512)) == errno.EROFS
    f.flush()  # nothing to make durable: fine
    assert f.pread(0, 2) == b"ro"


def test_file_missing_is_generic_error_naming_it(storage: Storage, tmp_path: Path) -> None:
    missing = str(tmp_path / "does-not-exist.img")
    with pytest.raises(GenericError) as info:
        file_node(storage, missing)
    assert missing in str(info.value)
    assert "No such file" in str(info.value)
    with pytest.raises(GenericError, match="does-not-exist"):
        raw_node(storage, missing)
    assert node_names(storage) == set()


@pytest.mark.parametrize("read_only", [False, True])
def test_file_directory_refused(storage: Storage, tmp_path: Path, read_only: bool) -> None:
    with pytest.raises(GenericError) as info:
        file_node(storage, str(tmp_path), {"read-only": read_only})
    assert str(tmp_path) in str(info.value)
    assert "directory" in str(info.value)
    assert node_names(storage) == set()


def test_file_missing_filename(storage: Storage) -> None:
    with pytest.raises(GenericError, match="'filename'"):
        storage.execute("blockdev-add", {"driver": "file", "node-name": "f"})


def test_file_locks_between_nodes_of_one_process(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "f.img")
    raw_node(storage, path, "writer")
    with pytest.raises(GenericError, match='Failed to get "write" lock') as info:
        raw_node(storage, path, "writer2")
    assert path in str(info.value)
    with pytest.raises(GenericError, match='Failed to get shared "write" lock'):
        raw_node(storage, path, "reader", **{"read-only": True})
    assert [n.name for n in storage.graph.nodes() if not n.auto_named] == ["writer"]
    assert len(storage.graph.nodes()) == 2  # the writer and its file child
    # without locking, nothing is checked
    storage.execute(
        "blockdev-add",
        {"driver": "raw", "node-name": "unlocked",
         "file": {"driver": "file", "filename": path, "locking": "off"}},
    )
    storage.execute("blockdev-del", {"node-name": "unlocked"})
    # once the writer lets go, another writer may come
    storage.execute("blockdev-del", {"node-name": "writer"})
    raw_node(storage, path, "writer2").pwrite(0, b"mine")


def test_force_share_reader_coexists_with_writer(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "f.img")
    raw_node(storage, path, "writer").pwrite(0, b"live")
    storage.execute(
        "blockdev-add",
        {"driver": "raw", "node-name": "peek", "read-only": True, "force-share": True,
         "file": {"driver": "file", "filename": path, "read-only": True, "force-share": True}},
    )
    assert get(storage, "peek").pread(0, 4) == b"live"


# -- raw ---------------------------------------------------------------------------------------
def test_raw_is_its_file(storage: Storage, tmp_path: Path) -> None:
    content = pattern(256 * KiB, 11)
    path = make_image(tmp_path, "r.img", 256 * KiB, content)
    r = raw_node(storage, path)
    assert r.size == 256 * KiB
    assert r.pread(0, 256 * KiB) == content
    r.pwrite(1000, b"hello")
    assert read_file(path)[1000:1005] == b"hello"
    # a raw node over a growable file does not grow itself
    assert os_error(lambda: r.pwrite(256 * KiB - 2, b"abcd")) == errno.ENOSPC
    assert os_error(lambda: r.pread(256 * KiB - 2, 4)) == errno.EINVAL
    assert os.path.getsize(path) == 256 * KiB


def test_raw_window(storage: Storage, tmp_path: Path) -> None:
    content = pattern(MiB, 12)
    path = make_image(tmp_path, "r.img", MiB, content)
    r = raw_node(storage, path, offset=64 * KiB, size=128 * KiB)
    assert r.size == 128 * KiB
    assert r.pread(0, 128 * KiB) == content[64 * KiB : 192 * KiB]
    r.pwrite(4096, b"W" * 4096)
    on_disk = read_file(path)
    assert on_disk[68 * KiB : 72 * KiB] == b"W" * 4096
    assert on_disk[: 64 * KiB] == content[: 64 * KiB]
    assert on_disk[192 * KiB :] == content[192 * KiB :]
    r.pwrite_zeroes(0, 4096, may_unmap=True)
    assert read_file(path)[64 * KiB : 68 * KiB] == bytes(4096)
    status = r.block_status(0, 128 * KiB)
    assert (status.offset, status.host_offset, status.flags) == (0, 64 * KiB, ZERO)
    status = r.block_status(8192, 4096)
    assert (status.offset, status.length, status.host_offset) == (8192, 4096, 72 * KiB)
    # out of the window
    assert os_error(lambda: r.pread(128 * KiB - 512, 1024)) == errno.EINVAL
    assert os_error(lambda: r.pwrite(128 * KiB, b"x")) == errno.ENOSPC
    assert os_error(lambda: r.pwrite_zeroes(128 * KiB - 512, 1024)) == errno.ENOSPC
    assert read_file(path)[192 * KiB :] == content[192 * KiB :]


def test_raw_offset_without_size(storage: Storage, tmp_path: Path) -> None:
    content = pattern(64 * KiB, 13)
    r = raw_node(storage, make_image(tmp_path, "r.img", 64 * KiB, content), offset=60 * KiB)
    assert r.size == 4 * KiB
    assert r.pread(0, 4 * KiB) == content[60 * KiB :]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"offset": 65 * KiB}, "offset (66560)"),
        ({"offset": 0, "size": 65 * KiB}, "size (66560)"),
        ({"offset": 32 * KiB, "size": 33 * KiB}, "has to be smaller or equal"),
        ({"offset": -1}, "'offset'"),
        ({"size": -1}, "'size'"),
        ({"offset": "far"}, "'offset'"),
        ({"window": 1}, "Parameter 'window' is unexpected"),
    ],
)
def test_raw_bounds_errors(
    storage: Storage, tmp_path: Path, options: dict[str, Any], needle: str
) -> None:
    path = make_image(tmp_path, "r.img", 64 * KiB)
    with pytest.raises(GenericError) as info:
        raw_node(storage, path, **options)
    assert needle in str(info.value)
    assert node_names(storage) == set()


def test_raw_missing_file(storage: Storage) -> None:
    with pytest.raises(GenericError, match="'file'"):
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "r"})


# -- null-co -----------------------------------------------------------------------------------
def null_node(storage: Storage, **options: Any) -> BlockNode:
    storage.execute("blockdev-add", {"driver": "null-co", "node-name": "null0", **options})
    return get(storage, "null0")


def test_null_default_size_and_zero_reads(storage: Storage) -> None:
    n = null_node(storage)
    assert n.size == 1 << 30
    buf = bytearray(b"\xff" * 8192)
    n.pread_into(4096, buf)
    assert buf == bytes(8192)
    n.pwrite(0, b"dropped")
    assert n.pread(0, 7) == bytes(7)
    n.pwrite_zeroes(0, 4096)
    n.flush()
    assert os_error(lambda: n.pread((1 << 30) - 1, 2)) == errno.EINVAL
    assert os_error(lambda: n.pwrite(1 << 30, b"x")) == errno.ENOSPC
    assert n.info()["image"]["virtual-size"] == 1 << 30


def test_null_size_option(storage: Storage) -> None:
    n = null_node(storage, size=12345)
    assert n.size == 12345
    assert n.pread(12000, 345) == bytes(345)
    assert os_error(lambda: n.pread(12000, 346)) == errno.EINVAL


@pytest.mark.parametrize(("read_zeroes", "flags"), [(True, ZERO), (False, DATA)])
def test_null_block_status(storage: Storage, read_zeroes: bool, flags: Status) -> None:
    n = null_node(storage, size=MiB, **{"read-zeroes": read_zeroes})
    assert n.block_status(4096, MiB - 4096) == BlockStatus(4096, MiB - 4096, flags)
    assert n.pread(0, 512) == bytes(512)


def test_null_default_block_status_is_data(storage: Storage) -> None:
    assert null_node(storage, size=MiB).block_status(0, MiB).flags == DATA


def test_null_bad_options(storage: Storage) -> None:
    with pytest.raises(GenericError, match="Parameter 'filename' is unexpected"):
        null_node(storage, filename="x")
    with pytest.raises(GenericError, match="'size'"):
        null_node(storage, size=-1)
    assert node_names(storage) == set()


# -- blkdebug ----------------------------------------------------------------------------------
@pytest.fixture
def debug_image(tmp_path: Path) -> str:
    return make_image(tmp_path, "dbg.img", MiB, pattern(MiB, 21))


def blkdebug(storage: Storage, path: str, rules: list[dict[str, Any]], **extra: Any) -> BlockNode:
    """A blkdebug node ``dbg`` over a raw image with ``rules``, plugged as device ``vdbg``."""
    storage.execute(
        "blockdev-add",
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "discard": "unmap",
            "image": {"driver": "raw", "file": {"driver": "file", "filename": path}},
            "inject-error": rules,
            **extra,
        },
    )
    storage.execute("device_add", {"driver": "virtio-blk", "id": "vdbg", "drive": "dbg"})
    return get(storage, "dbg")


def test_blkdebug_without_rules_passes_io_through(storage: Storage, debug_image: str) -> None:
    blkdebug(storage, debug_image, [])
    dev = storage.device("vdbg")
    assert dev.size == MiB
    assert dev.pread(0, 4096) == pattern(MiB, 21)[:4096]
    dev.pwrite(8192, b"through")
    dev.flush()
    assert read_file(debug_image)[8192:8199] == b"through"
    dev.pwrite_zeroes(0, 4096)
    dev.pdiscard(4096, 4096)
    assert dev.pread(0, 8192) == bytes(8192)


def test_blkdebug_read_error_default_eio(storage: Storage, debug_image: str) -> None:
    blkdebug(storage, debug_image, [{"event": "read_aio"}])
    dev = storage.device("vdbg")
    assert os_error(lambda: dev.pread(0, 512)) == errno.EIO
    assert os_error(lambda: dev.pread(MiB - 512, 512)) == errno.EIO
    assert os_error(lambda: dev.pread(0, 512)) == errno.EIO  # not once: keeps failing
    dev.pwrite(0, b"writes still work")
    dev.flush()
    assert read_file(debug_image)[:17] == b"writes still work"


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EPERM, errno.EROFS, errno.EDQUOT])
def test_blkdebug_write_error_honours_errno(
    storage: Storage, debug_image: str, code: int
) -> None:
    blkdebug(storage, debug_image, [{"event": "write_aio", "errno": code}])
    dev = storage.device("vdbg")
    assert os_error(lambda: dev.pwrite(0, b"lost")) == code
    assert os_error(lambda: dev.pwrite_zeroes(0, 4096)) == code
    assert os_error(lambda: dev.pdiscard(0, 4096)) == code
    assert dev.pread(0, 4096) == pattern(MiB, 21)[:4096]
    dev.flush()
    assert read_file(debug_image) == pattern(MiB, 21)


def test_blkdebug_flush_error(storage: Storage, debug_image: str) -> None:
    blkdebug(storage, debug_image, [{"event": "flush_to_disk", "errno": errno.EIO}])
    dev = storage.device("vdbg")
    dev.pwrite(0, b"data")
    assert dev.pread(0, 4) == b"data"
    assert os_error(dev.flush) == errno.EIO


def test_blkdebug_sector_matching(storage: Storage, debug_image: str) -> None:
    blkdebug(storage, debug_image, [{"event": "read_aio", "sector": 8, "errno": errno.ENXIO}])
    dev = storage.device("vdbg")
    dev.pread(0, 4096)  # sectors 0..7
    dev.pread(4608, 4096)  # sectors 9..16
    assert os_error(lambda: dev.pread(4096, 512)) == errno.ENXIO  # exactly sector 8
    assert os_error(lambda: dev.pread(0, 64 * KiB)) == errno.ENXIO  # covers it
    assert os_error(lambda: dev.pread(3584, 1024)) == errno.ENXIO  # straddles it
    dev.pwrite(4096, b"w" * 512)  # other events are not affected


def test_blkdebug_once_removes_the_rule(storage: Storage, debug_image: str) -> None:
    node = blkdebug(
        storage,
        debug_image,
        [
            {"event": "read_aio", "sector": 0, "once": True, "errno": errno.EAGAIN},
            {"event": "read_aio", "sector": 100},
        ],
    )
    dev = storage.device("vdbg")
    assert len(node.driver.rules) == 2  # type: ignore[attr-defined]
    assert os_error(lambda: dev.pread(0, 512)) == errno.EAGAIN
    assert dev.pread(0, 512) == pattern(MiB, 21)[:512]
    assert len(node.driver.rules) == 1  # type: ignore[attr-defined]
    assert os_error(lambda: dev.pread(100 * 512, 512)) == errno.EIO
    assert os_error(lambda: dev.pread(100 * 512, 512)) == errno.EIO


@pytest.mark.parametrize(
    ("iotype", "failing"),
    [
        ("write", {"pwrite"}),
        ("write-zeroes", {"pwrite_zeroes"}),
        ("discard", {"pdiscard"}),
    ],
)
def test_blkdebug_iotype_filter(
    storage: Storage, debug_image: str, iotype: str, failing: set[str]
) -> None:
    blkdebug(storage, debug_image, [{"event": "write_aio", "iotype": [iotype]}])
    dev = storage.device("vdbg")
    calls: dict[str, Callable[[], object]] = {
        "pwrite": lambda: dev.pwrite(0, b"x" * 512),
        "pwrite_zeroes": lambda: dev.pwrite_zeroes(4096, 4096),
        "pdiscard": lambda: dev.pdiscard(8192, 4096),
    }
    for name, call in calls.items():
        if name in failing:
            assert os_error(call) == errno.EIO, name
        else:
            call()
    dev.pread(0, 4096)


def test_blkdebug_read_rule_for_writes_only_iotype_never_fires(
    storage: Storage, debug_image: str
) -> None:
    blkdebug(storage, debug_image, [{"event": "read_aio", "iotype": ["write"]}])
    assert storage.device("vdbg").pread(0, 512) == pattern(MiB, 21)[:512]


@pytest.mark.parametrize(
    ("extra", "rules", "needle"),
    [
        ({"bogus": 1}, [], "Parameter 'bogus' is unexpected"),
        ({}, [{"event": "read_aio", "bogus": 1}], "Parameter 'bogus' is unexpected"),
        ({}, [{"errno": 5}], "Parameter 'event' is missing"),
        ({}, [{"event": "read_aio", "errno": "EIO"}], "'errno'"),
        ({}, [{"event": "read_aio", "iotype": ["sideways"]}], "'iotype'"),
        ({}, ["read_aio"], "'inject-error'"),
        ({"config": "/etc/blkdebug.conf"}, [], "config"),
    ],
)
def test_blkdebug_bad_options(
    storage: Storage, debug_image: str, extra: dict[str, Any], rules: list[Any], needle: str
) -> None:
    with pytest.raises(GenericError) as info:
        blkdebug(storage, debug_image, rules, **extra)
    assert needle in str(info.value)
    assert node_names(storage) == set()


# -- devices -----------------------------------------------------------------------------------
def test_device_parallel_writers_disjoint_blocks(storage: Storage, tmp_path: Path) -> None:
    block, blocks, threads = 4096, 2048, 8
    path = make_image(tmp_path, "par.img", block * blocks)
    raw_node(storage, path, "disk0")
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    dev = storage.device("virtio0")
    order = list(range(blocks))
    random.Random(99).shuffle(order)
    shares = [order[i::threads] for i in range(threads)]
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def content(index: int) -> bytes:
        return random.Random(index).randbytes(block)

    def worker(mine: list[int]) -> None:
        try:
            start.wait(5)
            for index in mine:
                dev.pwrite(index * block, content(index))
                if index % 7 == 0:  # interleave reads with the other threads' writes
                    assert dev.pread(index * block, block) == content(index)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(s,), daemon=True) for s in shares]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert not any(t.is_alive() for t in workers)
    assert errors == []
    dev.flush()
    on_disk = read_file(path)
    buf = bytearray(block)
    for index in range(blocks):
        dev.pread_into(index * block, buf)
        assert buf == content(index), f"block {index} through the device"
        assert on_disk[index * block : (index + 1) * block] == content(index), f"block {index}"


def test_device_parallel_readers_and_writers_same_node(storage: Storage, tmp_path: Path) -> None:
    path = make_image(tmp_path, "rw.img", 4 * MiB, pattern(4 * MiB, 5))
    raw_node(storage, path, "disk0")
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    dev = storage.device("virtio0")
    original = pattern(4 * MiB, 5)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:  # reads the half nobody writes
        rng = random.Random(seed)
        try:
            for _ in range(300):
                off = rng.randrange(0, 2 * MiB - 65536, 512)
                assert dev.pread(off, 65536) == original[off : off + 65536]
        except BaseException as exc:
            errors.append(exc)

    def writer(seed: int) -> None:  # rewrites its own quarter of the other half
        base = 2 * MiB + (seed - 10) * 512 * KiB
        try:
            for i in range(128):
                dev.pwrite(base + i * 4096, bytes([seed]) * 4096)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(4)]
    workers += [threading.Thread(target=writer, args=(10 + i,), daemon=True) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert errors == []
    for i in range(4):
        base = 2 * MiB + i * 512 * KiB
        assert dev.pread(base, 512 * KiB) == bytes([10 + i]) * 512 * KiB


@pytest.mark.parametrize(
    ("driver_options", "op", "expected"),
    [
        ({}, "read-past-end", errno.EINVAL),
        ({}, "write-past-end", errno.ENOSPC),
        ({}, "negative", errno.EINVAL),
        ({"read-only": True}, "write", errno.EROFS),
        ({"inject": "read_aio"}, "read", errno.EIO),
        ({"inject": "write_aio"}, "write", errno.EIO),
        ({"inject": "flush_to_disk"}, "flush", errno.EIO),
    ],
)
def test_device_failures_raise_oserror_with_errno(
    storage: Storage,
    tmp_path: Path,
    driver_options: dict[str, Any],
    op: str,
    expected: int,
) -> None:
    path = make_image(tmp_path, "d.img", 64 * KiB)
    image = {"driver": "raw", "file": {"driver": "file", "filename": path}}
    if "inject" in driver_options:
        options: dict[str, Any] = {
            "driver": "blkdebug",
            "image": image,
            "inject-error": [{"event": driver_options["inject"]}],
        }
    else:
        options = {**image, **driver_options}
    storage.execute("blockdev-add", {**options, "node-name": "disk0"})
    storage.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    dev = storage.device("virtio0")
    calls: dict[str, Callable[[], object]] = {
        "read-past-end": lambda: dev.pread(64 * KiB - 512, 1024),
        "write-past-end": lambda: dev.pwrite(64 * KiB, b"x"),
        "negative": lambda: dev.pread(-4096, 512),
        "write": lambda: dev.pwrite(0, b"x"),
        "read": lambda: dev.pread(0, 512),
        "flush": dev.flush,
    }
    with pytest.raises(OSError) as info:
        calls[op]()
    assert info.value.errno == expected
