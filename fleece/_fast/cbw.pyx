# cython: language_level=3
"""Copy-before-write planning and the cluster range locks, compiled.

Design note: the copy-before-write hook runs on every guest write, so what it decides per
request is done here without the GIL: which clusters of a request still need their old data
copied (runs of clear bits in the shared "done" bitmap, cut to a maximum run length so one copy
is one large I/O), and whether a cluster range can be locked now. A lock is shared (snapshot
reads that go to the source) or exclusive (a copy, and the guest write it precedes); two locks
conflict when their ranges overlap and either is exclusive. Waiting for a conflicting lock is the
caller's job (a ``threading.Condition`` in :mod:`fleece.block.cbw`): this table only answers.
"""

cimport cython
import operator
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.pyport cimport PY_SSIZE_T_MAX

from fleece._fast.bitmap cimport ClusterBitmap


def plan_runs(ClusterBitmap done not None, start, end, max_run):
    """Runs ``(first, count)`` of clusters in ``[start, end)`` whose bit in ``done`` is clear,
    in order, each at most ``max_run`` clusters long.

    ``IndexError`` unless ``0 <= start <= end <= len(done)``; ``ValueError`` unless
    ``max_run > 0``.
    """
    # Checked as Python integers first: a bound past the machine word is out of range like any
    # other (never an OverflowError), and a huge max_run simply means "unbounded".
    start, end, max_run = operator.index(start), operator.index(end), operator.index(max_run)
    if start < 0 or start > end or end > done.nbits:
        raise IndexError(f"cluster range [{start}, {end}) out of range for {done.nbits} clusters")
    if max_run <= 0:
        raise ValueError(f"max_run must be positive, got {max_run}")
    cdef Py_ssize_t first = start, stop = end, limit = min(max_run, max(1, done.nbits))
    runs = []
    cdef Py_ssize_t pos = first, run_start, run_end
    while pos < stop:
        with nogil:
            run_start = done._next(pos, stop, False)
            if run_start != -1:
                run_end = done._next(run_start, stop, True)
                if run_end == -1:
                    run_end = stop
        if run_start == -1:
            break
        pos = run_start
        while pos < run_end:
            runs.append((pos, min(limit, run_end - pos)))
            pos += min(limit, run_end - pos)
    return runs


cdef tuple _bounds(object start, object end):
    """Check a cluster range as Python integers; bounds past the machine word are clamped
    (no cluster number comes near them, so the answer is the same)."""
    start, end = operator.index(start), operator.index(end)
    if start < 0 or end < start:
        raise ValueError(f"bad cluster range [{start}, {end})")
    cdef Py_ssize_t limit = PY_SSIZE_T_MAX
    return min(start, limit), min(end, limit)


cdef class RangeLockTable:
    """Active cluster range locks. Not thread-safe by itself: callers hold one mutex."""

    def __cinit__(self):
        self._capacity = 16
        self._count = 0
        self._next_token = 1
        self._start = <Py_ssize_t *>PyMem_Malloc(self._capacity * sizeof(Py_ssize_t))
        self._end = <Py_ssize_t *>PyMem_Malloc(self._capacity * sizeof(Py_ssize_t))
        self._token = <long long *>PyMem_Malloc(self._capacity * sizeof(long long))
        self._exclusive = <unsigned char *>PyMem_Malloc(self._capacity)
        if not (self._start and self._end and self._token and self._exclusive):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._start)
        PyMem_Free(self._end)
        PyMem_Free(self._token)
        PyMem_Free(self._exclusive)

    def __len__(self):
        return self._count

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef bint _conflicts(self, Py_ssize_t start, Py_ssize_t end, bint exclusive) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self._count):
            if self._start[i] < end and start < self._end[i]:
                if exclusive or self._exclusive[i]:
                    return True
        return False

    def conflicts(self, start, end, bint exclusive):
        """Whether a lock on ``[start, end)`` would conflict with an active one now."""
        cdef Py_ssize_t first, stop
        first, stop = _bounds(start, end)
        return self._conflicts(first, stop, exclusive)

    def try_acquire(self, start_arg, end_arg, bint exclusive):
        """Lock ``[start, end)`` and return a token (> 0), or return 0 on a conflict."""
        cdef Py_ssize_t start, end
        start, end = _bounds(start_arg, end_arg)
        if self._conflicts(start, end, exclusive):
            return 0
        if self._count == self._capacity:
            self._grow()
        cdef Py_ssize_t i = self._count
        self._start[i] = start
        self._end[i] = end
        self._exclusive[i] = exclusive
        self._token[i] = self._next_token
        self._next_token += 1
        self._count += 1
        return self._token[i]

    cdef int _grow(self) except -1:
        cdef Py_ssize_t capacity = self._capacity * 2
        cdef void *p
        p = PyMem_Realloc(self._start, capacity * sizeof(Py_ssize_t))
        if not p:
            raise MemoryError()
        self._start = <Py_ssize_t *>p
        p = PyMem_Realloc(self._end, capacity * sizeof(Py_ssize_t))
        if not p:
            raise MemoryError()
        self._end = <Py_ssize_t *>p
        p = PyMem_Realloc(self._token, capacity * sizeof(long long))
        if not p:
            raise MemoryError()
        self._token = <long long *>p
        p = PyMem_Realloc(self._exclusive, capacity)
        if not p:
            raise MemoryError()
        self._exclusive = <unsigned char *>p
        self._capacity = capacity
        return 0

    def release(self, token):
        """Drop the lock ``token``. ``KeyError`` if it is not held."""
        token = operator.index(token)
        if not 0 < token < self._next_token:
            raise KeyError(f"range lock {token} is not held")
        cdef Py_ssize_t i
        cdef long long wanted = token
        for i in range(self._count):
            if self._token[i] == wanted:
                self._count -= 1
                self._start[i] = self._start[self._count]
                self._end[i] = self._end[self._count]
                self._exclusive[i] = self._exclusive[self._count]
                self._token[i] = self._token[self._count]
                return
        raise KeyError(f"range lock {token} is not held")
