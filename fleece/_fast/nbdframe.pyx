# cython: language_level=3
"""Compiled NBD framing: parse many request headers per buffer, build reply headers.

Design note: the transmission phase of an NBD server spends its Python time on 28-byte request
headers and 16/20-byte reply headers. ``parse_requests`` walks a whole receive buffer in one call
(a typed read-only memoryview, big-endian loads without the GIL held per field) and returns plain
tuples; the builders write each header straight into a fresh ``bytes`` object. The payloads are
never touched here: the server sends header and data as separate buffers. Every function has the
same name, result and errors as its twin in :mod:`fleece._pure.nbdframe`; out-of-range integer
fields raise ``OverflowError`` (Cython's conversion does it at the boundary).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from fleece._pure.nbdframe import BadMagic

cdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668E33EF
    REQUEST_SIZE = 28
    CMD_WRITE = 1


cdef inline void put_u16(unsigned char *p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void put_u32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void put_u64(unsigned char *p, uint64_t v) noexcept nogil:
    put_u32(p, <uint32_t>(v >> 32))
    put_u32(p + 4, <uint32_t>v)


cdef inline uint16_t get_u16(const unsigned char *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t get_u32(const unsigned char *p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8)
            | <uint32_t>p[3])


cdef inline uint64_t get_u64(const unsigned char *p) noexcept nogil:
    return (<uint64_t>get_u32(p) << 32) | get_u32(p + 4)


cdef inline bytes new_bytes(Py_ssize_t size, unsigned char **out):
    cdef bytes result = PyBytes_FromStringAndSize(NULL, size)
    out[0] = <unsigned char *>PyBytes_AS_STRING(result)
    return result


@cython.boundscheck(False)
@cython.wraparound(False)
def parse_requests(const unsigned char[::1] buf not None, Py_ssize_t start=0,
                   Py_ssize_t end=-1):
    """Parse the request headers in ``buf[start:end]`` (``end=-1``: to the end of ``buf``).

    Returns ``(requests, consumed)``: each request is ``(flags, type, cookie, offset, length)``
    and ``consumed`` counts the bytes of the headers parsed. Parsing stops at a partial header,
    right after a ``WRITE`` header (its payload follows it), and before a header with a bad magic.
    Raises ``BadMagic`` when the first header has a bad magic, and ``IndexError`` when
    ``start``/``end`` do not lie within ``buf``.
    """
    cdef Py_ssize_t size = buf.shape[0]
    if end == -1:
        end = size
    if not (0 <= start <= end <= size):
        raise IndexError(f"range [{start}, {end}) out of a buffer of {size} bytes")
    cdef list requests = []
    cdef Py_ssize_t pos = start
    cdef const unsigned char *p
    cdef uint32_t magic
    cdef uint16_t kind
    while end - pos >= REQUEST_SIZE:
        p = &buf[pos]
        magic = get_u32(p)
        if magic != REQUEST_MAGIC:
            if not requests:
                raise BadMagic(f"bad request magic 0x{magic:08x} at byte {pos}")
            break
        kind = get_u16(p + 6)
        requests.append((get_u16(p + 4), kind, get_u64(p + 8), get_u64(p + 16), get_u32(p + 24)))
        pos += REQUEST_SIZE
        if kind == CMD_WRITE:
            break
    return requests, pos - start


def simple_reply(uint32_t error, uint64_t cookie):
    """A 16-byte simple reply header. ``OverflowError`` for out-of-range fields."""
    cdef unsigned char *p
    cdef bytes out = new_bytes(16, &p)
    put_u32(p, SIMPLE_REPLY_MAGIC)
    put_u32(p + 4, error)
    put_u64(p + 8, cookie)
    return out


cdef inline void put_structured(unsigned char *p, uint16_t flags, uint16_t kind, uint64_t cookie,
                                uint32_t length) noexcept nogil:
    put_u32(p, STRUCTURED_REPLY_MAGIC)
    put_u16(p + 4, flags)
    put_u16(p + 6, kind)
    put_u64(p + 8, cookie)
    put_u32(p + 16, length)


def structured_header(uint16_t flags, uint16_t kind, uint64_t cookie, uint32_t length):
    """A 20-byte structured reply chunk header. ``OverflowError`` for out-of-range fields."""
    cdef unsigned char *p
    cdef bytes out = new_bytes(20, &p)
    put_structured(p, flags, kind, cookie, length)
    return out


def data_chunk_header(uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t data_length):
    """The 28 bytes that precede ``data_length`` bytes of an ``OFFSET_DATA`` chunk."""
    if data_length > 0xFFFFFFFF - 8:
        raise OverflowError(f"length {data_length + 8} too large for a 32-bit field")
    cdef unsigned char *p
    cdef bytes out = new_bytes(28, &p)
    put_structured(p, flags, 1, cookie, data_length + 8)
    put_u64(p + 20, offset)
    return out


def hole_chunk(uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t hole_length):
    """A complete 32-byte ``OFFSET_HOLE`` chunk."""
    cdef unsigned char *p
    cdef bytes out = new_bytes(32, &p)
    put_structured(p, flags, 2, cookie, 12)
    put_u64(p + 20, offset)
    put_u32(p + 28, hole_length)
    return out


cdef bytes _error(uint16_t flags, uint16_t kind, uint64_t cookie, uint32_t error,
                  const unsigned char[::1] message, bint with_offset, uint64_t offset):
    cdef Py_ssize_t mlen = message.shape[0]
    if mlen > 0xFFFF:
        raise OverflowError(f"message length {mlen} too large for a 16-bit field")
    cdef Py_ssize_t extra = 8 if with_offset else 0
    cdef unsigned char *p
    cdef bytes out = new_bytes(26 + mlen + extra, &p)
    put_structured(p, flags, kind, cookie, <uint32_t>(6 + mlen + extra))
    put_u32(p + 20, error)
    put_u16(p + 24, <uint16_t>mlen)
    if mlen:
        memcpy(p + 26, &message[0], mlen)
    if with_offset:
        put_u64(p + 26 + mlen, offset)
    return out


def error_chunk(uint16_t flags, uint64_t cookie, uint32_t error, bytes message not None):
    """A complete ``ERROR`` chunk carrying ``message`` (at most 65535 bytes)."""
    return _error(flags, (1 << 15) | 1, cookie, error, message, False, 0)


def error_offset_chunk(uint16_t flags, uint64_t cookie, uint32_t error, bytes message not None,
                       uint64_t offset):
    """A complete ``ERROR_OFFSET`` chunk: ``message`` then the failing ``offset``."""
    return _error(flags, (1 << 15) | 2, cookie, error, message, True, offset)


def block_status_chunk(uint16_t flags, uint64_t cookie, uint32_t context_id, extents):
    """A complete ``BLOCK_STATUS`` chunk: the context id, then ``(length, flags)`` extents."""
    cdef Py_ssize_t n = len(extents)
    if 4 + 8 * n > 0xFFFFFFFF:
        raise OverflowError(f"length {4 + 8 * n} too large for a 32-bit field")
    cdef unsigned char *p
    cdef bytes out = new_bytes(24 + 8 * n, &p)
    put_structured(p, flags, 5, cookie, <uint32_t>(4 + 8 * n))
    put_u32(p + 20, context_id)
    cdef Py_ssize_t i = 0
    cdef uint32_t length, status
    for length, status in extents:
        if i >= n:
            raise ValueError("extents changed size while being framed")
        put_u32(p + 24 + 8 * i, length)
        put_u32(p + 28 + 8 * i, status)
        i += 1
    if i != n:
        raise ValueError("extents changed size while being framed")
    return out
