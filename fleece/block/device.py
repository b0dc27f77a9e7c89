"""Devices: the guest's view of a node, as a hypervisor harness drives it.

A device holds a reference on its node for as long as it is plugged, through a
:class:`~fleece.block.root.Root`: a graph change (a backup inserting its copy-before-write filter)
drains the device and moves it, and each request resolves the node it goes to inside the root's
gate. Its I/O methods are called from many vCPU threads at once and raise ``OSError`` with the
errno on failure.
"""

from __future__ import annotations

from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import Perm
from fleece.block.root import Root

#: device models ``device_add`` accepts; they differ in the guest, not here
DEVICE_DRIVERS = frozenset(
    {"virtio-blk", "virtio-blk-pci", "virtio-blk-device", "scsi-hd", "ide-hd", "nvme", "floppy"}
)


class Device:
    """A plugged guest disk named ``id`` on top of a node."""

    def __init__(self, id: str, driver: str, node: BlockNode, *, share_rw: bool = False) -> None:
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

    def __repr__(self) -> str:
        return f"<Device {self.id!r} on {self.node.name!r}>"

    @property
    def node(self) -> BlockNode:
        """The node the device's I/O goes to (a filter inserted later replaces it)."""
        return self._root.node

    @property
    def user(self) -> NodeUser:
        return self._root.user

    @property
    def root(self) -> Root:
        return self._root

    @property
    def size(self) -> int:
        return self.node.size

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(offset, buf)
        return bytes(buf)

    def pread_into(self, offset: int, buf: bytearray | memoryview) -> None:
        root = self._root
        node = root.begin()
        try:
            node.pread_into(offset, buf)
        finally:
            root.end()

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        root = self._root
        node = root.begin()
        try:
            node.pwrite(offset, data)
        finally:
            root.end()

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        root = self._root
        node = root.begin()
        try:
            node.pwrite_zeroes(offset, length, may_unmap)
        finally:
            root.end()

    def pdiscard(self, offset: int, length: int) -> None:
        root = self._root
        node = root.begin()
        try:
            node.pdiscard(offset, length)
        finally:
            root.end()

    def flush(self) -> None:
        root = self._root
        node = root.begin()
        try:
            node.flush()
        finally:
            root.end()

    def unplug(self) -> None:
        """Release the node (hot unplug). Idempotent."""
        self._root.release()
