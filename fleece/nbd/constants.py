"""The numbers of the NBD protocol (NetworkBlockDevice ``doc/proto.md``).

Flags are :class:`enum.IntFlag`; codes are :class:`enum.IntEnum`. Every value here is on the
wire, big endian, and must never change.
"""

from __future__ import annotations

import enum
import errno

#: ``NBDMAGIC``, the first eight bytes the server sends
NBDMAGIC = 0x4E42444D41474943
#: ``IHAVEOPT``: newstyle negotiation, and the magic of every option the client sends
IHAVEOPT = 0x49484156454F5054
#: the magic of every option reply
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REQUEST_HEADER_SIZE = 28
SIMPLE_REPLY_SIZE = 16
STRUCTURED_HEADER_SIZE = 20

#: the largest READ/WRITE payload fleece accepts (and advertises as maximum block size)
MAX_PAYLOAD = 32 * 1024 * 1024
#: the largest option payload accepted during negotiation; longer ones disconnect
MAX_OPTION_LENGTH = 64 * 1024
#: the longest export or meta context name (the spec's limit is 4096 bytes)
MAX_NAME_LENGTH = 4096
#: the longest error message sent in a structured ERROR chunk
MAX_ERROR_MESSAGE = 4096


class HandshakeFlag(enum.IntFlag):
    """What the server's greeting advertises (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """What the client answers to the greeting (32 bits); any other bit disconnects."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """The export's flags (16 bits). ``HAS_FLAGS`` is always set."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Opt(enum.IntEnum):
    """Option types of the negotiation phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; the ``ERR_*`` ones have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


class Info(enum.IntEnum):
    """Information types of ``NBD_OPT_INFO``/``NBD_OPT_GO``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """Request flags (16 bits)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags (16 bits)."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types; the error types have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class NBDErr(enum.IntEnum):
    """The error values a reply may carry (the spec fixes them; they are Linux's numbers)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationFlag(enum.IntFlag):
    """``base:allocation`` extent flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class DirtyFlag(enum.IntFlag):
    """``qemu:dirty-bitmap:NAME`` extent flags."""

    DIRTY = 1 << 0


BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

_ERRNO_TO_NBD: dict[int, NBDErr] = {
    errno.EPERM: NBDErr.EPERM,
    errno.EACCES: NBDErr.EPERM,
    errno.EROFS: NBDErr.EPERM,
    errno.EIO: NBDErr.EIO,
    errno.ENOMEM: NBDErr.ENOMEM,
    errno.EINVAL: NBDErr.EINVAL,
    errno.ENOSPC: NBDErr.ENOSPC,
    errno.EDQUOT: NBDErr.ENOSPC,
    errno.EFBIG: NBDErr.ENOSPC,
    errno.EOVERFLOW: NBDErr.EOVERFLOW,
    errno.ENOTSUP: NBDErr.ENOTSUP,
    errno.EOPNOTSUPP: NBDErr.ENOTSUP,
    errno.ESHUTDOWN: NBDErr.ESHUTDOWN,
}


def nbd_error(err: int | None) -> NBDErr:
    """The NBD error for a host ``errno`` (``EIO`` for anything the spec has no value for)."""
    if err is None:
        return NBDErr.EIO
    return _ERRNO_TO_NBD.get(err, NBDErr.EIO)
