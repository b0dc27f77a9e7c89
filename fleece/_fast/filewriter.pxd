# A native thread writing buffers into files (see filewriter.pyx).

from libc.stdint cimport int64_t, uint64_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef unsigned long pthread_t
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_create(pthread_t*, void*, void* (*)(void*) noexcept nogil, void*)
    int pthread_join(pthread_t, void**)


cdef struct Slot:
    int fd
    int64_t offset
    const char* data
    int64_t length
    int error  # errno of the write, 0 when it succeeded


cdef struct Ring:
    # Tickets are sequence numbers: ``reaped <= written <= submitted``. Slot ``t % depth`` holds
    # ticket ``t`` from its submit until its reap; the mutex guards the three counters.
    pthread_mutex_t mutex
    pthread_cond_t changed
    Slot* slots
    uint64_t depth
    uint64_t submitted
    uint64_t written
    uint64_t reaped
    bint stopping


cdef class FileWriter:
    cdef Ring* ring
    cdef pthread_t thread
    cdef bint running
    cdef list buffers  # slot -> the memoryview kept alive until its write is reaped

    cdef void _stop(self)
