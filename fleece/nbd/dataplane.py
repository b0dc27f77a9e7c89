"""Starting the native data plane on an NBD connection (see :mod:`fleece._fast.dataplane`).

Design note: Python keeps the control plane (listening, the handshake, TLS, every command
that is not a mapped read, every error). Once a plain connection is in transmission,
:func:`start` hands its socket to a native :class:`Plane` running in a thread of its own: it
answers the reads its export's route maps (:mod:`fleece.block.route`) without the GIL and
hands everything else back, as the client's bytes, to the connection's protocol.

``FLEECE_NO_DATAPLANE=1`` (or ``FLEECE_NO_EXTENSIONS=1``) keeps every connection on the Python
path; it is read at each new connection, so tests can compare the two paths.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from fleece.block import route
from fleece.nbd.constants import BASE_ALLOCATION

if TYPE_CHECKING:
    from fleece._fast.dataplane import Plane
    from fleece.nbd.backend import Export
    from fleece.nbd.proto import ServerConnection


def enabled() -> bool:
    """True when new NBD connections get the native data plane."""
    return route.available()


def native_requests() -> int:
    """How many NBD requests the native planes answered without Python (process-wide)."""
    if not route.available():
        return 0
    from fleece._fast.dataplane import native_requests as count

    return count()


def sendfile_bytes() -> int:
    """How many bytes of read replies the native planes sent with ``sendfile`` (without
    copying them), process-wide."""
    if not route.available():
        return 0
    from fleece._fast.dataplane import sendfile_bytes as count

    return count()


def progress_reports() -> int:
    """How many times the native planes woke Python to say their queued replies left (only
    a connection Python paused wants to know), process-wide."""
    if not route.available():
        return 0
    from fleece._fast.dataplane import progress_reports as count

    return count()


def start(fd: int, export: Export, proto: ServerConnection, contexts: dict[int, str],
          peer: str, *,
          on_input: Callable[[bytes], None], on_error: Callable[[], None],
          on_progress: Callable[[], None], ceiling: int) -> Plane | None:
    """Start a plane on socket ``fd`` for ``export`` (``contexts``: the meta contexts the
    client chose; the plane answers base:allocation when it is the only one); None when it
    may not take over (the protocol is half way through a request's payload, or the
    descriptor it needs would eat into the server's reserve ``ceiling``). ``OSError`` when it
    cannot be made."""
    native = export.root.native_route()
    if native is None:
        return None
    from fleece._fast.dataplane import Plane as NativePlane

    chosen = list(contexts.items())
    status_context = chosen[0][0] if [name for _, name in chosen] == [BASE_ALLOCATION] else 0
    plane = NativePlane(fd, native, export.node.size, proto.structured,
                        on_input, on_error, on_progress,
                        export.writable and not export.writethrough, status_context)
    if plane.fileno >= ceiling:
        plane.close()
        plane.run()  # returns at once: closes the duplicate
        return None
    pending = proto.take_input()
    if pending is None:
        plane.close()
        plane.run()
        return None
    if pending:
        plane.preload(pending)
    threading.Thread(target=plane.run, name=f"fleece-nbd-plane {peer}", daemon=True).start()
    return plane
