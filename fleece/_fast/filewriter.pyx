# cython: boundscheck=False, wraparound=False
"""A native thread that writes buffers into files while Python goes on.

Compiled twin of :mod:`fleece._pure.filewriter`; :mod:`fleece.filewriter` picks one. The writer
thread is plain C: it never takes the GIL, so the Python threads handing it work do not slow down
while it writes (a Python writer thread would contend with them for the GIL on every system
call). Python hands over (fd, offset, buffer) with :meth:`FileWriter.submit`, keeping the buffer
alive until :meth:`FileWriter.reap` returns that write's outcome.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free
from posix.types cimport off_t
from posix.unistd cimport pwrite


cdef int write_all(Slot* slot) noexcept nogil:
    cdef int64_t done = 0
    cdef ssize_t n
    while done < slot.length:
        n = pwrite(slot.fd, slot.data + done, <size_t>(slot.length - done),
                   <off_t>(slot.offset + done))
        if n < 0:
            if errno == EINTR:
                continue
            return errno
        done += n
    return 0


cdef void* writer_main(void* arg) noexcept nogil:
    cdef Ring* ring = <Ring*>arg
    cdef Slot* slot
    while True:
        pthread_mutex_lock(&ring.mutex)
        while ring.written == ring.submitted and not ring.stopping:
            pthread_cond_wait(&ring.changed, &ring.mutex)
        if ring.written == ring.submitted:  # stopping, and everything is written
            pthread_mutex_unlock(&ring.mutex)
            return NULL
        slot = &ring.slots[ring.written % ring.depth]
        pthread_mutex_unlock(&ring.mutex)
        slot.error = write_all(slot)  # the slot is ours until ``written`` moves past it
        pthread_mutex_lock(&ring.mutex)
        ring.written += 1
        pthread_cond_broadcast(&ring.changed)
        pthread_mutex_unlock(&ring.mutex)


cdef class FileWriter:
    """Writes submitted buffers into files, in submission order, in a native thread."""

    def __cinit__(self, int depth=64):
        if depth <= 0:
            raise ValueError(f"a file writer needs a positive depth, got {depth}")
        self.ring = <Ring*>calloc(1, sizeof(Ring))
        if self.ring == NULL:
            raise MemoryError()
        self.ring.slots = <Slot*>calloc(depth, sizeof(Slot))
        if self.ring.slots == NULL:
            free(self.ring)
            self.ring = NULL
            raise MemoryError()
        self.ring.depth = depth
        pthread_mutex_init(&self.ring.mutex, NULL)
        pthread_cond_init(&self.ring.changed, NULL)
        self.buffers = [None] * depth
        if pthread_create(&self.thread, NULL, writer_main, <void*>self.ring) != 0:
            raise OSError("cannot start the file writer thread")
        self.running = True

    def __dealloc__(self):
        if self.ring == NULL:
            return
        if self.running:
            self._stop()
        pthread_cond_destroy(&self.ring.changed)
        pthread_mutex_destroy(&self.ring.mutex)
        free(self.ring.slots)
        free(self.ring)

    @property
    def depth(self) -> int:
        return self.ring.depth

    def outstanding(self) -> int:
        """Writes submitted and not reaped yet (at most ``depth``)."""
        pthread_mutex_lock(&self.ring.mutex)
        cdef uint64_t n = self.ring.submitted - self.ring.reaped
        pthread_mutex_unlock(&self.ring.mutex)
        return n

    def submit(self, int fd, int64_t offset, data) -> int:
        """Queue a write of ``data`` (a contiguous buffer) at ``offset`` of ``fd``; returns its
        ticket. ``RuntimeError`` when ``depth`` writes are outstanding (reap first) or after
        :meth:`close`."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef Ring* ring = self.ring
        cdef uint64_t ticket
        cdef Slot* slot
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        pthread_mutex_lock(&ring.mutex)
        if not self.running or ring.submitted - ring.reaped >= ring.depth:
            pthread_mutex_unlock(&ring.mutex)
            raise RuntimeError("the file writer is closed" if not self.running
                               else "the file writer is full: reap finished writes first")
        ticket = ring.submitted
        slot = &ring.slots[ticket % ring.depth]
        slot.fd = fd
        slot.offset = offset
        slot.data = <const char*>&view[0] if view.shape[0] else NULL
        slot.length = view.shape[0]
        slot.error = 0
        self.buffers[ticket % ring.depth] = view
        ring.submitted += 1
        pthread_cond_broadcast(&ring.changed)
        pthread_mutex_unlock(&ring.mutex)
        return ticket

    def written(self) -> int:
        """How many writes have finished: every ticket below this one."""
        pthread_mutex_lock(&self.ring.mutex)
        cdef uint64_t n = self.ring.written
        pthread_mutex_unlock(&self.ring.mutex)
        return n

    def wait(self, uint64_t ticket) -> None:
        """Block (without the GIL) until write ``ticket`` has finished."""
        cdef Ring* ring = self.ring
        with nogil:
            pthread_mutex_lock(&ring.mutex)
            while ring.written <= ticket and ticket < ring.submitted:
                pthread_cond_wait(&ring.changed, &ring.mutex)
            pthread_mutex_unlock(&ring.mutex)

    def reap(self) -> list:
        """The ``(ticket, errno)`` of every write finished since the last reap, in ticket order
        (errno 0: written whole); their buffers are let go."""
        cdef Ring* ring = self.ring
        cdef list out = []
        cdef uint64_t ticket
        # The mutex is held throughout so that concurrent reaps hand out each outcome once
        # (the writer thread only waits on it; it never needs the GIL we hold).
        pthread_mutex_lock(&ring.mutex)
        for ticket in range(ring.reaped, ring.written):
            out.append((ticket, ring.slots[ticket % ring.depth].error))
            self.buffers[ticket % ring.depth] = None
        ring.reaped = ring.written
        pthread_mutex_unlock(&ring.mutex)
        return out

    def close(self) -> None:
        """Finish the queued writes and stop the thread (reap afterwards for their outcome)."""
        if self.running:
            self._stop()

    cdef void _stop(self):
        cdef Ring* ring = self.ring
        with nogil:
            pthread_mutex_lock(&ring.mutex)
            ring.stopping = True
            pthread_cond_broadcast(&ring.changed)
            pthread_mutex_unlock(&ring.mutex)
            pthread_join(self.thread, NULL)
        self.running = False
