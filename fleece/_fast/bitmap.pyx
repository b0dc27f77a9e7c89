# cython: language_level=3
"""Compiled cluster bitmap: one bit per cluster in ``uint64`` words (``calloc``'ed).

Design note: every public method validates its arguments with the GIL held and then runs an
unchecked kernel ``with nogil``; the kernels work word by word (masks at the two partial ends,
``memset`` / popcount / count-trailing-zeros in the middle), so a scan over 16 Mi bits touches
2 MiB of memory once. Bit i is bit ``i % 64`` of word ``i // 64`` (little endian, so ``to_bytes``
is the words' memory prefix on little-endian hosts and is byte-swapped otherwise).
"""

cimport cython
from cython.view cimport array as cvarray
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memset

import operator
import sys
from array import array

cdef extern from *:
    """
    static inline int fl_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    static inline int fl_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    """
    int fl_popcount64(unsigned long long x) noexcept nogil
    int fl_ctz64(unsigned long long x) noexcept nogil

cdef uint64_t ALL = <uint64_t>0xFFFFFFFFFFFFFFFF


cdef inline uint64_t span_mask(Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64."""
    cdef uint64_t upper = ALL if hi == 64 else ((<uint64_t>1 << hi) - 1)
    return upper & ~((<uint64_t>1 << lo) - 1)


# -- argument checks, run with the GIL before any kernel ------------------------------------------
# Arguments arrive as Python objects: an integer past the machine word is out of range like any
# other (IndexError naming it, or ValueError for a negative count), never an OverflowError.
cdef Py_ssize_t index_arg(object value, str what, Py_ssize_t nbits) except? -1:
    try:
        return value
    except OverflowError:
        raise IndexError(
            f"{what} {operator.index(value)} out of range for a bitmap of {nbits} bits"
        ) from None


cdef Py_ssize_t count_arg(object value, Py_ssize_t nbits) except? -1:
    try:
        return value
    except OverflowError:
        count = operator.index(value)
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}") from None
        raise IndexError(f"count {count} out of range for a bitmap of {nbits} bits") from None


cdef inline Py_ssize_t check_start(Py_ssize_t nbits, Py_ssize_t start) except -1:
    if start < 0 or start > nbits:
        raise IndexError(f"start {start} out of range for a bitmap of {nbits} bits")
    return start


cdef inline Py_ssize_t check_end(Py_ssize_t nbits, Py_ssize_t start, Py_ssize_t stop) except -1:
    if stop < start or stop > nbits:
        raise IndexError(f"end {stop} out of range [{start}, {nbits}] for a bitmap of {nbits} bits")
    return stop


cdef inline Py_ssize_t check_count(Py_ssize_t nbits, Py_ssize_t start, Py_ssize_t count) except -1:
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    check_start(nbits, start)
    if count > nbits - start:
        raise IndexError(
            f"range [{start}, {start + count}) out of range for a bitmap of {nbits} bits"
        )
    return start + count


cdef class ClusterBitmap:
    """A fixed-size bitmap of ``nbits`` clusters, all clear when made.

    Raises ``ValueError`` for a negative ``nbits``.
    """

    def __cinit__(self, Py_ssize_t nbits):
        if nbits < 0:
            raise ValueError(f"bitmap size must not be negative, got {nbits}")
        self.nbits = nbits
        cdef Py_ssize_t nwords = (nbits + 63) // 64
        # calloc: a large bitmap's zero pages cost no memory until a bit in them is set
        cdef uint64_t *words = <uint64_t *>calloc(max(nwords, 1), 8)
        if words == NULL:
            raise MemoryError()
        cdef cvarray owner = cvarray(shape=(max(nwords, 1),), itemsize=8, format="Q",
                                     allocate_buffer=False)
        owner.data = <char *>words
        owner.callback_free_data = free
        self._array = owner
        self._words = owner[:nwords]
        self._ptr = words if nwords else NULL

    # -- kernels (no GIL, no checks) ------------------------------------------------------------
    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef bint _get(self, Py_ssize_t i) noexcept nogil:
        return (self._ptr[i >> 6] >> (i & 63)) & 1

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef void _assign(self, Py_ssize_t start, Py_ssize_t end, bint value) noexcept nogil:
        cdef Py_ssize_t first, last
        cdef uint64_t mask
        if start >= end:
            return
        first = start >> 6
        last = (end - 1) >> 6
        if first == last:
            mask = span_mask(start & 63, end - (first << 6))
            if value:
                self._ptr[first] |= mask
            else:
                self._ptr[first] &= ~mask
            return
        mask = span_mask(start & 63, 64)
        if value:
            self._ptr[first] |= mask
        else:
            self._ptr[first] &= ~mask
        if last > first + 1:
            memset(&self._ptr[first + 1], 0xFF if value else 0, (last - first - 1) * 8)
        mask = span_mask(0, end - (last << 6))
        if value:
            self._ptr[last] |= mask
        else:
            self._ptr[last] &= ~mask

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _count(self, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
        cdef Py_ssize_t first, last, w, total = 0
        if start >= end:
            return 0
        first = start >> 6
        last = (end - 1) >> 6
        if first == last:
            return fl_popcount64(self._ptr[first] & span_mask(start & 63, end - (first << 6)))
        total = fl_popcount64(self._ptr[first] & span_mask(start & 63, 64))
        for w in range(first + 1, last):
            total += fl_popcount64(self._ptr[w])
        total += fl_popcount64(self._ptr[last] & span_mask(0, end - (last << 6)))
        return total

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _next(self, Py_ssize_t start, Py_ssize_t end, bint value) noexcept nogil:
        """First bit in [start, end) equal to value, or -1."""
        cdef Py_ssize_t w, last
        cdef uint64_t word, flip = 0 if value else ALL
        if start >= end:
            return -1
        w = start >> 6
        last = (end - 1) >> 6
        word = (self._ptr[w] ^ flip) & span_mask(start & 63, 64)
        while True:
            if w == last:
                word &= span_mask(0, end - (last << 6))
                if word:
                    return (w << 6) + fl_ctz64(word)
                return -1
            if word:
                return (w << 6) + fl_ctz64(word)
            w += 1
            word = self._ptr[w] ^ flip

    # -- queries -----------------------------------------------------------------------------
    def __len__(self):
        return self.nbits

    def __eq__(self, other):
        if not isinstance(other, ClusterBitmap):
            return NotImplemented
        cdef ClusterBitmap o = <ClusterBitmap>other
        if self.nbits != o.nbits:
            return False
        return self._ptr == NULL or memcmp(self._ptr, o._ptr, self._words.shape[0] * 8) == 0

    __hash__ = None

    def __repr__(self):
        return f"ClusterBitmap(nbits={self.nbits}, set={self.count()})"

    def get(self, i):
        """Bit ``i``. ``IndexError`` unless ``0 <= i < nbits``."""
        i = index_arg(i, "bit", self.nbits)
        if i < 0 or i >= self.nbits:
            raise IndexError(f"bit {i} out of range for a bitmap of {self.nbits} bits")
        return bool(self._get(i))

    def count(self, start=0, end=None):
        """Number of set bits in ``[start, end)`` (``end`` defaults to ``nbits``)."""
        cdef Py_ssize_t first = check_start(self.nbits, index_arg(start, "start", self.nbits))
        cdef Py_ssize_t stop = self._end_arg(first, end)
        cdef Py_ssize_t result
        with nogil:
            result = self._count(first, stop)
        return result

    def next_set(self, start):
        """First set bit at or after ``start``, or -1."""
        cdef Py_ssize_t first = check_start(self.nbits, index_arg(start, "start", self.nbits))
        cdef Py_ssize_t result
        with nogil:
            result = self._next(first, self.nbits, True)
        return result

    def next_clear(self, start):
        """First clear bit at or after ``start``, or -1."""
        cdef Py_ssize_t first = check_start(self.nbits, index_arg(start, "start", self.nbits))
        cdef Py_ssize_t result
        with nogil:
            result = self._next(first, self.nbits, False)
        return result

    def runs(self, start=0, end=None):
        """Yield ``(start, length, value)`` extents that exactly cover ``[start, end)``."""
        cdef Py_ssize_t first = check_start(self.nbits, index_arg(start, "start", self.nbits))
        cdef Py_ssize_t stop = self._end_arg(first, end)
        return self._runs(first, stop)

    cdef Py_ssize_t _end_arg(self, Py_ssize_t first, object end) except? -1:
        if end is None:
            return self.nbits
        return check_end(self.nbits, first, index_arg(end, "end", self.nbits))

    def _runs(self, Py_ssize_t start, Py_ssize_t stop):
        cdef Py_ssize_t pos = start, nxt
        cdef bint value
        while pos < stop:
            value = self._get(pos)
            with nogil:
                nxt = self._next(pos, stop, not value)
            if nxt == -1:
                nxt = stop
            yield pos, nxt - pos, value
            pos = nxt

    # -- updates -----------------------------------------------------------------------------
    def set_range(self, start, count):
        """Set bits ``[start, start + count)``."""
        cdef Py_ssize_t n = count_arg(count, self.nbits)
        cdef Py_ssize_t first = index_arg(start, "start", self.nbits)
        cdef Py_ssize_t stop = check_count(self.nbits, first, n)
        with nogil:
            self._assign(first, stop, True)

    def clear_range(self, start, count):
        """Clear bits ``[start, start + count)``."""
        cdef Py_ssize_t n = count_arg(count, self.nbits)
        cdef Py_ssize_t first = index_arg(start, "start", self.nbits)
        cdef Py_ssize_t stop = check_count(self.nbits, first, n)
        with nogil:
            self._assign(first, stop, False)

    def merge(self, other):
        """OR ``other`` into this bitmap."""
        if not isinstance(other, ClusterBitmap):
            raise TypeError(f"cannot merge {type(other).__name__} into a compiled ClusterBitmap")
        cdef ClusterBitmap o = <ClusterBitmap>other
        cdef Py_ssize_t w
        if o.nbits != self.nbits:
            raise ValueError(
                f"cannot merge a bitmap of {o.nbits} bits into one of {self.nbits} bits"
            )
        with nogil:
            for w in range((self.nbits + 63) >> 6):
                self._ptr[w] |= o._ptr[w]

    def copy(self):
        """An independent bitmap with the same bits."""
        cdef ClusterBitmap clone = type(self)(self.nbits)
        clone._words[:] = self._words
        return clone

    # -- serialisation -----------------------------------------------------------------------
    def to_bytes(self):
        """``ceil(nbits / 8)`` bytes; bit i is bit ``i % 8`` of byte ``i // 8``."""
        words = array("Q", self._words)  # a copy: swapping it leaves the bitmap as it is
        if sys.byteorder == "big":
            words.byteswap()
        return words.tobytes()[: (self.nbits + 7) // 8]

    @classmethod
    def from_bytes(cls, data, Py_ssize_t nbits):
        """The inverse of :meth:`to_bytes`."""
        if nbits < 0:
            raise ValueError(f"bitmap size must not be negative, got {nbits}")
        raw = memoryview(data).tobytes()
        cdef Py_ssize_t expected = (nbits + 7) // 8
        if len(raw) != expected:
            raise ValueError(f"{len(raw)} bytes given, {expected} needed for {nbits} bits")
        if nbits % 8 and raw[-1] >> (nbits % 8):
            raise ValueError(f"bits set at or past bit {nbits} in the last byte")
        cdef ClusterBitmap bitmap = cls(nbits)
        padded = raw + bytes(bitmap._words.shape[0] * 8 - len(raw))
        words = array("Q", padded)
        if sys.byteorder == "big":
            words.byteswap()
        cdef uint64_t[::1] loaded = words
        bitmap._words[:] = loaded
        return bitmap
