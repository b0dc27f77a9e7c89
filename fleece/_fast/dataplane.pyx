# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native data plane: NBD transmission without the GIL for ranges whose mapping it knows.

Design note: once a plain NBD connection enters transmission, a :class:`Plane` owns its socket
(a duplicate of the transport's descriptor) in a thread of its own. That thread reads the
requests, answers a READ by itself when the export's :class:`Route` maps the whole range onto
host files (``sendfile`` from each file after the header when the extents are settled and may
be sent without a copy, else ``pread`` into one buffer, header in front, one ``writev``), and
hands every other request, as the bytes the client sent (a WRITE's payload as it arrives), to
Python through one callback: the Python side feeds them to its sans-I/O protocol, which
validates and runs them as before (writes, zeroes, trims, flushes, block status, errors, and
the reads the route cannot map). Python answers through :meth:`Plane.send`, so all replies
leave through this object's one lock and never interleave (while a ``sendfile`` reply streams,
they queue behind it).

The route is the native view of an export's node: sorted extents ``[start, end) -> (fd,
host)``, learned by Python (which asks the drivers, ``Driver.host_map``) and dropped by Python
whenever a mapping may change (a discard, a zero write, a drained section, the node's close).
A native read counts itself in flight on the route from its look-up to the end of its
``pread`` (or ``sendfile``); :meth:`Route.invalidate` clears the extents and waits for those
reads, so a cluster that a discard frees cannot be reused under a reader. Pages ``sendfile``
handed to the socket are read by the client later: they are used only where no page is ever
rewritten for other data (``HostMap.zero_copy``: a qcow2 image punches its freed clusters out
of the file, which detaches their pages). A generation number, bumped by every invalidation,
makes a learner that raced with one drop what it learned.

Back-pressure: while Python holds a batch, the thread goes on serving what it can and gathers
the next batch, up to ``FB_HIGH`` bytes; it stops reading while Python paused the connection
(its budget). Replies the socket does not take at once wait in an outbox that this thread
flushes when the socket becomes writable. A read served behind queued replies could not
stream with ``sendfile`` (it would be copied into the outbox), so while replies wait there
the plane *serves* no request, but it goes on *receiving* them into its input buffer: a
client may send all its requests before it reads a reply, and would otherwise block in its
send while the plane waits for it to read. Once that buffer is full the plane serves behind
the queued replies after all, up to ``OUTBOX_HIGH`` of them; past that the client must read.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

from fleece._fast.bitmap cimport ClusterBitmap
from fleece._fast.nbdframe cimport get_u16, get_u32, get_u64, put_u16, put_u32, put_u64

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR
    int EWOULDBLOCK
    int EINVAL
    int ENOSYS
    int EOPNOTSUPP

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, long offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, long offset)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)
    int dup(int fd)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    int MSG_DONTWAIT

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, long *offset, size_t count)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT
    short POLLERR
    short POLLHUP

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec *req, timespec *rem)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_broadcast(pthread_cond_t *c)

cdef extern from *:
    """
    static unsigned long long fleece_native_served = 0;
    static inline void fleece_count_native(void) {
        __atomic_fetch_add(&fleece_native_served, 1, __ATOMIC_RELAXED);
    }
    static inline unsigned long long fleece_native_count(void) {
        return __atomic_load_n(&fleece_native_served, __ATOMIC_RELAXED);
    }
    static unsigned long long fleece_sendfile_sent = 0;
    static inline void fleece_count_sendfile(unsigned long long n) {
        __atomic_fetch_add(&fleece_sendfile_sent, n, __ATOMIC_RELAXED);
    }
    static inline unsigned long long fleece_sendfile_count(void) {
        return __atomic_load_n(&fleece_sendfile_sent, __ATOMIC_RELAXED);
    }
    static unsigned long long fleece_progress_reported = 0;
    static inline void fleece_count_progress(void) {
        __atomic_fetch_add(&fleece_progress_reported, 1, __ATOMIC_RELAXED);
    }
    static inline unsigned long long fleece_progress_count(void) {
        return __atomic_load_n(&fleece_progress_reported, __ATOMIC_RELAXED);
    }
    """
    void fleece_count_native() nogil
    unsigned long long fleece_native_count() nogil
    void fleece_count_sendfile(unsigned long long n) nogil
    unsigned long long fleece_sendfile_count() nogil
    void fleece_count_progress() nogil
    unsigned long long fleece_progress_count() nogil

cdef extern from *:
    """
    static inline uint64_t fleece_load_word(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline int fleece_ctz64(uint64_t word) { return __builtin_ctzll(word); }
    static inline void fleece_add_relaxed(unsigned long long *p, unsigned long long n) {
        __atomic_fetch_add(p, n, __ATOMIC_RELAXED);
    }
    """
    uint64_t fleece_load_word(const uint64_t *p) nogil
    int fleece_ctz64(uint64_t word) nogil
    void fleece_add_relaxed(unsigned long long *p, unsigned long long n) nogil


# -- NBD wire constants (see fleece.nbd.constants; the spec fixes them) ------------------------
cdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_MAGIC = 0x67446698
    STRUCTURED_MAGIC = 0x668E33EF
    REQUEST_SIZE = 28
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_BLOCK_STATUS = 7
    FLAG_REQ_ONE = 8
    CHUNK_BLOCK_STATUS = 5
    FLAG_FUA = 1
    FLAG_DF = 4
    CHUNK_OFFSET_DATA = 1
    REPLY_DONE = 1
    MAX_PAYLOAD = 32 * 1024 * 1024
    #: the receive buffer (it grows to hold one WRITE with its payload, then shrinks back)
    INBUF_SIZE = 256 * 1024
    #: stop taking requests while this many bytes wait to be handed to Python
    FB_HIGH = 1024 * 1024
    #: with its input buffer full, the plane serves behind queued replies until this many
    #: bytes of them wait (see the module note)
    OUTBOX_HIGH = 512 * 1024
    #: Python's replies smaller than this are sent without letting the GIL go
    SEND_WITH_GIL = 64 * 1024
    #: the largest reply buffer a plane keeps for reuse (qemu-img reads 2 MiB at a time)
    SPARE_MAX = 2 * 1024 * 1024 + 64
    #: a native read maps onto at most this many host extents (more: Python reads it)
    MAX_SEGMENTS = 16
    #: reads from this size on go out with ``sendfile`` when their extents are settled: the
    #: kernel hands the page cache's pages to the socket (to a unix socket without a copy
    #: since Linux 6.5), where ``pread`` + ``writev`` copy every byte twice
    SENDFILE_MIN = 32 * 1024
    #: a streaming reply waits this long at a time for the socket to take more
    STREAM_WAIT_MS = 20
    #: a route forgets everything it learned when it holds this many extents
    MAX_EXTENTS = 1 << 16
    #: a write to clusters whose copy is under way looks again after this long ...
    PENDING_WAIT_US = 50
    #: ... for at most this long (a 2 MiB piece copies in 1-2 ms here), then goes to Python
    PENDING_WAIT_MAX_US = 20000


def native_requests():
    """How many NBD requests the native planes served without Python, process-wide."""
    return fleece_native_count()


def sendfile_bytes():
    """How many bytes of read replies the native planes sent with ``sendfile``, process-wide
    (the rest of their read replies were copied through a buffer)."""
    return fleece_sendfile_count()


