"""Direct writes: :meth:`fleece.block.node.BlockNode.begin_direct_write` and its drivers.

What is tested:

- **qcow2**: a reserved range of whole clusters this image does not hold (unallocated, over a
  backing file) gets new host clusters in one contiguous run. Data written at that host offset
  is invisible until ``finish(True)`` maps the clusters: until then the range still reads the
  backing file, afterwards the new data, also after closing and reopening the image (and with
  refcount widths 1 to 64). ``finish(False)`` leaves the range reading the backing file. Two
  reservations in a row get adjacent host runs (one bulk allocation feeds both). A zero
  cluster without a host cluster counts as not held; a short last cluster at the end of the
  image can be reserved. No reservation (None) for a range that is not whole clusters, touches
  a cluster the image holds, or spans two L2 tables; ``EROFS`` on a read-only node.
- **Block layer**: a node whose writes are intercepted (a dirty bitmap records them) refuses a
  direct write; a reserved write counts as in flight, so ``drain`` waits for its ``finish``.
- **raw and file**: the host offset is the guest offset plus raw's ``offset`` option.
- **DirectWrite.finish** runs every layer's completion even when one raises, then raises the
  first error.

``qemu-img check`` of an image written this way (no leak once closed) is in
``tests/interop/test_qcow2_interop.py``.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleece.block.direct import DirectWrite
from fleece.block.node import BlockNode
from fleece.block.qcow2 import create
from fleece.storage import Storage

pytestmark = pytest.mark.timeout(20)

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 64 * MiB


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[Storage, Path]]:
    """``top.qcow2`` (node ``top``) over ``base.raw`` holding 0x11 everywhere."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * SIZE)
    top = tmp_path / "top.qcow2"
    create(str(top), SIZE, backing_file=str(base), backing_format="raw")
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                         "file": {"driver": "file", "filename": str(top)}})
        yield storage, tmp_path


def write_directly(direct: DirectWrite, data: bytes) -> None:
    assert direct.length == len(data)
    assert os.pwrite(direct.fd, data, direct.host) == len(data)


def test_qcow2_maps_the_new_clusters_only_when_finished(
    images: tuple[Storage, Path]
) -> None:
    storage, tmp = images
    top = storage.find_node("top")
    direct = top.begin_direct_write(4 * CLUSTER, 3 * CLUSTER)
    assert direct is not None
    assert direct.host % CLUSTER == 0
    write_directly(direct, b"\x22" * (3 * CLUSTER))
    assert top.pread(4 * CLUSTER, 3 * CLUSTER) == b"\x11" * (3 * CLUSTER)  # not mapped yet
    assert not top.block_status(4 * CLUSTER, CLUSTER).allocated
    direct.finish(True)
    assert top.pread(3 * CLUSTER, 5 * CLUSTER) == (
        b"\x11" * CLUSTER + b"\x22" * (3 * CLUSTER) + b"\x11" * CLUSTER
    )
    status = top.block_status(4 * CLUSTER, 3 * CLUSTER)
    assert status.allocated
    assert status.length == 3 * CLUSTER
    storage.execute("blockdev-del", {"node-name": "top"})
    storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "again",
                                     "file": {"driver": "file",
                                              "filename": str(tmp / "top.qcow2")}})
    assert storage.find_node("again").pread(4 * CLUSTER, 3 * CLUSTER) == b"\x22" * (3 * CLUSTER)


def test_qcow2_abandoned_write_leaves_the_range_as_it_was(
    images: tuple[Storage, Path]
) -> None:
    storage, _ = images
    top = storage.find_node("top")
    direct = top.begin_direct_write(0, CLUSTER)
    assert direct is not None
    write_directly(direct, b"\x33" * CLUSTER)
    direct.finish(False)
    assert top.pread(0, CLUSTER) == b"\x11" * CLUSTER
    assert not top.block_status(0, CLUSTER).allocated
    top.pwrite(0, b"\x44" * CLUSTER)  # the normal path still allocates and maps there
    assert top.pread(0, CLUSTER) == b"\x44" * CLUSTER


def test_qcow2_reservations_in_a_row_are_adjacent_on_the_host(
    images: tuple[Storage, Path]
) -> None:
    storage, _ = images
    top = storage.find_node("top")
    first = top.begin_direct_write(0, 2 * CLUSTER)
    second = top.begin_direct_write(2 * CLUSTER, CLUSTER)
    assert first is not None and second is not None
    assert second.host == first.host + 2 * CLUSTER
    for direct, byte in ((second, b"\x55"), (first, b"\x66")):  # finished out of order
        write_directly(direct, byte * direct.length)
        direct.finish(True)
    assert top.pread(0, 3 * CLUSTER) == b"\x66" * (2 * CLUSTER) + b"\x55" * CLUSTER


def test_qcow2_zero_cluster_without_host_counts_as_not_held(
    images: tuple[Storage, Path]
) -> None:
    storage, _ = images
    top = storage.find_node("top")
    top.pwrite_zeroes(0, CLUSTER, False)
    assert top.pread(0, CLUSTER) == bytes(CLUSTER)
    direct = top.begin_direct_write(0, CLUSTER)
    assert direct is not None
    write_directly(direct, b"\x77" * CLUSTER)
    direct.finish(True)
    assert top.pread(0, CLUSTER) == b"\x77" * CLUSTER


