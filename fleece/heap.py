"""The daemon's C heap: how glibc's malloc is set up so that freed memory goes back to the system.

Design note: the NBD buffers are Python ``bytearray`` objects, allocated and freed by many
threads (the loop, the I/O workers, the copy-before-write and job threads). glibc gives each
such thread its own arena and keeps what is freed there for later use by the same arena, so
the daemon's resident size grows to the sum of every arena's high-water mark, not the bytes
in use (measured in the 1 GiB scenario of ``benchmarks/compare_qemu.py``: 8-12 MiB free and
kept after the first nbdcopy, with 7-9 MiB in use). Three settings bound that:

* the mmap threshold (:func:`return_big_buffers`): buffers of 512 KiB and more get their own
  mapping, unmapped when freed;
* the number of arenas (:func:`limit_arenas`): threads share a few arenas, so what one
  freed another reuses instead of touching new pages;
* a trimmer thread (:class:`HeapTrimmer`): four times a second it lets the caches that
  registered with :func:`register_cache` drop what they kept unused since the last tick (the
  write-behind's old-data buffers: 6 MiB for as long as fleecing runs), then, when a good
  part of the heap is free, ``malloc_trim`` hands the free pages back (``MADV_DONTNEED``,
  every arena).

All of them are glibc's; elsewhere each function returns False and nothing changes.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any, Protocol

#: glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: the mmap threshold the daemon fixes
MMAP_THRESHOLD = 512 * 1024
#: arenas for all threads: the main one and one more (I/O workers contend a little more for
#: the lock, in exchange for freed buffers being reused across threads)
ARENAS = 2
#: seconds between two looks at the heap
TRIM_INTERVAL = 0.25
#: free bytes in the heap below which the trimmer leaves it alone
TRIM_SLACK = 2 << 20


class IdleCache(Protocol):
    """Memory kept for reuse that can be let go when it was not used for a while."""

    def release_idle(self) -> None:
        """Drop what was kept and not used since the previous call (any thread)."""


_caches: weakref.WeakSet[IdleCache] = weakref.WeakSet()
_caches_lock = threading.Lock()


def register_cache(cache: IdleCache) -> None:
    """Have the daemon's :class:`HeapTrimmer` call ``cache.release_idle()`` on every tick, for
    as long as ``cache`` lives (a weak reference). Without a trimmer nothing is called."""
    with _caches_lock:
        _caches.add(cache)


def release_idle_caches() -> None:
    """Call ``release_idle()`` on every registered cache."""
    with _caches_lock:
        caches = list(_caches)
    for cache in caches:
        cache.release_idle()


def _libc() -> Any:
    """glibc's functions, or None where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 (only glibc has it)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def return_big_buffers() -> bool:
    """Fix glibc's mmap threshold at 512 KiB for this process: every buffer that big (NBD
    replies and payloads of 512 KiB and more, the sizes a hostile client would queue) gets its
    own mapping, unmapped when freed, so what a departed client held goes back to the system
    at once. glibc's default raises the threshold to the biggest buffer freed so far, after
    which such buffers come from heaps (one per I/O thread) that keep freed pages: after a TLS
    attack the daemon stayed 12-15 MiB above its baseline that way, with this under 1 MiB.
    Not lower: at 256 KiB, nbdcopy's 256 KiB requests each paid a fresh mapping's page faults
    (nbdcopy of the snapshot 916 MiB/s at 512 KiB, 532 at 256 KiB; docs/performance.md).
    False where there is no glibc."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Let all threads share at most ``arenas`` malloc arenas (glibc's default is eight per
    core). Call before the threads start: an arena, once a thread has one, stays. False where
    there is no glibc."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_ARENA_MAX, arenas))


def heap_free_bytes() -> int | None:
    """Bytes free but kept in the malloc arenas (``mallinfo2``'s ``fordblks``), or None where
    glibc lacks it (before 2.33)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)


class HeapTrimmer:
    """A daemon thread that gives the heap's free pages back every ``interval`` seconds once
    more than ``slack`` bytes are free. ``malloc_trim`` runs without the GIL (ctypes releases
    it) and costs about a millisecond; the pages it frees are faulted in again only if the
    daemon needs that much memory again. :meth:`stop` ends the thread."""

    def __init__(self, interval: float = TRIM_INTERVAL, slack: int = TRIM_SLACK) -> None:
        self.interval = interval
        self.slack = slack
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: times the heap was trimmed (for the tests)
        self.trims = 0

    def start(self) -> bool:
        """Start the thread; False (and no thread) where there is no glibc."""
        libc = _libc()
        if libc is None:
            return False
        self._thread = threading.Thread(target=self._run, args=(libc,), name="fleece-trim",
                                        daemon=True)
        self._thread.start()
        return True

    def _run(self, libc: Any) -> None:
        info = getattr(libc, "mallinfo2", None)
        if info is not None:
            info.restype = _MallInfo2
        while not self._stop.wait(self.interval):
            release_idle_caches()
            if info is not None and info().fordblks < self.slack:
                continue
            libc.malloc_trim(0)
            self.trims += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
