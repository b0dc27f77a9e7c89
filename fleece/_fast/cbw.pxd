# Copy-before-write planning and range locks (see cbw.pyx).

from fleece._fast.bitmap cimport ClusterBitmap


cdef class RangeLockTable:
    cdef Py_ssize_t *_start
    cdef Py_ssize_t *_end
    cdef long long *_token
    cdef unsigned char *_exclusive
    cdef Py_ssize_t _count
    cdef Py_ssize_t _capacity
    cdef long long _next_token

    cdef bint _conflicts(self, Py_ssize_t start, Py_ssize_t end, bint exclusive) noexcept nogil
    cdef int _grow(self) except -1