@pytest.mark.parametrize(("offset", "length", "why"), [
    (512, CLUSTER, "not cluster aligned"),
    (0, CLUSTER + 512, "ends inside a cluster"),
    (8 * CLUSTER, 2 * CLUSTER, "touches a cluster the image holds"),
])
def test_qcow2_refuses_what_the_normal_path_must_do(
    images: tuple[Storage, Path], offset: int, length: int, why: str
) -> None:
    storage, _ = images
    top = storage.find_node("top")
    top.pwrite(9 * CLUSTER, b"\x01" * 512)  # the image now holds cluster 9
    assert top.begin_direct_write(offset, length) is None, why
    top.drain()  # nothing left in flight by the refusal


def test_qcow2_refuses_a_range_across_two_l2_tables(tmp_path: Path) -> None:
    path = tmp_path / "small-clusters.qcow2"
    create(str(path), SIZE, cluster_size=4096)  # an L2 table maps 512 clusters: 2 MiB
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "img",
                                         "file": {"driver": "file", "filename": str(path)}})
        node = storage.find_node("img")
        assert node.begin_direct_write(2 * MiB - 4096, 8192) is None
        direct = node.begin_direct_write(2 * MiB, 2 * MiB)  # exactly one table: fine
        assert direct is not None
        direct.finish(False)


def test_qcow2_partial_last_cluster_at_the_end_of_the_image(tmp_path: Path) -> None:
    path = tmp_path / "odd.qcow2"
    create(str(path), 3 * CLUSTER + 4096)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "odd",
                                         "file": {"driver": "file", "filename": str(path)}})
        node = storage.find_node("odd")
        direct = node.begin_direct_write(3 * CLUSTER, 4096)
        assert direct is not None
        write_directly(direct, b"\x88" * 4096)
        direct.finish(True)
        assert node.pread(3 * CLUSTER, 4096) == b"\x88" * 4096


@pytest.mark.parametrize("refcount_bits", [1, 8, 64])
def test_qcow2_refcount_widths(tmp_path: Path, refcount_bits: int) -> None:
    path = tmp_path / "img.qcow2"
    create(str(path), SIZE, refcount_bits=refcount_bits)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "img",
                                         "file": {"driver": "file", "filename": str(path)}})
        node = storage.find_node("img")
        for i in range(4):
            direct = node.begin_direct_write(i * MiB, MiB)
            assert direct is not None
            write_directly(direct, bytes([i + 1]) * MiB)
            direct.finish(True)
        node.pwrite(8 * MiB, b"\x09" * CLUSTER)  # a normal allocation after the reservation
        storage.execute("blockdev-del", {"node-name": "img"})
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "again",
                                         "file": {"driver": "file", "filename": str(path)}})
        again = storage.find_node("again")
        assert again.pread(0, 4 * MiB) == b"".join(bytes([i + 1]) * MiB for i in range(4))
        assert again.pread(8 * MiB, CLUSTER) == b"\x09" * CLUSTER


def test_read_only_node_refuses(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    create(str(path), SIZE)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "ro",
                                         "read-only": True,
                                         "file": {"driver": "file", "filename": str(path)}})
        with pytest.raises(OSError) as info:
            storage.find_node("ro").begin_direct_write(0, CLUSTER)
        assert info.value.errno == errno.EROFS


def test_intercepted_writes_refuse_a_direct_write(images: tuple[Storage, Path]) -> None:
    storage, _ = images
    storage.execute("block-dirty-bitmap-add", {"node": "top", "name": "b0"})
    assert storage.find_node("top").begin_direct_write(0, CLUSTER) is None


def test_a_reserved_write_is_in_flight_until_finished(images: tuple[Storage, Path]) -> None:
    storage, _ = images
    top: BlockNode = storage.find_node("top")
    direct = top.begin_direct_write(0, CLUSTER)
    assert direct is not None
    drained = threading.Event()

    def drain() -> None:
        top.drain()
        drained.set()

    waiter = threading.Thread(target=drain)
    waiter.start()
    assert not drained.wait(0.2)
    write_directly(direct, b"\x99" * CLUSTER)
    direct.finish(True)
    assert drained.wait(5)
    waiter.join(5)


def test_raw_and_file_write_at_the_guest_offset_plus_raws_offset(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4 * MiB))
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "raw", "node-name": "raw", "offset": MiB,
                                         "file": {"driver": "file", "filename": str(path),
                                                  "node-name": "file"}})
        raw, file = storage.find_node("raw"), storage.find_node("file")
        direct = raw.begin_direct_write(4096, 4096)
        assert direct is not None
        assert direct.host == MiB + 4096
        write_directly(direct, b"\xaa" * 4096)
        direct.finish(True)
        assert raw.pread(4096, 4096) == b"\xaa" * 4096
        grow = file.begin_direct_write(4 * MiB, 4096)  # past the end: a file grows
        assert grow is not None and grow.host == 4 * MiB
        write_directly(grow, b"\xbb" * 4096)
        grow.finish(True)
        assert file.size == 4 * MiB + 4096  # the cached size was let go


def test_finish_runs_every_layer_and_raises_the_first_error() -> None:
    ran: list[str] = []

    def failing(name: str) -> Callable[[bool], None]:
        def finisher(written: bool) -> None:
            ran.append(f"{name}:{written}")
            raise OSError(errno.EIO, name)
        return finisher

    direct = DirectWrite(-1, 0, 0, [failing("inner"), lambda w: ran.append(f"mid:{w}"),
                                     failing("outer")])
    with pytest.raises(OSError, match="inner"):
        direct.finish(True)
    assert ran == ["inner:True", "mid:True", "outer:True"]
    direct.finish(True)  # the layers ran once; nothing left to run
    assert len(ran) == 3
