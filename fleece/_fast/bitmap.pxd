# Declarations of the compiled cluster bitmap, for other _fast modules to cimport
# (the copy-before-write planner works on the words directly, without the GIL).

from libc.stdint cimport uint64_t


cdef class ClusterBitmap:
    cdef readonly Py_ssize_t nbits
    cdef object _array           # the cython.view.array that owns the (calloc'ed) words
    cdef uint64_t[::1] _words    # a typed view of _array
    cdef uint64_t *_ptr          # &_words[0], or NULL for an empty bitmap
    # native writers that found bits set here and waited for them to clear (atomic adds)
    cdef readonly unsigned long long waits

    # The unchecked kernels: the callers have validated 0 <= start <= end <= nbits.
    cdef bint _get(self, Py_ssize_t i) noexcept nogil
    cdef void _assign(self, Py_ssize_t start, Py_ssize_t end, bint value) noexcept nogil
    cdef Py_ssize_t _count(self, Py_ssize_t start, Py_ssize_t end) noexcept nogil
    cdef Py_ssize_t _next(self, Py_ssize_t start, Py_ssize_t end, bint value) noexcept nogil
    cdef Py_ssize_t _end_arg(self, Py_ssize_t first, object end) except? -1
