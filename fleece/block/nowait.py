"""Reads that must not wait for the disk: the NBD loop thread answers cached reads itself.

Inside ``with nowait():`` the ``file`` driver reads with ``RWF_NOWAIT``: data in the page cache
comes back at once, and anything that would wait for the disk raises :class:`WouldBlock`
instead, so the caller can hand the request to an I/O thread. Reads are idempotent, so a request
that gave up half-way is simply done again there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()
#: the kernel's flag, or 0 where Python or the platform lacks it (then nothing runs inline)
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


class WouldBlock(Exception):
    """A read inside :func:`nowait` would have waited for the disk."""


def active() -> bool:
    """Whether this thread is inside :func:`nowait`."""
    return bool(getattr(_state, "on", False))


@contextmanager
def nowait() -> Iterator[None]:
    """Make this thread's file reads fail with :class:`WouldBlock` instead of waiting."""
    _state.on = True
    try:
        yield
    finally:
        _state.on = False
