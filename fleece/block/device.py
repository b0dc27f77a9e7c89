"""Devices: the guest's view of a node, as a hypervisor harness drives it.

A device holds a reference on its node for as long as it is plugged, through a
:class:`~fleece.block.root.Root`: a graph change (a backup inserting its copy-before-write filter)
drains the device and moves it, and each request resolves the node it goes to inside the root's
gate. Its I/O methods are called from many vCPU threads at once and raise ``OSError`` with the
errno on failure.
"""

from __future__ import annotations

from fleece.block import route
from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import Perm
from fleece.block.root import Root

#: device models ``device_add`` accepts; they differ in the guest, not here
DEVICE_DRIVERS = frozenset(
    {"virtio-blk", "virtio-blk-pci", "virtio-blk-device", "scsi-hd", "ide-hd", "nvme", "floppy"}
)


class Device:
    """A plugged guest disk named ``id`` on top of a node.

    Made by ``device_add`` (:meth:`fleece.storage.Storage.device` returns it). Every I/O method
    may be called from many threads at once; each request goes to the node the device is on
    when it starts and finishes there, even if a job inserts a filter meanwhile. Offsets and
    lengths are in bytes; a request past :attr:`size` raises ``OSError``, and so does a failed
    I/O, with its errno.
    """

    def __init__(self, id: str, driver: str, node: BlockNode, *, share_rw: bool = False) -> None:
        """Take a reference on ``node``: it may read, and write unless the node is read-only,
        and lets others read (and write, with ``share_rw``). ``GenericError`` when that
        conflicts with the node's other users."""
        self.id = id
        self.driver = driver
        self.read_only = node.read_only
        perm = Perm.CONSISTENT_READ if self.read_only else Perm.CONSISTENT_READ | Perm.WRITE
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if share_rw:
            shared |= Perm.WRITE
        self._root = Root(
            node.add_user(UserKind.DEVICE, f"attached to device '{id}'", perm, shared)
        )
        self._root.native_route()  # guest reads of mapped ranges skip Python

    def __repr__(self) -> str:
        return f"<Device {self.id!r} on {self.node.name!r}>"

    @property
    def node(self) -> BlockNode:
        """The node the device's I/O goes to (a filter inserted later replaces it)."""
        return self._root.node

    @property
    def user(self) -> NodeUser:
        """The device's reference on its node (kind ``DEVICE``, named in permission errors)."""
        return self._root.user

    @property
    def root(self) -> Root:
        """The drainable root the device's requests go through (graph changes drain it)."""
        return self._root

    @property
    def size(self) -> int:
        """The disk's size in bytes, as the guest sees it."""
        return self.node.size

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``: what the guest's disk holds now."""
        buf = bytearray(length)
        self.pread_into(offset, buf)
        return bytes(buf)

    def pread_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the bytes from ``offset`` (natively, without the GIL, when the
        root's route maps them: see :mod:`fleece.block.route`)."""
        root = self._root
        native = root.route
        if native is not None and offset >= 0 and native.pread_into(offset, buf):
            return
        node = root.begin()
        try:
            node.pread_into(offset, buf)
            if native is not None:
                route.learn(native, node, offset, len(buf))
        finally:
            root.end()

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``. Under fleecing, the old content of clusters not yet
        copied goes to the snapshot first; when that copy fails the write fails too
        (``OSError``) and the disk keeps its old data, unless the backup's ``on-cbw-error``
        is ``break-snapshot``. Durable once :meth:`flush` returns."""
        root = self._root
        native = root.route
        if native is not None and offset >= 0 and native.pwrite_from(offset, data):
            return
        node = root.begin()
        try:
            node.pwrite(offset, data)
            if native is not None:
                route.learn(native, node, offset, len(memoryview(data)), pieces=1)
        finally:
            root.end()

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make ``length`` bytes from ``offset`` read as zeroes (deallocated if ``may_unmap``
        and the node allows it); copy-before-write as for :meth:`pwrite`."""
        root = self._root
        node = root.begin()
        try:
            node.pwrite_zeroes(offset, length, may_unmap)
        finally:
            root.end()

    def pdiscard(self, offset: int, length: int) -> None:
        """Tell the node the range is unused: it may drop it or ignore the hint (its
        ``discard`` option), so the range's content is unspecified afterwards. Data it does
        drop is copied to the snapshot first, as for :meth:`pwrite`."""
        root = self._root
        node = root.begin()
        try:
            node.pdiscard(offset, length)
        finally:
            root.end()

    def flush(self) -> None:
        """Make every write that completed before the call durable (the node's caches and
        metadata written, its file synced)."""
        root = self._root
        node = root.begin()
        try:
            node.flush()
        finally:
            root.end()

    def unplug(self) -> None:
        """Release the node (hot unplug): the device must not be used afterwards. Idempotent;
        ``device_del`` calls it."""
        self._root.release()