def progress_reports():
    """How many times the native planes woke Python to say queued replies left (each takes
    the GIL and a turn of the event loop), process-wide."""
    return fleece_progress_count()


# -- the route ---------------------------------------------------------------------------------
cdef struct Extent:
    int64_t start
    int64_t end
    int64_t host
    int fd
    # A guarded extent (a snapshot's read-through to its source) holds only for clusters
    # whose bit in ``done`` is clear; done is NULL for a settled one.
    const uint64_t *done
    int64_t done_bits
    int64_t cluster
    # every node on the way takes a write here in place, with no bookkeeping of its own
    bint writable
    # copy-before-write's copied bitmap when writes may go here only to copied clusters (of
    # copied_cluster bytes); NULL when the writable flag alone decides
    const uint64_t *copied
    int64_t copied_bits
    int64_t copied_cluster
    # with copied: the clusters whose copy is under way (as many bits), which a write may
    # wait for; NULL when a write finding uncopied clusters goes to Python at once
    const uint64_t *pending
    # with pending: that bitmap's count of the writes that waited for it
    unsigned long long *pending_waits
    # a reply may hand the pages to the socket (sendfile): they never hold other data
    bint zero_copy
    # the export's block status says "data" here (base:allocation 0) while the extent holds
    bint data


cdef struct Segment:
    int fd
    int64_t host
    int64_t length
    int64_t guest
    const uint64_t *done
    int64_t done_bits
    int64_t cluster
    bint zero_copy


cdef int64_t _first_done(const Segment *seg) noexcept nogil:
    """Where the first copied cluster of the segment starts (its end when none is; its start
    when it reaches past the bitmap: not the snapshot's to vouch for). The words are read
    with acquire loads: a copy sets the bit before the guest's write reaches the source."""
    cdef int64_t first = seg.guest // seg.cluster
    cdef int64_t end = (seg.guest + seg.length + seg.cluster - 1) // seg.cluster
    cdef int64_t w, hi
    cdef uint64_t word
    if end > seg.done_bits:
        return seg.guest
    while first < end:
        w = first >> 6
        hi = min(64, end - (w << 6))
        word = fleece_load_word(seg.done + w) & ((~<uint64_t>0) << (first & 63))
        if hi < 64:
            word &= (<uint64_t>1 << hi) - 1
        if word:
            return max(seg.guest, ((w << 6) + fleece_ctz64(word)) * seg.cluster)
        first = (w + 1) << 6
    return seg.guest + seg.length


cdef inline bint _any_done(const Segment *seg) noexcept nogil:
    """Some cluster the segment covers is copied."""
    return _first_done(seg) < seg.guest + seg.length


cdef bint _all_copied(const Extent *ext, int64_t offset, int64_t length,
                      bint or_pending=False) noexcept nogil:
    """Every cluster of ``[offset, offset + length)`` (route offsets, which index the
    extent's copied bitmap) is copied (``or_pending``: or its copy under way). A set copied
    bit stays set while the extent holds, so a write that saw it needs no lock; the acquire
    loads order it after the copy."""
    cdef int64_t first = offset // ext.copied_cluster
    cdef int64_t end = (offset + length + ext.copied_cluster - 1) // ext.copied_cluster
    cdef int64_t w, hi
    cdef uint64_t want
    if end > ext.copied_bits:
        return False
    while first < end:
        w = first >> 6
        hi = min(64, end - (w << 6))
        want = (~<uint64_t>0) << (first & 63)
        if hi < 64:
            want &= (<uint64_t>1 << hi) - 1
        if or_pending:
            if (fleece_load_word(ext.copied + w) | fleece_load_word(ext.pending + w)) & (
                    want) != want:
                return False
        elif fleece_load_word(ext.copied + w) & want != want:
            return False
        first = (w + 1) << 6
    return True


