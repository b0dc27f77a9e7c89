"""Routes: what a root's node maps onto host files, for requests that go below the graph.

Design note: the native data plane (:mod:`fleece._fast.dataplane`) serves a request without
Python when a :class:`Route` maps its whole range onto host files. Python teaches the route
(:func:`learn`) after it served a request itself, asking each node on the way down where the
bytes lie (``BlockNode.host_map``, which asks the driver: :class:`~fleece.block.driver.HostMap`):
a ``raw`` window, a filter, a qcow2 cluster the image owns alone, a snapshot's clusters, down
to a ``file`` node's descriptor. Each extent also says whether a write may go there directly
(every node on the way writes in place and owes it nothing: no dirty bitmap, no serialiser)
and whether the export's block status calls it data. A snapshot's uncopied clusters are
*guarded* extents onto the source, valid while their copied bits stay clear (the plane checks
them around each read).

Only *settled* mappings are learned: ones that change only through the node's own discards,
zero writes, drained sections, reopen, children or close, or a bitmap added, each of which
drops the routes that went through the node (``BlockNode.invalidate_routes``). A learner
registers the route on each node *before* asking it, and adds what it learned under the
generation it read first, so an invalidation that raced with it makes the route refuse the
result.

Without the compiled extensions (or with ``FLEECE_NO_DATAPLANE=1``) there is no route:
:func:`new_route` returns None and every request goes through the graph.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, NamedTuple, cast

from fleece import _impl

if TYPE_CHECKING:
    from fleece._fast.bitmap import ClusterBitmap as NativeBitmap
    from fleece._fast.dataplane import Route
    from fleece.bitmap import ClusterBitmap
    from fleece.block.node import BlockNode

log = logging.getLogger(__name__)

#: a learner looks this far past the read it follows (the next reads are likely there),
#: skipping what the route maps already. Far: a client keeps many requests in flight, and
#: every one past the mapped range goes through Python until the next learn (at 64 MiB,
#: nbdcopy's first pass over a 1 GiB disk sent a fifth of its reads there). One learn costs
#: as many host_map calls as it learns extents (at most ``LEARN_EXTENTS``), not its length.
LEARN_AHEAD = 1024 * 1024 * 1024
#: and learns at most this many extents at once
LEARN_EXTENTS = 64


def available() -> bool:
    """True when the compiled data plane is there and not disabled (``FLEECE_NO_DATAPLANE``
    or ``FLEECE_NO_EXTENSIONS``: read when a root makes its route)."""
    if _impl.extensions_disabled() or os.environ.get("FLEECE_NO_DATAPLANE", "") not in ("", "0"):
        return False
    try:
        import fleece._fast.dataplane  # noqa: F401
    except ImportError:
        return False
    return True


def new_route() -> Route | None:
    """A fresh, empty route, or None without the compiled data plane."""
    if not available():
        return None
    from fleece._fast.dataplane import Route as NativeRoute

    return NativeRoute()


class _Piece(NamedTuple):
    start: int
    length: int
    fd: int
    host: int
    #: a guarded piece (see HostMap.unless_done): its copied bitmap, and the cluster size
    unless_done: ClusterBitmap | None
    cluster: int
    #: writes may go there directly too
    writable: bool
    #: the export's block status calls it data
    data: bool
    #: writes only where this copied bitmap's clusters (of ``cluster`` bytes) are all set
    write_guard: ClusterBitmap | None
    #: replies may send its pages without a copy (``sendfile``: HostMap.zero_copy)
    zero_copy: bool
    #: with write_guard: the clusters whose copy is under way, which a write may wait for
    write_pending: ClusterBitmap | None


def learn(route: Route, node: BlockNode, offset: int, length: int, *,
          pieces: int = LEARN_EXTENTS) -> int:
    """Teach ``route`` (whose reads go to ``node``) the mappings from ``offset`` on, up to
    ``LEARN_AHEAD`` bytes and ``pieces`` extents (after a read: the next reads are likely
    there; a write asks for one piece, as long as its mapping runs, as random writes under
    fleecing would pay for many each); returns how many bytes it learned. The caller counts
    a request in flight on the root (the node cannot move meanwhile)."""
    generation = route.generation
    end = min(node.size, offset + max(length, LEARN_AHEAD))
    pos = route.mapped_until(offset, end)
    if pos >= offset + length:
        return 0  # learned meanwhile (another connection's read): nothing to add
    learned: list[_Piece] = []
    try:
        while pos < end and len(learned) < pieces:
            piece = _resolve(route, node, pos, end - pos)
            if piece is None:
                break
            if piece.start + piece.length < end:  # go on where the route does not map yet
                resume = route.mapped_until(piece.start + piece.length, end)
            else:
                resume = end
            last = learned[-1] if learned else None
            if (last is not None and last.fd == piece.fd
                    and last.start + last.length == piece.start
                    and last.host + last.length == piece.host
                    and last.unless_done is piece.unless_done
                    and last.write_guard is piece.write_guard
                    and last.write_pending is piece.write_pending
                    and last.zero_copy == piece.zero_copy
                    and last.writable == piece.writable and last.data == piece.data):
                learned[-1] = last._replace(length=last.length + piece.length)
            else:
                learned.append(piece)
            pos = resume
    except OSError as exc:  # a node closed or broke meanwhile: learn nothing more
        log.debug("route learning stopped at %d: %s", pos, exc)
    total = 0
    for piece in learned:
        if not route.add(generation, piece.start, piece.length, piece.fd, piece.host,
                         cast("NativeBitmap | None", piece.unless_done), piece.cluster,
                         piece.writable, piece.data,
                         cast("NativeBitmap | None", piece.write_guard), piece.zero_copy,
                         cast("NativeBitmap | None", piece.write_pending)):
            break
        total += piece.length
    return total


def _resolve(route: Route, node: BlockNode, offset: int, length: int) -> _Piece | None:
    """Where the start of the range lies in a host file, following ``host_map`` down; None
    when some node on the way must read it itself (or two snapshots would guard it)."""
    current, at, count = node, offset, length
    guard: tuple[ClusterBitmap, int] | None = None
    write_guard: tuple[ClusterBitmap, int] | None = None
    pending: ClusterBitmap | None = None
    writable = True
    zero_copy = True
    data: bool | None = None  # the first node on the way that decides
    while True:
        current.add_route(route)  # first: an invalidation from now on reaches the route
        # A write skipping this node must owe it nothing: no bitmap to mark, no writes to
        # serialise (each change of those drops the routes through the node).
        writable = writable and not (current.read_only or current.bitmaps.list()
                                     or current.serialiser is not None)
        fd = current.driver.posix_fd()
        if fd is not None:
            done, cluster = guard if guard is not None else (None, 0)
            writable = writable and current.driver.writes_in_place()
            copied: ClusterBitmap | None = None
            if writable and write_guard is not None and guard is None:
                copied, cluster = write_guard
            return _Piece(offset, count, fd, at, done, cluster, writable, bool(data), copied,
                          zero_copy, pending if copied is not None else None)
        found = current.host_map(at, count)
        if found is None or found.length <= 0:
            return None
        writable = writable and found.writable
        zero_copy = zero_copy and found.zero_copy
        if data is None:
            data = found.data
        if found.unless_done is not None:
            if guard is not None or found.offset != at:
                return None  # the bitmap is indexed by guest offsets: keep to one level
            guard = (found.unless_done, found.cluster)
        if found.write_guard is not None and writable:
            if write_guard is not None or guard is not None or at != offset:
                writable = False  # one guard per extent, indexed by the route's offsets
            else:
                write_guard = (found.write_guard, found.cluster)
                pending = found.write_pending
        count = min(count, found.length)
        current, at = found.node, found.offset
