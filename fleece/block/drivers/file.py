"""``file``: a posix file, with positional I/O that releases the GIL.

Zeroes and discards punch holes (``fallocate``); block status comes from ``SEEK_DATA`` /
``SEEK_HOLE``. Locks: QEMU's open-file-description byte-range locks, so fleece and QEMU see each
other. A user needing permission bit ``i`` holds a shared lock on byte ``100 + i``; a permission
nobody may share is marked by a shared lock on byte ``200 + i``. Taking a permission checks that
nobody holds ``200 + i``; refusing to share one checks that nobody holds ``100 + i``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from typing import ClassVar

from fleece.block import nowait
from fleece.block.direct import DirectWrite
from fleece.block.driver import BlockStatus, Driver, Options, Status
from fleece.block.perm import Perm
from fleece.errors import GenericError

_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_LOCK_BITS = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (padded to 32 bytes)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with its mode flags (Python's os module has no mode argument)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _lock_op(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One OFD lock call on ``byte``; returns the l_type the kernel reports back."""
    result = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
    return int(struct.unpack(_FLOCK, result)[0])


def locked_elsewhere(path: str) -> bool:
    """Whether any process (this one too, through another descriptor) holds QEMU's lock bytes
    on ``path``: a file in use must not be truncated or replaced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for base in (_LOCK_PERM_BASE, _LOCK_SHARED_BASE):
            for index in range(len(_LOCK_BITS)):
                if _lock_op(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, base + index) != fcntl.F_UNLCK:
                    return True
        return False
    finally:
        os.close(fd)


class FileOps:
    """The system calls that change a file's contents, as the file driver makes them.

    A seam for tests: a crash simulator (``tests/crashsim.py``) puts a recording subclass in
    :attr:`FileDriver.ops` to log every write and sync. Production uses this class: its
    ``pwritev`` is the plain system call (looking it up costs what ``os.pwritev`` does), the
    rarer calls look theirs up in :mod:`os` when called.
    """

    pwritev = staticmethod(os.pwritev)
    fallocate = staticmethod(fallocate)

    def fdatasync(self, fd: int, /) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, length: int, /) -> None:
        os.ftruncate(fd, length)


class FileDriver(Driver):
    name: ClassVar[str] = "file"
    growable = True
    #: how the driver writes, syncs, punches and truncates (see :class:`FileOps`)
    ops: ClassVar[FileOps] = FileOps()

    fd: int = -1
    path: str = ""
    _size = -1  # cached file size; our own writes keep it current (-1: ask the kernel)

    def open(self, options: Options) -> None:
        self.path = options.required_str("filename")
        options.enum("aio", ("threads", "native", "io_uring"), "threads")
        self.locking = options.enum("locking", ("auto", "on", "off"), "auto") != "off"
        options.bool("drop-cache", True)
        options.bool("x-check-cache-dropped", False)
        flags = os.O_RDONLY if self.node.read_only else os.O_RDWR
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise GenericError(f"Could not open '{self.path}': {exc.strerror}") from exc
        if os.path.isdir(self.path):
            os.close(self.fd)
            self.fd = -1
            raise GenericError(f"Could not open '{self.path}': Is a directory")
        self._held: set[int] = set()  # lock bytes this descriptor holds

    def reopen(self, read_only: bool) -> None:
        """Open the file again with the new access mode, keeping the locks held."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise GenericError(f"Could not reopen '{self.path}': {exc.strerror}") from exc
        for byte in sorted(self._held):
            _lock_op(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        old, self.fd = self.fd, fd
        self.node.drain()  # requests that picked up the old descriptor finish first
        os.close(old)

    # -- locks -------------------------------------------------------------------------------
    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Take the lock bytes for ``perm``/``~shared``; refuse if another process conflicts."""
        if not self.locking or self.fd < 0:
            return
        want: set[int] = set()
        for index, bit in enumerate(_LOCK_BITS):
            if perm & bit:
                want.add(_LOCK_PERM_BASE + index)
            if not shared & bit:
                want.add(_LOCK_SHARED_BASE + index)
        for index, bit in enumerate(_LOCK_BITS):
            if perm & bit and self._locked_by_other(_LOCK_SHARED_BASE + index):
                raise GenericError(
                    f"Failed to get \"{bit.describe()}\" lock: is another process using the "
                    f"image [{self.path}]?"
                )
            if not shared & bit and self._locked_by_other(_LOCK_PERM_BASE + index):
                raise GenericError(
                    f"Failed to get shared \"{bit.describe()}\" lock: is another process using "
                    f"the image [{self.path}]?"
                )
        for byte in sorted(want - self._held):
            _lock_op(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        for byte in sorted(self._held - want):
            _lock_op(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, byte)
        self._held = want

    def _locked_by_other(self, byte: int) -> bool:
        # An OFD lock held through our own descriptor never conflicts with itself.
        return _lock_op(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK

    # -- I/O ---------------------------------------------------------------------------------
    def posix_fd(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def writes_in_place(self) -> bool:
        return type(self.ops) is FileOps  # not while a test records the file's operations

    def punch_hole(self, offset: int, length: int) -> bool:
        if self.node.read_only:
            return False
        try:
            self.ops.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset,
                               length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return False
        return True

    def size(self) -> int:
        size = self._size
        if size < 0:
            size = self._size = os.fstat(self.fd).st_size
        return size

    def refresh_size(self) -> int:
        self._size = -1
        return self.size()

    def filename(self) -> str:
        return self.path

    def preadv(self, offset: int, buf: memoryview) -> None:
        flags = 0
        if nowait.active():
            if not nowait.RWF_NOWAIT:
                raise nowait.WouldBlock
            flags = nowait.RWF_NOWAIT
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done, flags)
            except BlockingIOError:
                raise nowait.WouldBlock from None
            if n == 0:  # end of file: the rest reads as zeroes
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def pwritev(self, offset: int, data: memoryview) -> None:
        self._pwrite_all(offset, data, 0)

    def pwritev_fua(self, offset: int, data: memoryview) -> None:
        """With ``RWF_DSYNC``: the kernel writes back this range alone (and the file's size,
        if it grew), then flushes the disk's cache; the file's other dirty pages stay."""
        self._pwrite_all(offset, data, os.RWF_DSYNC)

    def native_fua(self) -> bool:
        return True

    def _pwrite_all(self, offset: int, data: memoryview, flags: int) -> None:
        done = 0
        while done < len(data):
            done += self.ops.pwritev(self.fd, [data[done:]], offset + done, flags)
        if offset + done > self._size:
            self._size = -1  # grown: ask the kernel (another thread may have grown it more)

    def begin_direct_write(self, offset: int, length: int) -> DirectWrite:
        def written(_ok: bool) -> None:
            self._size = -1  # it may have grown the file
        return DirectWrite(self.fd, offset, length, [written])

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        # Never truncate here: another thread may be extending the file at the same time. A
        # punched hole keeps the size; ZERO_RANGE without KEEP_SIZE only ever grows the file.
        size = self.size()
        inside = max(0, min(offset + length, size) - offset)
        punch = self.ops.fallocate
        try:
            if may_unmap and inside:
                punch(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, inside)
                if inside < length:
                    punch(self.fd, _FALLOC_FL_ZERO_RANGE, offset + inside, length - inside)
            else:
                punch(self.fd, _FALLOC_FL_ZERO_RANGE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            super().pwrite_zeroes(offset, length, may_unmap)
        finally:
            self._size = -1  # ZERO_RANGE may have grown the file

    def pdiscard(self, offset: int, length: int) -> None:
        try:
            self.ops.fallocate(
                self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
            )
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def flush(self) -> None:
        """Make every write that returned before durable (``fdatasync``)."""
        if not self.node.read_only:
            self.ops.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        self.ops.ftruncate(self.fd, size)
        self._size = -1

    def block_status(self, offset: int, length: int) -> BlockStatus:
        end = offset + length
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to the end of the file
                return BlockStatus(offset, length, Status.DATA | Status.ALLOCATED, 1, offset)
            data = end
        if data > offset:
            return BlockStatus(
                offset, min(data, end) - offset, Status.ZERO | Status.ALLOCATED, 1, offset
            )
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        return BlockStatus(
            offset, max(1, min(hole, end) - offset), Status.DATA | Status.ALLOCATED, 1, offset
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops its OFD locks
            self.fd = -1