cdef class Route:
    """What an export's (or a device's) node maps where, natively (see the module's note).

    Thread-safe: every method takes the route's own mutex; :meth:`invalidate` and
    :meth:`close` wait, without the GIL, for the native reads in flight.
    """

    cdef pthread_mutex_t _lock
    cdef pthread_cond_t _idle
    cdef Extent *_ext
    cdef Py_ssize_t _n
    cdef Py_ssize_t _cap
    cdef long _in_flight
    cdef unsigned long long _gen
    cdef int _closed
    cdef dict _guards  # the bitmaps guarded extents point into, kept alive
    cdef object __weakref__

    def __cinit__(self):
        pthread_mutex_init(&self._lock, NULL)
        pthread_cond_init(&self._idle, NULL)
        self._cap = 64
        self._guards = {}
        self._ext = <Extent *>malloc(self._cap * sizeof(Extent))
        if self._ext == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._ext)
        pthread_cond_destroy(&self._idle)
        pthread_mutex_destroy(&self._lock)

    @property
    def generation(self):
        """Read before learning; :meth:`add` refuses what was learned under an older one."""
        cdef unsigned long long gen
        with nogil:
            pthread_mutex_lock(&self._lock)
            gen = self._gen
            pthread_mutex_unlock(&self._lock)
        return gen

    def __len__(self):
        return self._n

    def add(self, unsigned long long generation, int64_t start, int64_t length, int fd,
            int64_t host, ClusterBitmap unless_done=None, int64_t cluster=0,
            bint writable=False, bint data=False, ClusterBitmap write_guard=None,
            bint zero_copy=False, ClusterBitmap write_pending=None):
        """Learn that ``[start, start + length)`` reads as ``fd`` at ``host`` (with
        ``unless_done``: only the clusters of ``cluster`` bytes whose bit is clear there, a
        snapshot's read-through to its source; ``writable``: and a write may go there
        directly; ``data``: and the export's block status calls it data; ``write_guard``: a
        copied bitmap of ``cluster``-byte clusters, indexed by the route's offsets, and a
        write may go there only where all its clusters are set; ``zero_copy``: a reply may
        send the pages with ``sendfile``, see ``HostMap.zero_copy``; ``write_pending``: with
        ``write_guard``, the clusters whose copy is under way, as many, which a write may
        wait for, see ``HostMap.write_pending``). Ignored (False) when
        the route was invalidated or closed since ``generation`` was read."""
        if length <= 0 or start < 0 or host < 0 or fd < 0:
            raise ValueError(f"bad extent {start}+{length} -> fd {fd} at {host}")
        cdef const uint64_t *done = NULL
        cdef int64_t done_bits = 0
        cdef const uint64_t *copied = NULL
        cdef int64_t copied_bits = 0
        cdef const uint64_t *pending = NULL
        cdef unsigned long long *pending_waits = NULL
        if unless_done is not None or write_guard is not None:
            if cluster <= 0:
                raise ValueError(f"bad cluster size {cluster}")
        if unless_done is not None:
            if unless_done.nbits == 0 or unless_done._ptr == NULL:
                return False
            self._guards[id(unless_done)] = unless_done
            done, done_bits = unless_done._ptr, unless_done.nbits
        if write_guard is not None and writable and done == NULL:
            if write_guard.nbits == 0 or write_guard._ptr == NULL:
                writable = False
            else:
                self._guards[id(write_guard)] = write_guard
                copied, copied_bits = write_guard._ptr, write_guard.nbits
                if (write_pending is not None and write_pending.nbits == copied_bits
                        and write_pending._ptr != NULL):
                    self._guards[id(write_pending)] = write_pending
                    pending = write_pending._ptr
                    pending_waits = &write_pending.waits
        cdef bint added
        with nogil:
            pthread_mutex_lock(&self._lock)
            added = generation == self._gen and not self._closed
            if added:
                added = self._insert(start, start + length, fd, host, done, done_bits,
                                     cluster, writable and done == NULL, data, copied,
                                     copied_bits, pending, pending_waits, zero_copy)
            pthread_mutex_unlock(&self._lock)
        return added

    cdef bint _insert(self, int64_t start, int64_t end, int fd, int64_t host,
                      const uint64_t *done, int64_t done_bits, int64_t cluster,
                      bint writable, bint data, const uint64_t *copied,
                      int64_t copied_bits, const uint64_t *pending,
                      unsigned long long *pending_waits,
                      bint zero_copy) noexcept nogil:
        """Insert, replacing what the new extent overlaps (lock held)."""
        cdef Py_ssize_t lo, hi, i, keep
        cdef Extent *grown
        if self._n >= MAX_EXTENTS:
            self._n = 0  # forget everything: it is learned again as it is read
        # first extent ending after start
        lo = self._first_ending_after(start)
        hi = lo
        while hi < self._n and self._ext[hi].start < end:
            hi += 1
        # the overlapped extents [lo, hi) may stick out on either side: keep those parts
        cdef Extent head, tail
        cdef bint has_head = False, has_tail = False
        if lo < hi and self._ext[lo].start < start:
            head = self._ext[lo]
            head.end = start
            has_head = True
        if lo < hi and self._ext[hi - 1].end > end:
            tail = self._ext[hi - 1]
            tail.host += end - tail.start
            tail.start = end
            has_tail = True
        keep = has_head + 1 + has_tail
        if self._n - (hi - lo) + keep > self._cap:
            grown = <Extent *>realloc(self._ext, 2 * self._cap * sizeof(Extent))
            if grown == NULL:
                return False
            self._ext = grown
            self._cap *= 2
        memmove(&self._ext[lo + keep], &self._ext[hi], (self._n - hi) * sizeof(Extent))
        self._n += keep - (hi - lo)
        i = lo
        if has_head:
            self._ext[i] = head
            i += 1
        self._ext[i].start = start
        self._ext[i].end = end
        self._ext[i].fd = fd
        self._ext[i].host = host
        self._ext[i].done = done
        self._ext[i].done_bits = done_bits
        self._ext[i].cluster = cluster
        self._ext[i].writable = writable
        self._ext[i].data = data
        self._ext[i].copied = copied
        self._ext[i].copied_bits = copied_bits
        self._ext[i].copied_cluster = cluster
        self._ext[i].pending = pending
        self._ext[i].pending_waits = pending_waits
        self._ext[i].zero_copy = zero_copy
        i += 1
        if has_tail:
            self._ext[i] = tail
        return True

    cdef Py_ssize_t _first_ending_after(self, int64_t offset) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self._ext[mid].end <= offset:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def invalidate(self):
        """Forget every mapping, and wait until no native read uses one (GIL released)."""
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._n = 0
            self._gen += 1
            while self._in_flight:
                pthread_cond_wait(&self._idle, &self._lock)
            pthread_mutex_unlock(&self._lock)

    def close(self):
        """Admit no native request (a drained section): forget, and wait for those in flight."""
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._closed += 1
            self._n = 0
            self._gen += 1
            while self._in_flight:
                pthread_cond_wait(&self._idle, &self._lock)
            pthread_mutex_unlock(&self._lock)

    def open(self):
        """End what :meth:`close` began (sections nest)."""
        with nogil:
            pthread_mutex_lock(&self._lock)
            if self._closed:
                self._closed -= 1
            self._gen += 1
            pthread_mutex_unlock(&self._lock)

    cdef int acquire(self, int64_t offset, int64_t length, Segment *segs,
                     bint write) noexcept nogil:
        """Map ``[offset, offset + length)`` onto at most ``MAX_SEGMENTS`` host pieces (for a
        ``write``: writable ones) and count a request in flight (pair with :meth:`release`);
        -1 when the route cannot. A write to clusters whose copy is under way waits for it,
        ``PENDING_WAIT_US`` at a time up to ``PENDING_WAIT_MAX_US``, rather than go to Python
        (where it would wait for the copy's lock)."""
        cdef int count, waited = 0
        cdef timespec pause
        pause.tv_sec = 0
        pause.tv_nsec = PENDING_WAIT_US * 1000
        while True:
            count = self._acquire_once(offset, length, segs, write, waited == 0)
            if count != -2:
                return count
            if waited >= PENDING_WAIT_MAX_US:
                return -1
            nanosleep(&pause, NULL)
            waited += PENDING_WAIT_US

    cdef int _acquire_once(self, int64_t offset, int64_t length, Segment *segs,
                           bint write, bint first) noexcept nogil:
        """:meth:`acquire` once: -2 when a write found clusters whose copy is under way (on
        the ``first`` try, counted in the pending bitmap's ``waits``: the copier reads that
        as its writer right behind it)."""
        cdef int count = 0
        cdef bint pending
        cdef int64_t pos = offset, end = offset + length, piece
        cdef Py_ssize_t i
        pthread_mutex_lock(&self._lock)
        if self._closed:
            pthread_mutex_unlock(&self._lock)
            return -1
        i = self._first_ending_after(offset)
        while pos < end:
            if (i >= self._n or self._ext[i].start > pos or count == MAX_SEGMENTS
                    or (write and not self._ext[i].writable)):
                pthread_mutex_unlock(&self._lock)
                return -1
            piece = min(self._ext[i].end, end) - pos
            if (write and self._ext[i].copied != NULL
                    and not _all_copied(&self._ext[i], pos, piece)):
                pending = self._ext[i].pending != NULL and _all_copied(
                    &self._ext[i], pos, piece, True)
                if pending and first:
                    fleece_add_relaxed(self._ext[i].pending_waits, 1)
                pthread_mutex_unlock(&self._lock)
                # copy-before-write owes this cluster a copy: Python's, unless under way
                return -2 if pending else -1
            if count and segs[count - 1].fd == self._ext[i].fd and (
                    segs[count - 1].host + segs[count - 1].length
                    == self._ext[i].host + (pos - self._ext[i].start)) and (
                    segs[count - 1].done == self._ext[i].done) and (
                    segs[count - 1].zero_copy == self._ext[i].zero_copy):
                segs[count - 1].length += piece
            else:
                segs[count].fd = self._ext[i].fd
                segs[count].host = self._ext[i].host + (pos - self._ext[i].start)
                segs[count].length = piece
                segs[count].guest = pos
                segs[count].done = self._ext[i].done
                segs[count].done_bits = self._ext[i].done_bits
                segs[count].cluster = self._ext[i].cluster
                segs[count].zero_copy = self._ext[i].zero_copy
                count += 1
            pos += piece
            i += 1
        self._in_flight += 1
        pthread_mutex_unlock(&self._lock)
        return count

    cdef void release(self) noexcept nogil:
        pthread_mutex_lock(&self._lock)
        self._in_flight -= 1
        if not self._in_flight:
            pthread_cond_broadcast(&self._idle)
        pthread_mutex_unlock(&self._lock)

    cdef int read_into(self, int64_t offset, int64_t length, char *out) noexcept nogil:
        """Fill ``out`` from the host files when the whole range is mapped: 0 on success,
        -1 when the route cannot, or a positive errno.

        A guarded segment is read only while none of its clusters is copied, checked before
        and after the read: a guest write reaches such a source cluster only after the copy
        set its bit, so a read that saw the bits clear on both sides read the point in time.
        """
        cdef Segment segs[MAX_SEGMENTS]
        cdef int count = self.acquire(offset, length, segs, False)
        cdef int i, error = 0
        cdef int64_t done
        cdef ssize_t n
        if count < 0:
            return -1
        for i in range(count):
            if segs[i].done != NULL and _any_done(&segs[i]):
                error = -1
                break
            done = 0
            while done < segs[i].length:
                n = pread(segs[i].fd, out + done, segs[i].length - done, segs[i].host + done)
                if n < 0:
                    if errno == EINTR:
                        continue
                    error = errno
                    break
                if n == 0:
                    error = 5  # EIO: the host file is shorter than its mapping
                    break
                done += n
            if error:
                break
            if segs[i].done != NULL and _any_done(&segs[i]):
                error = -1  # copied while we read: the source may hold the guest's data
                break
            out += segs[i].length
        self.release()
        return error

    def mapped_until(self, int64_t offset, int64_t limit):
        """Where the mapped run from ``offset`` ends (``offset`` when it is not mapped), at
        most ``limit``: a learner starts there. A guarded extent ends at its first copied
        cluster (which the target maps now)."""
        cdef int64_t end
        with nogil:
            end = self._run_end(offset, limit, False)
        return end

    cdef int64_t data_until(self, int64_t offset, int64_t limit) noexcept nogil:
        """Where the run from ``offset`` that the export's block status calls data ends
        (``offset`` when the route does not know), at most ``limit``. A guarded extent ends
        at its first copied cluster (the target decides there)."""
        return self._run_end(offset, limit, True)

    cdef int64_t _run_end(self, int64_t offset, int64_t limit, bint data) noexcept nogil:
        """Where the run of contiguous extents from ``offset`` ends (those that are data, with
        ``data``), at most ``limit``; a guarded extent ends at its first copied cluster."""
        cdef int64_t pos = offset, stop, copied
        cdef Py_ssize_t i
        cdef Segment seg
        pthread_mutex_lock(&self._lock)
        i = self._first_ending_after(offset)
        while (i < self._n and self._ext[i].start <= pos < limit
               and (self._ext[i].data or not data)):
            stop = min(self._ext[i].end, limit)
            if self._ext[i].done != NULL:
                seg.guest = pos
                seg.length = stop - pos
                seg.done = self._ext[i].done
                seg.done_bits = self._ext[i].done_bits
                seg.cluster = self._ext[i].cluster
                copied = _first_done(&seg)
                if copied < stop:
                    pos = max(pos, copied)
                    break
            pos = stop
            i += 1
        pthread_mutex_unlock(&self._lock)
        return min(pos, limit)

    cdef bint covers(self, int64_t offset, int64_t length, bint write) noexcept nogil:
        """The route maps the whole range now (a hint: it may be gone when used)."""
        cdef Segment segs[MAX_SEGMENTS]
        if self.acquire(offset, length, segs, write) < 0:
            return False
        self.release()
        return True

    cdef int write_from(self, int64_t offset, int64_t length, const char *data) noexcept nogil:
        """Write ``data`` into the host files when the whole range is mapped writable: 0 on
        success, -1 when the route cannot, or a positive errno (some bytes may have landed:
        the caller answers the error)."""
        cdef Segment segs[MAX_SEGMENTS]
        cdef int count = self.acquire(offset, length, segs, True)
        cdef int i, error = 0
        cdef int64_t done
        cdef ssize_t n
        if count < 0:
            return -1
        for i in range(count):
            done = 0
            while done < segs[i].length:
                n = pwrite(segs[i].fd, data + done, segs[i].length - done, segs[i].host + done)
                if n < 0:
                    if errno == EINTR:
                        continue
                    error = errno
                    break
                done += n
            if error:
                break
            data += segs[i].length
        self.release()
        return error

    def pwrite_from(self, int64_t offset, buf):
        """Write ``buf`` natively: True when done, False when the route does not map the
        whole range writable (the caller writes through the node). ``OSError`` when a host
        write failed."""
        cdef const unsigned char[::1] view = buf
        cdef int64_t length = view.shape[0]
        cdef int rc
        if length == 0:
            return False
        with nogil:
            rc = self.write_from(offset, length, <const char *>&view[0])
        if rc < 0:
            return False
        if rc > 0:
            raise OSError(rc, "native write to the host file failed")
        return True

    def pread_into(self, int64_t offset, buf):
        """Fill ``buf`` (a writable buffer) natively: True when done, False when the route
        does not map the whole range (the caller reads through the node). ``OSError`` when a
        host read failed."""
        cdef unsigned char[::1] view = buf
        cdef int64_t length = view.shape[0]
        cdef int rc
        if length == 0:
            return True
        with nogil:
            rc = self.read_into(offset, length, <char *>&view[0])
        if rc < 0:
            return False
        if rc > 0:
            raise OSError(rc, "native read of the host file failed")
        return True


