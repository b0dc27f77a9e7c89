"""Type stubs for the compiled NBD framing (fleece/_fast/nbdframe.pyx)."""

from collections.abc import Sequence

from fleece._pure.nbdframe import BadMagic as BadMagic

RequestTuple = tuple[int, int, int, int, int]

def parse_requests(
    buf: bytes | bytearray | memoryview, start: int = 0, end: int = -1
) -> tuple[list[RequestTuple], int]:
    """Parse the request headers in ``buf[start:end]``; ``(requests, consumed)``.
    Stops at a partial header, after a WRITE header, and before a bad magic.
    ``BadMagic`` when the first header is bad; ``IndexError`` for a bad range."""
def simple_reply(error: int, cookie: int) -> bytes:
    """A 16-byte simple reply header. ``OverflowError`` for out-of-range fields."""
def structured_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    """A 20-byte structured reply chunk header."""
def data_chunk_header(flags: int, cookie: int, offset: int, data_length: int) -> bytes:
    """The 28 bytes that precede ``data_length`` bytes of an ``OFFSET_DATA`` chunk."""
def hole_chunk(flags: int, cookie: int, offset: int, hole_length: int) -> bytes:
    """A complete 32-byte ``OFFSET_HOLE`` chunk."""
def error_chunk(flags: int, cookie: int, error: int, message: bytes) -> bytes:
    """A complete ``ERROR`` chunk carrying ``message`` (at most 65535 bytes)."""
def error_offset_chunk(flags: int, cookie: int, error: int, message: bytes, offset: int) -> bytes:
    """A complete ``ERROR_OFFSET`` chunk: ``message`` then the failing ``offset``."""
def block_status_chunk(
    flags: int, cookie: int, context_id: int, extents: Sequence[tuple[int, int]]
) -> bytes:
    """A complete ``BLOCK_STATUS`` chunk: the context id, then ``(length, flags)`` extents."""
