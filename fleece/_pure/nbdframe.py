"""Pure-Python twin of :mod:`fleece._fast.nbdframe`: NBD request parsing and reply framing.

It is the oracle the compiled module is tested against and the fallback when
``FLEECE_NO_EXTENSIONS=1``: same names, same results, same errors. Every integer field is
range-checked and an out-of-range value raises ``OverflowError``, as Cython's conversions do.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REQUEST_SIZE = 28
CMD_WRITE = 1

#: one parsed request header: (flags, type, cookie, offset, length)
RequestTuple = tuple[int, int, int, int, int]

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_DATA = struct.Struct(">IHHQIQ")
_HOLE = struct.Struct(">IHHQIQI")
_ERROR = struct.Struct(">IHHQIIH")
_EXTENT = struct.Struct(">II")


class BadMagic(ValueError):
    """A request header does not start with ``NBD_REQUEST_MAGIC``: the stream is lost."""


def _check(value: int, bits: int, what: str) -> int:
    if value < 0:
        raise OverflowError(f"can't convert negative {what} {value} to an unsigned field")
    if value >> bits:
        raise OverflowError(f"{what} {value} too large for a {bits}-bit field")
    return value


def parse_requests(
    buf: bytes | bytearray | memoryview, start: int = 0, end: int = -1
) -> tuple[list[RequestTuple], int]:
    """Parse the request headers in ``buf[start:end]`` (``end=-1``: to the end of ``buf``).

    Returns ``(requests, consumed)``: each request is ``(flags, type, cookie, offset, length)``
    and ``consumed`` counts the bytes of the headers parsed. Parsing stops at a partial header,
    right after a ``WRITE`` header (its payload follows it), and before a header with a bad magic.
    Raises ``BadMagic`` when the first header has a bad magic, and ``IndexError`` when
    ``start``/``end`` do not lie within ``buf``.
    """
    view = memoryview(buf).cast("B")
    size = len(view)
    if end == -1:
        end = size
    if not 0 <= start <= end <= size:
        raise IndexError(f"range [{start}, {end}) out of a buffer of {size} bytes")
    requests: list[RequestTuple] = []
    pos = start
    while end - pos >= REQUEST_SIZE:
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(view, pos)
        if magic != REQUEST_MAGIC:
            if not requests:
                raise BadMagic(f"bad request magic 0x{magic:08x} at byte {pos}")
            break
        requests.append((flags, kind, cookie, offset, length))
        pos += REQUEST_SIZE
        if kind == CMD_WRITE:
            break
    return requests, pos - start


def simple_reply(error: int, cookie: int) -> bytes:
    """A 16-byte simple reply header. ``OverflowError`` for out-of-range fields."""
    return _SIMPLE.pack(
        SIMPLE_REPLY_MAGIC, _check(error, 32, "error"), _check(cookie, 64, "cookie")
    )


def structured_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    """A 20-byte structured reply chunk header. ``OverflowError`` for out-of-range fields."""
    return _STRUCTURED.pack(
        STRUCTURED_REPLY_MAGIC,
        _check(flags, 16, "flags"),
        _check(kind, 16, "type"),
        _check(cookie, 64, "cookie"),
        _check(length, 32, "length"),
    )


def data_chunk_header(flags: int, cookie: int, offset: int, data_length: int) -> bytes:
    """The 28 bytes that precede ``data_length`` bytes of an ``OFFSET_DATA`` chunk."""
    return _DATA.pack(
        STRUCTURED_REPLY_MAGIC,
        _check(flags, 16, "flags"),
        1,
        _check(cookie, 64, "cookie"),
        _check(_check(data_length, 32, "data length") + 8, 32, "length"),
        _check(offset, 64, "offset"),
    )


def hole_chunk(flags: int, cookie: int, offset: int, hole_length: int) -> bytes:
    """A complete 32-byte ``OFFSET_HOLE`` chunk."""
    return _HOLE.pack(
        STRUCTURED_REPLY_MAGIC,
        _check(flags, 16, "flags"),
        2,
        _check(cookie, 64, "cookie"),
        12,
        _check(offset, 64, "offset"),
        _check(hole_length, 32, "hole length"),
    )


def error_chunk(flags: int, cookie: int, error: int, message: bytes) -> bytes:
    """A complete ``ERROR`` chunk carrying ``message`` (at most 65535 bytes)."""
    _check(len(message), 16, "message length")
    return (
        _ERROR.pack(
            STRUCTURED_REPLY_MAGIC,
            _check(flags, 16, "flags"),
            (1 << 15) | 1,
            _check(cookie, 64, "cookie"),
            6 + len(message),
            _check(error, 32, "error"),
            len(message),
        )
        + message
    )


def error_offset_chunk(flags: int, cookie: int, error: int, message: bytes, offset: int) -> bytes:
    """A complete ``ERROR_OFFSET`` chunk: ``message`` then the failing ``offset``."""
    _check(len(message), 16, "message length")
    return (
        _ERROR.pack(
            STRUCTURED_REPLY_MAGIC,
            _check(flags, 16, "flags"),
            (1 << 15) | 2,
            _check(cookie, 64, "cookie"),
            14 + len(message),
            _check(error, 32, "error"),
            len(message),
        )
        + message
        + _check(offset, 64, "offset").to_bytes(8, "big")
    )


def block_status_chunk(
    flags: int, cookie: int, context_id: int, extents: Sequence[tuple[int, int]]
) -> bytes:
    """A complete ``BLOCK_STATUS`` chunk: the context id, then ``(length, flags)`` extents."""
    out = bytearray(
        _STRUCTURED.pack(
            STRUCTURED_REPLY_MAGIC,
            _check(flags, 16, "flags"),
            5,
            _check(cookie, 64, "cookie"),
            _check(4 + 8 * len(extents), 32, "length"),
        )
    )
    out += _check(context_id, 32, "context id").to_bytes(4, "big")
    for length, status in extents:
        out += _EXTENT.pack(_check(length, 32, "extent length"), _check(status, 32, "status"))
    return bytes(out)


__all__ = [
    "BadMagic",
    "RequestTuple",
    "block_status_chunk",
    "data_chunk_header",
    "error_chunk",
    "error_offset_chunk",
    "hole_chunk",
    "parse_requests",
    "simple_reply",
    "structured_header",
]