# -- the per-connection plane ----------------------------------------------------------------
cdef struct Chunk:
    char *data
    size_t length
    size_t pos
    Chunk *next


cdef class Plane:
    """One NBD connection's transmission phase, run by :meth:`run` in a thread of its own.

    ``fd``: the connected, non-blocking socket (duplicated here; the duplicate is closed when
    the thread ends). ``route``: the export's route. ``size``: the export's size.
    ``structured``: structured replies were negotiated. ``on_input(bytes)``: requests for
    Python, called in the plane's thread with the GIL; Python calls :meth:`feed_done` once it took
    them. ``on_error()``: the peer is gone or broke the socket. ``on_progress()``: queued
    replies left while Python paused reading (it may resume). Python's own replies go through
    :meth:`send`.
    """

    cdef int _sock
    cdef int _wake
    cdef Route _route
    cdef int64_t _size
    cdef bint _structured
    cdef bint _writes  # the export takes writes the plane may do itself (not FUA)
    cdef uint32_t _status_context  # base:allocation's id when it is the only context, or 0
    cdef pthread_mutex_t _lock
    cdef Chunk *_head
    cdef Chunk *_tail
    cdef size_t _queued
    cdef unsigned long long _sent
    cdef bint _closed
    cdef bint _paused
    cdef bint _progress_owed  # Python paused: tell it once how the outbox stands now
    cdef bint _handed
    cdef bint _failed
    cdef bint _stopped  # no more input: DISC seen, end of file, or a broken stream handed on
    cdef bint _no_sendfile  # a host file refused sendfile: reads go through the buffer
    cdef bint _streaming  # the plane is sending a reply piecewise: others queue behind it
    cdef bint _passthrough  # Python parses the rest of the stream (it will close)
    cdef uint64_t _payload_left  # bytes of a WRITE payload still to pass to Python
    cdef char *_spare  # the reply buffer native reads reuse (see _reply_buffer)
    cdef size_t _spare_cap
    cdef bint _spare_busy  # in use, or queued in the outbox (under _lock)
    cdef char *_in
    cdef size_t _in_cap
    cdef size_t _in_len
    cdef char *_fb
    cdef size_t _fb_cap
    cdef size_t _fb_len
    cdef object _on_input
    cdef object _on_error
    cdef object _on_progress
    cdef readonly int fileno

    def __cinit__(self):
        self._sock = -1
        self._wake = -1
        pthread_mutex_init(&self._lock, NULL)

    def __init__(self, int fd, Route route not None, int64_t size, bint structured,
                 on_input, on_error, on_progress, bint writes=False,
                 uint32_t status_context=0):
        self._sock = dup(fd)
        if self._sock < 0:
            raise OSError(errno, "cannot duplicate the NBD socket")
        self.fileno = self._sock
        self._wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._wake < 0:
            close(self._sock)
            self._sock = -1
            raise OSError(errno, "cannot create the data plane's eventfd")
        self._route = route
        self._size = size
        self._structured = structured
        self._writes = writes
        self._status_context = status_context if structured else 0
        self._on_input = on_input
        self._on_error = on_error
        self._on_progress = on_progress
        self._in_cap = INBUF_SIZE
        self._in = <char *>malloc(self._in_cap)
        self._fb_cap = 64 * 1024
        self._fb = <char *>malloc(self._fb_cap)
        if self._in == NULL or self._fb == NULL:
            raise MemoryError()

    def __dealloc__(self):
        self._drop_outbox()
        free(self._spare)
        free(self._in)
        free(self._fb)
        if self._sock >= 0:
            close(self._sock)
        if self._wake >= 0:
            close(self._wake)
        pthread_mutex_destroy(&self._lock)

    # -- what Python reads and calls ---------------------------------------------------------
    @property
    def pending(self):
        """Bytes of replies waiting for the socket (a snapshot, to steer pausing)."""
        return self._queued

    @property
    def sent(self):
        """Bytes the socket took, in all."""
        return self._sent

    @property
    def closed(self):
        return bool(self._closed or self._failed)

    def preload(self, data):
        """Input already received for this connection, before :meth:`run` starts."""
        cdef const unsigned char[::1] view = data
        cdef size_t length = view.shape[0]
        cdef char *grown
        if not length:
            return
        if self._in_len + length > self._in_cap:
            grown = <char *>realloc(self._in, self._in_len + length)
            if grown == NULL:
                raise MemoryError()
            self._in = grown
            self._in_cap = self._in_len + length
        memcpy(self._in + self._in_len, &view[0], length)
        self._in_len += length

    def feed_done(self):
        """Python took the last batch of requests: input may go on."""
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._handed = False
            pthread_mutex_unlock(&self._lock)
            self._kick()

    def pause_reading(self):
        """Stop taking requests until :meth:`resume_reading`. Progress is reported only
        while paused (a plane serving alone has nobody to tell), and once right after the
        pause: Python decided it on a count of queued bytes the socket may have taken
        since, and no later flush would report those."""
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._paused = True
            self._progress_owed = True
            pthread_mutex_unlock(&self._lock)
            self._kick()

    def resume_reading(self):
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._paused = False
            pthread_mutex_unlock(&self._lock)
            self._kick()

    def close(self):
        """Stop: drop the queued replies and end the thread (which closes the socket)."""
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._closed = True
            self._drop_outbox()
            pthread_mutex_unlock(&self._lock)
            self._kick()
        self._on_input = self._on_error = self._on_progress = None

    def send(self, buffers):
        """Send one reply's buffers in order, now or, what the socket does not take at once,
        from the outbox; never waits for the client."""
        cdef Py_ssize_t count = len(buffers), i, used = 0, total = 0
        cdef iovec *iov = <iovec *>malloc((count or 1) * sizeof(iovec))
        cdef const unsigned char[::1] view
        cdef bint failed
        if iov == NULL:
            raise MemoryError()
        views = []
        try:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                if view.shape[0] == 0:
                    continue
                views.append(view)
                iov[used].iov_base = <void *>&view[0]
                iov[used].iov_len = view.shape[0]
                total += view.shape[0]
                used += 1
            if not used:
                return
            if total < SEND_WITH_GIL:  # taking the GIL back would cost more than the send
                failed = self._send_iov(iov, used, NULL)
            else:
                with nogil:
                    failed = self._send_iov(iov, used, NULL)
        finally:
            free(iov)
        if failed:
            self._report_error()

    # -- sending (any thread) ------------------------------------------------------------------
    cdef void _kick(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self._wake, &one, 8)

    cdef void _give_back_locked(self, char *data) noexcept nogil:
        """A reply buffer is done with (lock held): the spare is kept, others freed."""
        if data != NULL and data == self._spare:
            self._spare_busy = False
        else:
            free(data)

    cdef char *_reply_buffer(self, size_t size) noexcept nogil:
        """A buffer for a native reply: the plane's spare when it is free (grown up to
        ``SPARE_MAX``: a reader's replies reuse one buffer, no page faults, no allocator
        lock), else a fresh one."""
        cdef char *grown
        pthread_mutex_lock(&self._lock)
        if not self._spare_busy:
            if self._spare_cap < size <= SPARE_MAX:
                grown = <char *>realloc(self._spare, size)
                if grown != NULL:
                    self._spare = grown
                    self._spare_cap = size
            if self._spare_cap >= size:
                self._spare_busy = True
                pthread_mutex_unlock(&self._lock)
                return self._spare
        pthread_mutex_unlock(&self._lock)
        return <char *>malloc(size)

    cdef void _drop_outbox(self) noexcept nogil:
        cdef Chunk *chunk = self._head
        cdef Chunk *nxt
        while chunk != NULL:
            nxt = chunk.next
            self._give_back_locked(chunk.data)
            free(chunk)
            chunk = nxt
        self._head = self._tail = NULL
        self._queued = 0

    cdef bint _send_iov(self, iovec *iov, Py_ssize_t count, char *owned) noexcept nogil:
        """Send ``iov`` now as far as the socket takes it, queue the rest (copied, or
        ``owned``: one malloc'd buffer that is all of ``iov``, handed over). True when the
        peer is gone (the caller reports it)."""
        cdef ssize_t n
        cdef size_t rest = 0, pos
        cdef Py_ssize_t first = 0, i
        cdef Chunk *chunk
        cdef bint failed = False
        cdef bint wake = False
        pthread_mutex_lock(&self._lock)
        if self._closed or self._failed:
            self._give_back_locked(owned)
            pthread_mutex_unlock(&self._lock)
            return False
        if self._head == NULL and not self._streaming:
            while first < count:
                n = writev(self._sock, &iov[first], min(count - first, 512))
                if n < 0:
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN and errno != EWOULDBLOCK:
                        failed = True
                    break
                self._sent += n
                while first < count and <size_t>n >= iov[first].iov_len:
                    n -= iov[first].iov_len
                    first += 1
                if first < count:
                    iov[first].iov_base = <char *>iov[first].iov_base + n
                    iov[first].iov_len -= n
        if failed:
            self._failed = True
            self._drop_outbox()
            self._give_back_locked(owned)
            pthread_mutex_unlock(&self._lock)
            self._kick()
            return True
        for i in range(first, count):
            rest += iov[i].iov_len
        if rest:
            chunk = <Chunk *>malloc(sizeof(Chunk))
            if owned != NULL and chunk != NULL:
                chunk.data = owned
                chunk.pos = (<char *>iov[first].iov_base) - owned
                chunk.length = chunk.pos + rest
                owned = NULL
            elif chunk != NULL:
                chunk.data = <char *>malloc(rest)
                if chunk.data != NULL:
                    pos = 0
                    for i in range(first, count):
                        memcpy(chunk.data + pos, iov[i].iov_base, iov[i].iov_len)
                        pos += iov[i].iov_len
                chunk.pos = 0
                chunk.length = rest
            if chunk == NULL or chunk.data == NULL:  # out of memory: the stream is lost
                free(chunk)
                self._failed = True
                self._drop_outbox()
                self._give_back_locked(owned)
                pthread_mutex_unlock(&self._lock)
                self._kick()
                return True
            chunk.next = NULL
            if self._tail == NULL:
                self._head = chunk
            else:
                self._tail.next = chunk
            self._tail = chunk
            self._queued += rest
            wake = True
        self._give_back_locked(owned)
        pthread_mutex_unlock(&self._lock)
        if wake:
            self._kick()
        return False

    cdef int _flush(self) noexcept nogil:
        """Send queued replies (plane thread): 1 when some left, -1 when the peer is gone."""
        cdef ssize_t n
        cdef Chunk *chunk
        cdef int progress = 0
        pthread_mutex_lock(&self._lock)
        while self._head != NULL:
            chunk = self._head
            n = write(self._sock, chunk.data + chunk.pos, chunk.length - chunk.pos)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    break
                self._failed = True
                self._drop_outbox()
                pthread_mutex_unlock(&self._lock)
                return -1
            self._sent += n
            self._queued -= n
            chunk.pos += n
            progress = 1
            if chunk.pos == chunk.length:
                self._head = chunk.next
                if self._head == NULL:
                    self._tail = NULL
                self._give_back_locked(chunk.data)
                free(chunk)
        pthread_mutex_unlock(&self._lock)
        return progress

    cdef void _report_error(self):
        callback = self._on_error
        if callback is not None:
            try:
                callback()
            except Exception:  # the loop is gone: so is the connection
                pass

    # -- the thread ----------------------------------------------------------------------------
    def run(self):
        """The connection's transmission loop; returns when it is closed or the peer left."""
        cdef int reason
        with nogil:
            reason = self._loop()
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._closed = True
            self._drop_outbox()
            # Senders look at _closed under the lock before they touch the socket: closing
            # it here (not when the object goes) lets the client see the end at once.
            close(self._sock)
            self._sock = -1
            pthread_mutex_unlock(&self._lock)
        if reason < 0:
            self._report_error()
        self._on_input = self._on_error = self._on_progress = None

    cdef int _loop(self) noexcept nogil:
        """0: closed by Python; -1: the peer is gone (reported by the caller)."""
        cdef pollfd fds[2]
        cdef bint taking, serving, want_in, want_out, handed, paused, owed
        cdef ssize_t n
        cdef uint64_t drained
        cdef int flushed
        cdef size_t queued_before
        while True:
            pthread_mutex_lock(&self._lock)
            if self._closed:
                pthread_mutex_unlock(&self._lock)
                return 0
            if self._failed:
                pthread_mutex_unlock(&self._lock)
                return -1
            handed, paused = self._handed, self._paused
            owed = self._progress_owed and paused
            self._progress_owed = False
            want_out = self._head != NULL
            taking = self._taking_locked()
            serving = taking and self._may_serve_locked()
            pthread_mutex_unlock(&self._lock)
            if owed:
                self._report_progress()
            if self._fb_len and not handed:  # Python took the last batch: the next one
                if self._hand_batch() < 0:
                    return -1
                continue
            if serving and not self._wants_more():
                if self._process() < 0:
                    return -1
                pthread_mutex_lock(&self._lock)
                taking = self._taking_locked()
                serving = taking and self._may_serve_locked()
                want_out = self._head != NULL
                pthread_mutex_unlock(&self._lock)
                if serving and not self._wants_more():
                    continue  # more requests wait in the buffer
            want_in = taking and self._in_len < self._in_cap
            # A socket the plane wants nothing from stays out of the poll: one whose client
            # hung up polls as such at once and for good, and would spin this thread until
            # Python wakes it (it kicks on every change that could make it want something).
            fds[0].fd = self._sock if want_in or want_out else -1
            fds[0].events = (POLLIN if want_in else 0) | (POLLOUT if want_out else 0)
            fds[0].revents = 0
            fds[1].fd = self._wake
            fds[1].events = POLLIN
            fds[1].revents = 0
            if poll(fds, 2, -1) < 0:
                if errno == EINTR:
                    continue
                return -1
            if fds[1].revents:
                read(self._wake, &drained, 8)
            if fds[0].revents & (POLLOUT | POLLERR | POLLHUP) and want_out:
                queued_before = self._queued
                flushed = self._flush()
                if flushed < 0:
                    return -1
                if flushed and self._paused_by_python() and (
                        self._queued == 0 or self._queued < queued_before // 2):
                    self._report_progress()
            if fds[0].revents & (POLLIN | POLLERR | POLLHUP) and want_in:
                n = recv(self._sock, self._in + self._in_len, self._in_cap - self._in_len,
                         MSG_DONTWAIT)
                if n == 0:
                    return -1  # the client went away without NBD_CMD_DISC
                if n < 0:
                    if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR:
                        continue
                    return -1
                self._in_len += n
                if self._process() < 0:
                    return -1

    cdef bint _taking_locked(self) noexcept nogil:
        """The client's requests may come in (lock held): Python has not paused it, its
        stream goes on, and fewer than ``FB_HIGH`` bytes wait to be handed to Python."""
        return not (self._paused or self._stopped) and self._fb_len < FB_HIGH

    cdef bint _may_serve_locked(self) noexcept nogil:
        """Requests may be served now (lock held): no reply waits in the outbox, or the
        input buffer is full and fewer than ``OUTBOX_HIGH`` bytes do (see the module note)."""
        return self._head == NULL or (self._in_len == self._in_cap
                                      and self._queued < OUTBOX_HIGH)

    cdef bint _paused_by_python(self) noexcept nogil:
        cdef bint paused
        pthread_mutex_lock(&self._lock)
        paused = self._paused
        pthread_mutex_unlock(&self._lock)
        return paused

    cdef bint _wants_more(self) noexcept nogil:
        """Nothing in the receive buffer can be acted on before more bytes arrive."""
        cdef size_t need
        if self._in_len == 0:
            return True
        if self._passthrough or self._payload_left:
            return False
        if self._in_len < REQUEST_SIZE:
            return True
        need = self._native_write(<const unsigned char *>self._in)
        return need > self._in_len

    cdef size_t _native_write(self, const unsigned char *p) noexcept nogil:
        """For a WRITE the plane may do itself (small enough to wait for whole, mapped
        writable now): the bytes it takes with its payload; else 0."""
        cdef uint16_t flags = get_u16(p + 4)
        cdef uint64_t offset = get_u64(p + 16)
        cdef uint32_t length = get_u32(p + 24)
        if not self._writes or get_u16(p + 6) != CMD_WRITE or flags != 0:
            return 0
        if length == 0 or length > INBUF_SIZE - REQUEST_SIZE:
            return 0
        if offset > <uint64_t>self._size or offset + length > <uint64_t>self._size:
            return 0
        if not self._route.covers(<int64_t>offset, length, True):
            return 0
        return REQUEST_SIZE + length

    cdef void _report_progress(self) noexcept nogil:
        fleece_count_progress()
        with gil:
            self._call(self._on_progress)

    cdef void _call(self, object callback):
        if callback is not None:
            try:
                callback()
            except Exception:
                pass

    cdef int _process(self) noexcept nogil:
        """Serve or hand on what the receive buffer holds: -1 when the peer is gone.

        A WRITE goes to Python as it arrives: its header at once, then its payload in the
        pieces received (the protocol reads a payload into its own buffer, or drops one it
        refuses), so the plane never holds a whole payload."""
        cdef size_t pos = 0, take
        cdef const unsigned char *p
        cdef uint16_t flags, kind
        cdef uint64_t cookie, offset
        cdef uint32_t length
        cdef int served
        cdef char *grown
        while pos < self._in_len:
            if self._payload_left:
                take = min(self._payload_left, self._in_len - pos)
                if self._hand(self._in + pos, take) < 0:
                    return -1
                pos += take
                self._payload_left -= take
                continue
            if self._passthrough:
                if self._hand(self._in + pos, self._in_len - pos) < 0:
                    return -1
                pos = self._in_len
                break
            if self._in_len - pos < REQUEST_SIZE or self._paused_now():
                break
            p = <const unsigned char *>(self._in + pos)
            if get_u32(p) != REQUEST_MAGIC:
                self._passthrough = True  # Python reports the violation and closes
                continue
            flags = get_u16(p + 4)
            kind = get_u16(p + 6)
            cookie = get_u64(p + 8)
            offset = get_u64(p + 16)
            length = get_u32(p + 24)
            if kind == CMD_WRITE and self._native_write(p):
                if self._in_len - pos < REQUEST_SIZE + length:
                    break  # the payload is on its way; it fits in the buffer
                served = self._serve_write(flags, cookie, offset, length,
                                           self._in + pos + REQUEST_SIZE)
                if served < 0:
                    return -1
                if not served and self._hand(self._in + pos, REQUEST_SIZE + length) < 0:
                    return -1
                pos += REQUEST_SIZE + length
                continue
            if kind == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    self._passthrough = True  # Python refuses it and closes
                    continue
                if self._hand(self._in + pos, REQUEST_SIZE) < 0:
                    return -1
                pos += REQUEST_SIZE
                self._payload_left = length
                continue
            served = 0
            if kind == CMD_READ:
                served = self._serve_read(flags, cookie, offset, length)
            elif kind == CMD_BLOCK_STATUS:
                served = self._serve_status(flags, cookie, offset, length)
            if served < 0:
                return -1
            if not served:
                if self._hand(self._in + pos, REQUEST_SIZE) < 0:
                    return -1
                if kind == CMD_DISC:
                    self._stopped = True
                    pos = self._in_len  # nothing may follow a disconnect
                    break
            pos += REQUEST_SIZE
        if pos:
            memmove(self._in, self._in + pos, self._in_len - pos)
            self._in_len -= pos
            if self._in_cap > INBUF_SIZE and self._in_len <= INBUF_SIZE:
                grown = <char *>realloc(self._in, INBUF_SIZE)
                if grown != NULL:
                    self._in = grown
                    self._in_cap = INBUF_SIZE
        return self._hand_batch()

    cdef bint _paused_now(self) noexcept nogil:
        """Stop taking requests: Python paused the client, the plane is closing, or replies
        wait in the outbox and may not be served behind (checked before every request: one
        receive may hold thousands of them)."""
        cdef bint stop
        pthread_mutex_lock(&self._lock)
        stop = (self._paused or self._closed or self._failed
                or not self._may_serve_locked())
        pthread_mutex_unlock(&self._lock)
        return stop or self._fb_len >= FB_HIGH

    cdef int _hand(self, const char *data, size_t length) noexcept nogil:
        """Queue request bytes for Python (sent in one batch by _hand_batch)."""
        cdef char *grown
        cdef size_t cap = self._fb_cap
        while self._fb_len + length > cap:
            cap *= 2
        if cap != self._fb_cap:
            grown = <char *>realloc(self._fb, cap)
            if grown == NULL:
                return -1
            self._fb = grown
            self._fb_cap = cap
        memcpy(self._fb + self._fb_len, data, length)
        self._fb_len += length
        return 0

    cdef int _hand_batch(self) noexcept nogil:
        """Hand the requests gathered for Python over, unless Python still holds the last
        batch (they wait, and the plane goes on serving what it can meanwhile)."""
        cdef char *grown
        if not self._fb_len:
            return 0
        pthread_mutex_lock(&self._lock)
        if self._handed:
            pthread_mutex_unlock(&self._lock)
            return 0
        self._handed = True
        pthread_mutex_unlock(&self._lock)
        with gil:
            data = PyBytes_FromStringAndSize(self._fb, self._fb_len)
            callback = self._on_input
            if callback is not None:
                try:
                    callback(data)
                except Exception:
                    pass
        self._fb_len = 0
        if self._fb_cap > 64 * 1024:
            grown = <char *>realloc(self._fb, 64 * 1024)
            if grown != NULL:
                self._fb = grown
                self._fb_cap = 64 * 1024
        return 0

    cdef int _serve_write(self, uint16_t flags, uint64_t cookie, uint64_t offset,
                          uint32_t length, const char *data) noexcept nogil:
        """Do a WRITE through the route: 1 when answered, 0 when Python must (not mapped
        any more, or the host write failed: Python writes again and answers the error), -1
        when the peer is gone."""
        cdef unsigned char reply[20]
        cdef iovec iov
        if self._route.write_from(<int64_t>offset, length, data) != 0:
            return 0
        if self._structured:
            put_u32(reply, STRUCTURED_MAGIC)
            put_u16(reply + 4, REPLY_DONE)
            put_u16(reply + 6, 0)  # NBD_REPLY_TYPE_NONE
            put_u64(reply + 8, cookie)
            put_u32(reply + 16, 0)
            iov.iov_len = 20
        else:
            put_u32(reply, SIMPLE_MAGIC)
            put_u32(reply + 4, 0)
            put_u64(reply + 8, cookie)
            iov.iov_len = 16
        iov.iov_base = reply
        fleece_count_native()
        if self._send_iov(&iov, 1, NULL):
            return -1
        return 1

    cdef int _serve_status(self, uint16_t flags, uint64_t cookie, uint64_t offset,
                           uint32_t length) noexcept nogil:
        """Answer base:allocation (the only context negotiated) for a run the route knows to
        be data: one extent, as far as it knows (the spec lets a reply cover less than
        asked). 1 when answered, 0 when Python must, -1 when the peer is gone."""
        cdef unsigned char reply[32]
        cdef iovec iov
        cdef int64_t end
        if not self._status_context or flags & ~(FLAG_FUA | FLAG_REQ_ONE) or length == 0:
            return 0
        if offset > <uint64_t>self._size or offset + length > <uint64_t>self._size:
            return 0
        end = self._route.data_until(<int64_t>offset, <int64_t>(offset + length))
        if end <= <int64_t>offset:
            return 0
        put_u32(reply, STRUCTURED_MAGIC)
        put_u16(reply + 4, REPLY_DONE)
        put_u16(reply + 6, CHUNK_BLOCK_STATUS)
        put_u64(reply + 8, cookie)
        put_u32(reply + 16, 12)
        put_u32(reply + 20, self._status_context)
        put_u32(reply + 24, <uint32_t>(end - <int64_t>offset))
        put_u32(reply + 28, 0)  # data, not known to read as zeroes
        iov.iov_base = reply
        iov.iov_len = 32
        fleece_count_native()
        if self._send_iov(&iov, 1, NULL):
            return -1
        return 1

    cdef void _read_header(self, unsigned char *out, uint64_t cookie, uint64_t offset,
                           uint32_t length) noexcept nogil:
        """A successful READ's reply header (28 bytes structured, else 16)."""
        if self._structured:
            put_u32(out, STRUCTURED_MAGIC)
            put_u16(out + 4, REPLY_DONE)
            put_u16(out + 6, CHUNK_OFFSET_DATA)
            put_u64(out + 8, cookie)
            put_u32(out + 16, length + 8)
            put_u64(out + 20, offset)
        else:
            put_u32(out, SIMPLE_MAGIC)
            put_u32(out + 4, 0)
            put_u64(out + 8, cookie)

    cdef int _sendfile_read(self, uint64_t cookie, uint64_t offset, uint32_t length,
                            size_t header) noexcept nogil:
        """Answer a READ with ``sendfile`` when nothing waits in the outbox and every extent
        is settled (a guarded one is checked after its read: the buffer path): 1 when
        answered, 0 when the buffer path must, -1 when the stream is lost.

        The reply *streams*: Python's replies meanwhile go to the outbox, behind it. When the
        socket is full the plane waits for room, at most ``STREAM_WAIT_MS`` at a time, with
        the route's extents pinned as a ``pread`` pins them (an invalidation waits no longer
        than that for a client that stopped reading); past that the rest is read into the
        outbox's first chunk, as the buffer path would have queued it."""
        cdef Segment segs[MAX_SEGMENTS]
        cdef unsigned char head[28]
        cdef int count = self._route.acquire(<int64_t>offset, length, segs, False)
        cdef int i, rc = 1
        cdef size_t sent = 0, total = header + length, at
        cdef ssize_t n
        cdef long pos
        if count < 0:
            return 0
        for i in range(count):
            if segs[i].done != NULL or not segs[i].zero_copy:
                self._route.release()
                return 0
        self._read_header(head, cookie, offset, length)
        pthread_mutex_lock(&self._lock)
        if self._closed or self._failed or self._head != NULL:
            pthread_mutex_unlock(&self._lock)
            self._route.release()
            return 0
        self._streaming = True
        pthread_mutex_unlock(&self._lock)
        at = header  # where segment i starts in the reply
        i = 0
        while sent < total:
            if sent < header:
                n = write(self._sock, head + sent, header - sent)
            else:
                pos = segs[i].host + (sent - at)
                n = sendfile(self._sock, segs[i].fd, &pos, at + segs[i].length - sent)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    if self._await_room():
                        continue
                elif errno == EINVAL or errno == ENOSYS or errno == EOPNOTSUPP:
                    self._no_sendfile = True  # this file cannot: read it, now and from now on
                else:
                    rc = -1  # the socket, or a host read: part of the reply is out
                break
            if n == 0:  # the file ends inside the extent: the rest reads as zeroes
                break
            if sent >= header:
                fleece_count_sendfile(n)
            sent += n
            if sent > header and sent == at + segs[i].length:
                at += segs[i].length
                i += 1
        pthread_mutex_lock(&self._lock)
        self._streaming = False
        self._sent += sent
        if rc > 0 and sent < total and not self._closed:
            rc = self._queue_rest(head, header, segs, count, sent)
        if rc < 0:
            self._failed = True
            self._drop_outbox()
        pthread_mutex_unlock(&self._lock)
        self._route.release()
        if rc < 0:
            self._kick()
            return -1
        fleece_count_native()
        return 1

    cdef bint _await_room(self) noexcept nogil:
        """While a reply streams: wait until the socket takes more (True), at most
        ``STREAM_WAIT_MS``; False on the timeout or when Python closed the plane."""
        cdef pollfd fds[2]
        cdef uint64_t drained
        cdef bint closed
        while True:
            fds[0].fd = self._sock
            fds[0].events = POLLOUT
            fds[0].revents = 0
            fds[1].fd = self._wake
            fds[1].events = POLLIN
            fds[1].revents = 0
            if poll(fds, 2, STREAM_WAIT_MS) < 0:
                if errno == EINTR:
                    continue
                return False
            if fds[1].revents:  # a reply queued behind this one, or a close
                read(self._wake, &drained, 8)
                pthread_mutex_lock(&self._lock)
                closed = self._closed
                pthread_mutex_unlock(&self._lock)
                if closed:
                    return False
            if fds[0].revents:
                return True
            if not fds[1].revents:
                return False  # the timeout

    cdef int _queue_rest(self, const unsigned char *head, size_t header, Segment *segs,
                         int count, size_t sent) noexcept nogil:
        """Queue what a ``sendfile`` reply did not send from byte ``sent`` on, first in the
        outbox (lock held): 1, or -1 when it cannot be read or allocated."""
        cdef size_t total = header, start = header, pos = 0, skip
        cdef int i
        cdef ssize_t n
        cdef Chunk *chunk
        for i in range(count):
            total += segs[i].length
        chunk = <Chunk *>malloc(sizeof(Chunk))
        if chunk == NULL:
            return -1
        chunk.data = <char *>malloc(total - sent)
        if chunk.data == NULL:
            free(chunk)
            return -1
        if sent < header:
            memcpy(chunk.data, head + sent, header - sent)
            pos = header - sent
        for i in range(count):
            if sent < start + segs[i].length:
                skip = sent - start if sent > start else 0
                while skip < <size_t>segs[i].length:
                    n = pread(segs[i].fd, chunk.data + pos, segs[i].length - skip,
                              segs[i].host + skip)
                    if n < 0 and errno == EINTR:
                        continue
                    if n < 0:
                        free(chunk.data)
                        free(chunk)
                        return -1
                    if n == 0:  # past the end of the file: zeroes, as a file reads there
                        n = segs[i].length - skip
                        memset(chunk.data + pos, 0, n)
                    pos += n
                    skip += n
            start += segs[i].length
        chunk.pos = 0
        chunk.length = total - sent
        chunk.next = self._head  # before the replies Python queued while this one streamed
        self._head = chunk
        if self._tail == NULL:
            self._tail = chunk
        self._queued += chunk.length
        return 1

    cdef int _serve_read(self, uint16_t flags, uint64_t cookie, uint64_t offset,
                         uint32_t length) noexcept nogil:
        """Answer a READ from the route: 1 when answered, 0 when Python must, -1 when the
        peer is gone."""
        cdef size_t header
        cdef char *buf
        cdef int rc
        cdef iovec iov
        if flags & ~(FLAG_FUA | FLAG_DF):
            return 0
        if flags & FLAG_DF and not self._structured:
            return 0
        if length == 0 or length > MAX_PAYLOAD or offset > <uint64_t>self._size:
            return 0
        if offset + length > <uint64_t>self._size:
            return 0
        header = 28 if self._structured else 16
        if length >= SENDFILE_MIN and not self._no_sendfile:
            rc = self._sendfile_read(cookie, offset, length, header)
            if rc != 0:
                return rc
        buf = self._reply_buffer(header + length)
        if buf == NULL:
            return 0
        rc = self._route.read_into(<int64_t>offset, length, buf + header)
        if rc != 0:  # not mapped, or a host read failed: Python answers (with the error)
            pthread_mutex_lock(&self._lock)
            self._give_back_locked(buf)
            pthread_mutex_unlock(&self._lock)
            return 0
        self._read_header(<unsigned char *>buf, cookie, offset, length)
        fleece_count_native()
        iov.iov_base = buf
        iov.iov_len = header + length
        if self._send_iov(&iov, 1, buf):
            return -1
        return 1
