"""``null-co``: a device of a given size that drops writes; reads return zeroes.

QEMU leaves the read buffer untouched unless ``read-zeroes`` is set; fleece always fills it with
zeroes (never leak memory contents) but, like QEMU, reports the range as zero only with
``read-zeroes``, so tools that trust block status behave the same.
"""

from __future__ import annotations

from typing import ClassVar

from fleece.block.driver import BlockStatus, Driver, Options, Status

_DEFAULT_SIZE = 1 << 30


class NullDriver(Driver):
    name: ClassVar[str] = "null-co"

    _size = _DEFAULT_SIZE
    read_zeroes = False

    def open(self, options: Options) -> None:
        self._size = options.int("size", _DEFAULT_SIZE, minimum=0) or 0
        self.read_zeroes = options.bool("read-zeroes", False)
        options.int("latency-ns", 0, minimum=0)

    def size(self) -> int:
        return self._size

    def filename(self) -> str:
        return "null-co://"

    def preadv(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    def pwritev(self, offset: int, data: memoryview) -> None:
        pass

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        pass

    def block_status(self, offset: int, length: int) -> BlockStatus:
        flags = Status.ALLOCATED | (Status.ZERO if self.read_zeroes else Status.DATA)
        return BlockStatus(offset, length, flags)
