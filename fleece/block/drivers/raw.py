"""``raw``: a format that is the bytes of its ``file`` child, optionally a window of them."""

from __future__ import annotations

from typing import Any, ClassVar

from fleece.block.direct import DirectWrite
from fleece.block.driver import BlockStatus, Driver, Options
from fleece.block.node import BlockNode
from fleece.block.perm import ChildRole
from fleece.errors import GenericError


class RawDriver(Driver):
    name: ClassVar[str] = "raw"

    file: BlockNode
    offset = 0
    _size: int | None = None

    def open(self, options: Options) -> None:
        graph = self.node.graph
        self.file = graph.open_child(self.node, "file", options.raw("file"), ChildRole.FILE)
        self.offset = options.int("offset", 0, minimum=0) or 0
        self._size = options.int("size", None, minimum=0)
        if self.offset > self.file.size:
            raise GenericError(
                f"The sum of offset ({self.offset}) and size (0) has to be smaller or equal to "
                f"the actual size of the containing file ({self.file.size})"
            )
        if self._size is not None and self.offset + self._size > self.file.size:
            raise GenericError(
                f"The sum of offset ({self.offset}) and size ({self._size}) has to be smaller or "
                f"equal to the actual size of the containing file ({self.file.size})"
            )

    def window(self) -> tuple[BlockNode, int] | None:
        return self.file, self.offset

    def size(self) -> int:
        if self._size is not None:
            return self._size
        return max(0, self.file.size - self.offset)

    def preadv(self, offset: int, buf: memoryview) -> None:
        self.file.pread_into(self.offset + offset, buf)

    def pwritev(self, offset: int, data: memoryview) -> None:
        self.file.pwrite(self.offset + offset, data)

    def native_fua(self) -> bool:
        return self.file.native_fua()  # a window: its file's writes are its own

    def pwritev_fua(self, offset: int, data: memoryview) -> None:
        self.file.pwrite(self.offset + offset, data, fua=True)

    def begin_direct_write(self, offset: int, length: int) -> DirectWrite | None:
        return self.file.begin_direct_write(self.offset + offset, length)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.file.pwrite_zeroes(self.offset + offset, length, may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        self.file.pdiscard(self.offset + offset, length)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        status = self.file.block_status(self.offset + offset, length)
        host = None if status.host_offset is None else status.host_offset
        return BlockStatus(offset, status.length, status.flags, 1, host)

    def image_info(self) -> dict[str, Any]:
        return {}
