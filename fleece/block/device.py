"""Devices: the guest's view of a node, as a hypervisor harness drives it.

A device holds a reference on its node for as long as it is plugged. Its I/O methods are called
from many vCPU threads at once; they go straight to the node (which is thread-safe) and raise
``OSError`` with the errno on failure.
"""

from __future__ import annotations

from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import Perm

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
        self._user: NodeUser = node.add_user(
            UserKind.DEVICE, f"attached to device '{id}'", perm, shared
        )
        self._user.mover = self.move_to

    def __repr__(self) -> str:
        return f"<Device {self.id!r} on {self.node.name!r}>"

    @property
    def node(self) -> BlockNode:
        """The node the device's I/O goes to (a filter inserted later replaces it)."""
        return self._user.node

    @property
    def user(self) -> NodeUser:
        return self._user

    def move_to(self, node: BlockNode) -> None:
        """Point the device at ``node`` (a filter inserted above its old node)."""
        old = self._user
        self._user = node.add_user(old.kind, old.description, old.perm, old.shared)
        self._user.mover = self.move_to
        old.release()

    @property
    def size(self) -> int:
        return self.node.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.node.pread(offset, length)

    def pread_into(self, offset: int, buf: bytearray | memoryview) -> None:
        self.node.pread_into(offset, buf)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.node.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.node.pwrite_zeroes(offset, length, may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        self.node.pdiscard(offset, length)

    def flush(self) -> None:
        self.node.flush()

    def unplug(self) -> None:
        """Release the node (hot unplug). Idempotent."""
        self._user.release()
