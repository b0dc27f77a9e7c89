# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled qcow2 table kernels: the twin of :mod:`fleece._pure.qcow2meta`, same names, results
and errors.

Tables are ``array('Q')`` in the host's byte order; refcount blocks are the cluster's
``bytearray`` of big-endian counters (sub-byte ones least significant first). Plain loops in C
over both: the daemon running this twin never imports numpy (about 15 MiB of its memory).
"""

import errno

from libc.stdint cimport uint64_t

from fleece.block.qcow2.format import (
    COMPRESSED,
    NORMAL,
    SHARED,
    UNALLOC,
    ZERO,
    CorruptEntry,
)

cdef uint64_t _COMPRESSED_FLAG = 1ULL << 62
cdef uint64_t _COPIED_FLAG = 1ULL << 63
cdef uint64_t _ZERO_FLAG = 1
cdef uint64_t _HOST_MASK = 0x00FFFFFFFFFFFE00ULL
cdef int _UNALLOC = UNALLOC, _ZERO = ZERO, _NORMAL = NORMAL, _SHARED = SHARED
cdef int _COMPRESSED = COMPRESSED


cdef inline int _kind(uint64_t entry) noexcept nogil:
    if entry & _COMPRESSED_FLAG:
        return _COMPRESSED
    if entry & _ZERO_FLAG:
        return _ZERO
    if entry & _HOST_MASK == 0:
        return _UNALLOC
    return _NORMAL if entry & _COPIED_FLAG else _SHARED


def l2_runs(const uint64_t[::1] table, Py_ssize_t i0, Py_ssize_t i1, long long cluster,
            long long cluster_size, bint v3):
    if i0 < 0 or i1 > table.shape[0] or i0 > i1:
        raise IndexError(f"entries [{i0}, {i1}) are outside a table of {table.shape[0]}")
    cdef uint64_t cs = <uint64_t>cluster_size
    cdef Py_ssize_t i, start = i0
    cdef uint64_t entry, host, start_aux = 0
    cdef int kind, start_kind = -1
    runs = []
    if not v3:
        for i in range(i0, i1):
            if _kind(table[i]) == _ZERO:
                raise CorruptEntry("zero cluster flag in a version 2 image")
    for i in range(i0, i1):
        entry = table[i]
        kind = _kind(entry)
        host = entry & _HOST_MASK
        if (kind == _NORMAL or kind == _SHARED) and host & (cs - 1):
            raise CorruptEntry(f"unaligned data cluster offset {host:#x}")
        if start_kind >= 0 and kind == start_kind and kind != _COMPRESSED and (
            (kind != _NORMAL and kind != _SHARED) or start_aux + (i - start) * cs == host
        ):
            continue
        if start_kind >= 0:
            runs.append((start_kind, cluster + start - i0, i - start, start_aux))
        start, start_kind = i, kind
        if kind == _COMPRESSED:
            start_aux = entry
        elif kind == _NORMAL or kind == _SHARED:
            start_aux = host
        else:
            start_aux = 0
    if start_kind >= 0:
        runs.append((start_kind, cluster + start - i0, i1 - start, start_aux))
    return runs


def any_but_zero_flag(const uint64_t[::1] table, Py_ssize_t i0, Py_ssize_t i1):
    if i0 < 0 or i1 > table.shape[0] or i0 > i1:
        raise IndexError(f"entries [{i0}, {i1}) are outside a table of {table.shape[0]}")
    cdef Py_ssize_t i
    for i in range(i0, i1):
        if table[i] >> 1:
            return True
    return False


# -- refcount blocks ------------------------------------------------------------------------
cdef inline uint64_t _get(const unsigned char *b, int order, Py_ssize_t i) noexcept nogil:
    cdef int bits, per, k, width
    cdef uint64_t value = 0
    if order == 4:
        return (<uint64_t>b[2 * i] << 8) | b[2 * i + 1]
    if order >= 3:
        width = 1 << (order - 3)
        for k in range(width):
            value = (value << 8) | b[i * width + k]
        return value
    bits = 1 << order
    per = 8 >> order
    return (b[i // per] >> (bits * (i % per))) & ((1 << bits) - 1)


cdef inline void _put(unsigned char *b, int order, Py_ssize_t i, uint64_t value) noexcept nogil:
    cdef int bits, per, k, width, shift
    if order >= 3:
        width = 1 << (order - 3)
        for k in range(width - 1, -1, -1):
            b[i * width + k] = value & 0xFF
            value >>= 8
        return
    bits = 1 << order
    per = 8 >> order
    shift = bits * (i % per)
    b[i // per] = (b[i // per] & ~(((1 << bits) - 1) << shift)) | (value << shift)


cdef Py_ssize_t _entries(Py_ssize_t nbytes, int order):
    if order < 0 or order > 6:
        raise ValueError(f"refcount order {order} is not 0 to 6")
    return nbytes * 8 >> order


cdef void _check_span(Py_ssize_t first, Py_ssize_t end, Py_ssize_t n) except *:
    if first < 0 or end > n or first > end:
        raise IndexError(f"counters [{first}, {end}) are outside a block of {n}")


def refblock_add(unsigned char[::1] buf, int order, Py_ssize_t first, Py_ssize_t end,
                 delta):
    cdef Py_ssize_t n = _entries(buf.shape[0], order), i
    _check_span(first, end, n)
    cdef uint64_t maximum = 0xFFFFFFFFFFFFFFFFULL >> (64 - (1 << order))
    if abs(delta) > maximum:
        if delta > 0:
            raise OSError(errno.ERANGE, "qcow2 refcount overflow")
        raise OSError(errno.EIO, "qcow2 refcount underflow: the image is corrupt")
    cdef uint64_t d = abs(delta)
    cdef bint up = delta > 0
    if first == end or d == 0:
        return
    cdef unsigned char *b = &buf[0]
    for i in range(first, end):
        if up and _get(b, order, i) > maximum - d:
            raise OSError(errno.ERANGE, "qcow2 refcount overflow")
        if not up and _get(b, order, i) < d:
            raise OSError(errno.EIO, "qcow2 refcount underflow: the image is corrupt")
    for i in range(first, end):
        _put(b, order, i, _get(b, order, i) + d if up else _get(b, order, i) - d)


def refblock_zero_runs(const unsigned char[::1] buf, int order, Py_ssize_t first,
                       Py_ssize_t end):
    cdef Py_ssize_t n = _entries(buf.shape[0], order), i, start = -1
    _check_span(first, end, n)
    runs = []
    if first == end:
        return runs
    cdef const unsigned char *b = &buf[0]
    for i in range(first, end):
        if _get(b, order, i) == 0:
            if start < 0:
                start = i
        elif start >= 0:
            runs.append((start, i - start))
            start = -1
    if start >= 0:
        runs.append((start, end - start))
    return runs


def refblock_next(const unsigned char[::1] buf, int order, Py_ssize_t pos, Py_ssize_t end,
                  bint zero):
    cdef Py_ssize_t n = _entries(buf.shape[0], order), i
    _check_span(pos, end, n)
    if pos == end:
        return end
    cdef const unsigned char *b = &buf[0]
    for i in range(pos, end):
        if (_get(b, order, i) == 0) == zero:
            return i
    return end


def refblock_last_used(const unsigned char[::1] buf, int order):
    cdef Py_ssize_t n = _entries(buf.shape[0], order), i
    if n == 0:
        return -1
    cdef const unsigned char *b = &buf[0]
    for i in range(n - 1, -1, -1):
        if _get(b, order, i):
            return i
    return -1
