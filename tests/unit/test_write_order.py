"""qcow2 metadata order: deferred targets, and the reservation the driver makes ahead.

What is tested:

- **WriteOrder**: a target written while deferring does not make the next pointer sync; a
  pointer written while still deferring does sync for it; adopting the deferred mark after a
  sync that started later costs no sync, adopting it with none in between costs one.
- **qcow2**: a stream of allocating writes crossing several reservations. Each reservation
  after the first is made ahead and synced in the background, so once those syncs are done
  the writer's pointers need no sync of their own (without it, every reservation's first
  pointer synced: a tenth of a second under a stream of copies). The image reads back what
  was written after a reopen. (``qemu-img check`` of images written across reservations,
  leaks included, is in ``tests/interop/test_qcow2_interop.py``; the power-loss drill checks
  every crash point.)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fleece.block.drivers.qcow2 import Qcow2Driver
from fleece.block.qcow2 import create
from fleece.block.qcow2.order import WriteOrder
from fleece.storage import Storage

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CLUSTER = 64 * 1024


def _order() -> tuple[WriteOrder, list[int]]:
    syncs: list[int] = []
    return WriteOrder(lambda: syncs.append(1)), syncs


def test_a_deferred_target_waits_until_adopted() -> None:
    order, syncs = _order()
    order.begin_deferring()
    order.wrote_target()
    mark = order.end_deferring()
    order.before_pointer()  # a pointer to something else: the deferred target is not its
    assert syncs == []
    order.adopt(mark)
    order.before_pointer()
    assert syncs == [1]


def test_a_sync_after_the_deferred_target_covers_it() -> None:
    order, syncs = _order()
    order.begin_deferring()
    order.wrote_target()
    mark = order.end_deferring()
    order.sync()  # the background sync
    order.adopt(mark)
    order.before_pointer()
    assert syncs == [1]


def test_a_pointer_written_while_deferring_syncs_for_the_deferred_target() -> None:
    order, syncs = _order()
    order.begin_deferring()
    order.wrote_target()  # say, a new refcount block's contents
    order.before_pointer()  # and the table entry that points at it
    assert syncs == [1]
    order.end_deferring()


@pytest.mark.parametrize("child", ["file", "blkdebug"])
def test_a_stream_of_allocating_writes_syncs_only_for_its_first_reservation(
    tmp_path: Path, child: str
) -> None:
    """Every later reservation is made durable ahead of the stream: on a file by its own
    writes (``RWF_DSYNC``), without a sync at all; on a child that cannot make one write
    durable by itself (``blkdebug``), by a sync in the background."""
    image = tmp_path / "stream.qcow2"
    size = 256 * MiB
    create(str(image), size)
    written = 160 * MiB  # reservations of 16, 32, 64 and 128 MiB
    file: dict[str, Any] = {"driver": "file", "filename": str(image)}
    if child == "blkdebug":
        file = {"driver": "blkdebug", "image": file}
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "img", "file": file})
        node = storage.find_node("img")
        driver = node.driver
        assert isinstance(driver, Qcow2Driver)
        order = driver._order
        sync = order._sync
        writer_syncs: list[int] = []
        background_syncs: list[int] = []

        def counted() -> None:
            if threading.current_thread() is threading.main_thread():
                writer_syncs.append(1)
            else:
                background_syncs.append(1)
            sync()

        order._sync = counted
        for offset in range(0, written, CLUSTER):
            node.pwrite(offset, offset.to_bytes(8, "little") * (CLUSTER // 8))
            for thread in threading.enumerate():  # let the background syncs finish
                if thread.name == "fleece-qcow2-reserve":
                    thread.join()
        # The first reservation's first pointer syncs; every later one was durable ahead.
        assert len(writer_syncs) == 1
        assert (len(background_syncs) == 0) == (child == "file")
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "img",
                                         "file": {"driver": "file", "filename": str(image)}})
        node = storage.find_node("img")
        for offset in range(0, written, 37 * CLUSTER):
            assert node.pread(offset, 8) == offset.to_bytes(8, "little")
        assert node.pread(written, CLUSTER) == bytes(CLUSTER)
