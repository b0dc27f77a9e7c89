"""The export model and request execution: what an NBD request does to the exported node.

Design note: this is the server's backend in nbdkit's sense. An :class:`Export` is a node
reached through its :class:`~fleece.block.root.Root` (the export's reference, which a graph
change may drain and move); :func:`execute` runs one request on it with the node's public API
only (``Root.begin``/``end``, ``pread_into``, ``pwrite``, ``extents``, ``check_read`` and
``request()`` around ``sendfile``, the driver's ``posix_fd()`` and ``window()``) and returns
the reply's buffers. It runs in the I/O threads (or, for small requests, in the loop thread:
see :mod:`fleece.nbd.connection`) and knows nothing of sockets but the direct sender it may
hand a ``sendfile`` reply to. Two shortcuts: a read of a raw file export at least
``SENDFILE_ABOVE`` long goes out with ``sendfile``; a structured read at least
``SPARSE_READ_MIN`` long asks the block status for holes (sent as ``OFFSET_HOLE`` chunks),
unless the export's data hint says its range is data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fleece.block import nowait, route
from fleece.block.driver import Status
from fleece.block.node import BlockNode
from fleece.block.root import Root
from fleece.errors import GenericError
from fleece.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    MAX_PAYLOAD,
    AllocationFlag,
    Cmd,
    CmdFlag,
    NBDErr,
    nbd_error,
)
from fleece.nbd.proto import ExportInfo, Request, ServerConnection

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fleece.nbd.connection import Connection

log = logging.getLogger(__name__)

#: a structured read is sent as one data chunk when its range has more extents than this
MAX_READ_PIECES = 16
#: how far ahead a read's block status query looks for a data extent to remember
DATA_HINT_SPAN = 1 << 30
#: a block status reply describes at most this many extents per context
MAX_STATUS_EXTENTS = 2048
#: reads of a raw file export at least this big go out with sendfile
SENDFILE_ABOVE = 64 * 1024
#: reads from this size on look for holes to send as OFFSET_HOLE chunks; a smaller read is
#: cheaper to send whole than to ask the block status about
SPARSE_READ_MIN = 128 * 1024

Buffer = bytes | bytearray | memoryview


class FileSender(Protocol):
    """Who sends replies straight to the socket: may it send a read with ``sendfile``?"""

    def sendfile(self, header: bytes, fd: int, offset: int, length: int) -> bool:
        """Send ``header`` and ``length`` bytes of ``fd`` at ``offset``; False when the
        caller must send the reply itself."""


@dataclass(eq=False)
class Export:
    """A node exported under ``name``, reached through ``root`` (its reference on the node,
    which a graph change may drain and move)."""

    id: str
    name: str
    root: Root
    description: str = ""
    writable: bool = False
    writethrough: bool = False
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()
    shutting_down: bool = False
    connections: set[Connection] = field(default_factory=set)
    #: a range known to hold data (not zeroes): reads inside it skip the block status query.
    #: Always safe to use stale: sending zeroes that were written meanwhile as data is correct.
    data_hint: tuple[int, int] = (0, 0)

    @property
    def node(self) -> BlockNode:
        """The node the export serves now (requests resolve it through the root's gate)."""
        return self.root.node

    @property
    def file_window(self) -> tuple[BlockNode, int] | None:
        """``(file node, offset)`` when the export's bytes are a window of one posix file (a
        ``file`` node, or ``raw`` over one, with nobody guarding reads): ``sendfile`` may then
        serve reads."""
        node, base = self.node, 0
        while node.read_guard is None:
            if node.driver.posix_fd() is not None:
                return node, base
            window = node.driver.window()
            if window is None:
                return None
            node, offset = window
            base += offset
        return None

    def info(self) -> ExportInfo:
        """The export as negotiation presents it (size read now)."""
        contexts = [BASE_ALLOCATION]
        if self.allocation_depth:
            contexts.append(ALLOCATION_DEPTH)
        contexts += [DIRTY_BITMAP_PREFIX + name for name in self.bitmaps]
        cluster = self.node.driver.image_info().get("cluster-size")
        preferred = 4096
        if isinstance(cluster, int) and 4096 <= cluster <= MAX_PAYLOAD:
            preferred = cluster
        return ExportInfo(
            name=self.name,
            description=self.description,
            size=self.node.size,
            read_only=not self.writable,
            multi_conn=not self.writable,
            contexts=tuple(contexts),
            preferred_block_size=preferred,
        )


class Directory:
    """``exports`` (by id) as :class:`fleece.nbd.proto.ExportDirectory` (loop thread only)."""

    def __init__(self, exports: dict[str, Export]) -> None:
        self.exports = exports

    def lookup(self, name: str) -> Export | None:
        exports = [e for e in self.exports.values() if not e.shutting_down]
        found = next((e for e in exports if e.name == name), None)
        if found is None and name == "" and len(exports) == 1:
            found = exports[0]  # the default export, when there is only one
        return found

    def find(self, name: str) -> ExportInfo | None:
        export = self.lookup(name)
        return None if export is None else export.info()

    def all(self) -> Iterable[ExportInfo]:
        return [e.info() for e in self.exports.values() if not e.shutting_down]


def _base_allocation(flags: Status) -> int:
    value = 0 if flags & Status.DATA else AllocationFlag.HOLE
    if flags & Status.ZERO:
        value |= AllocationFlag.ZERO
    return value


def execute(export: Export, request: Request, proto: ServerConnection,
            contexts: dict[int, str], sender: FileSender | None) -> list[Buffer]:
    """Run ``request`` on the export's node and return the reply's buffers (none when
    ``sender`` sent the reply itself, with ``sendfile``). ``proto`` builds the replies,
    ``contexts`` are the metadata contexts the client chose. An I/O error is answered to
    the client; ``nowait.WouldBlock`` is raised when the request runs under
    :func:`fleece.block.nowait.nowait` and would wait for the disk."""
    cookie = request.cookie
    try:
        node = export.root.begin()  # the node this request goes to, held until its end
        try:
            return _perform(export, node, request, proto, contexts, sender)
        finally:
            export.root.end()
    except nowait.WouldBlock:
        raise
    except OSError as exc:
        return [proto.error_reply(cookie, nbd_error(exc.errno), exc.strerror or str(exc))]
    except GenericError as exc:
        return [proto.error_reply(cookie, NBDErr.EIO, str(exc))]


def _perform(export: Export, node: BlockNode, request: Request, proto: ServerConnection,
             contexts: dict[int, str], sender: FileSender | None) -> list[Buffer]:
    cookie = request.cookie
    command, flags = request.command, request.flags
    offset, length = request.offset, request.length
    if command == Cmd.READ:
        direct = sender is not None and length >= SENDFILE_ABOVE and export.file_window
        if direct and _sendfile_read(export, node, proto, sender, cookie, offset, length):
            return []
        buf = bytearray(length)
        native = export.root.route
        # Learned since the plane looked, or by another connection: no graph walk.
        if native is not None and length and native.pread_into(offset, buf):
            return proto.read_reply(cookie, offset, buf)
        if proto.structured and not flags & CmdFlag.DF and length >= SPARSE_READ_MIN:
            reply = _sparse_read(export, node, proto, cookie, offset, buf)
        else:
            node.pread_into(offset, buf)
            reply = proto.read_reply(cookie, offset, buf)
        _teach_route(export, node, offset, length)
        return reply
    if command == Cmd.WRITE:
        assert request.payload is not None
        # FUA: a file makes this write durable alone; other nodes write, then flush
        node.pwrite(offset, request.payload, fua=bool(flags & CmdFlag.FUA or export.writethrough))
        _teach_route(export, node, offset, length, pieces=1)
    elif command == Cmd.FLUSH:
        node.flush()
    elif command == Cmd.TRIM:
        node.pdiscard(offset, length)
        if flags & CmdFlag.FUA or export.writethrough:
            node.flush()
    elif command == Cmd.WRITE_ZEROES:
        if flags & CmdFlag.FAST_ZERO and flags & CmdFlag.NO_HOLE:
            return [proto.error_reply(cookie, NBDErr.ENOTSUP,
                                      "fast zeroing needs permission to punch holes")]
        node.pwrite_zeroes(offset, length, may_unmap=not flags & CmdFlag.NO_HOLE)
        if flags & CmdFlag.FUA or export.writethrough:
            node.flush()
    elif command == Cmd.BLOCK_STATUS:
        replies = [
            (context_id, _status(node, name, offset, length, bool(flags & CmdFlag.REQ_ONE)))
            for context_id, name in sorted(contexts.items())
        ]
        return [proto.block_status_reply(cookie, replies)]
    # CACHE: the data is as close as it gets; nothing to do.
    return [proto.ok_reply(cookie)]


def _teach_route(export: Export, node: BlockNode, offset: int, length: int, *,
                 pieces: int = route.LEARN_EXTENTS) -> None:
    """After Python served a read: let the export's native route learn where its range (and
    what follows) lies, so the native data plane serves the next reads there itself."""
    native = export.root.route
    if native is None or nowait.active():
        return
    try:
        route.learn(native, node, offset, length, pieces=pieces)
    except Exception:  # learning is an optimisation: the read itself succeeded
        log.debug("route learning failed at %d+%d", offset, length, exc_info=True)


def _sendfile_read(export: Export, node: BlockNode, proto: ServerConnection,
                   sender: FileSender | None, cookie: int, offset: int, length: int) -> bool:
    """Answer a read of a raw file export with ``sendfile`` (no copy through Python)."""
    window = export.file_window
    if window is None or sender is None:
        return False
    file_node, base = window
    if offset + length > node.size or node.read_guard is not None:
        return False
    node.check_read(offset, length)
    with node.request():  # counted in flight on the export's node: it cannot close under us
        fd = file_node.driver.posix_fd()
        if fd is None:  # closed meanwhile
            return False
        header = proto.read_reply_header(cookie, offset, length)
        return sender.sendfile(header, fd, base + offset, length)


def _sparse_read(export: Export, node: BlockNode, proto: ServerConnection, cookie: int,
                 offset: int, buf: bytearray) -> list[Buffer]:
    """A structured read into ``buf`` (the request's length), its zero extents sent as
    holes."""
    length = len(buf)
    end = offset + length
    hint_start, hint_end = export.data_hint
    if not hint_start <= offset < end <= hint_end:
        first = node.block_status_above(offset, min(node.size - offset, DATA_HINT_SPAN))
        if not first.zero and first.length >= length:
            export.data_hint = (offset, offset + first.length)
            hint_start, hint_end = export.data_hint
    if hint_start <= offset < end <= hint_end:
        node.pread_into(offset, buf)
        return proto.read_reply(cookie, offset, buf)
    extents: list[tuple[int, int, bool]] = []
    for status in node.extents(offset, length):
        zero = status.zero
        if extents and extents[-1][2] == zero:
            start, size, _ = extents[-1]
            extents[-1] = (start, size + status.length, zero)
        else:
            extents.append((status.offset, status.length, zero))
        if len(extents) > MAX_READ_PIECES:
            break
    if len(extents) > MAX_READ_PIECES or not any(zero for _, _, zero in extents):
        node.pread_into(offset, buf)
        return proto.read_reply(cookie, offset, buf)
    pieces: list[tuple[int, int, Buffer | None]] = []
    view = memoryview(buf)
    for start, size, zero in extents:
        if zero:
            pieces.append((start, size, None))
            continue
        piece = view[start - offset : start - offset + size]
        try:
            node.pread_into(start, piece)
        except OSError as exc:
            error = (nbd_error(exc.errno), exc.strerror or str(exc), start)
            return proto.sparse_read_reply(cookie, pieces, error)
        pieces.append((start, size, piece))
    return proto.sparse_read_reply(cookie, pieces)


def _status(
    node: BlockNode, context: str, offset: int, length: int, one: bool
) -> list[tuple[int, int]]:
    if context.startswith(DIRTY_BITMAP_PREFIX):
        from fleece.block.dirty_bitmap import status_extents

        name = context[len(DIRTY_BITMAP_PREFIX):]
        return status_extents(node, name, offset, length, one, MAX_STATUS_EXTENTS)
    depth = context == ALLOCATION_DEPTH
    extents: list[tuple[int, int]] = []
    for status in node.extents(offset, length):
        value = status.depth if depth else _base_allocation(status.flags)
        if extents and extents[-1][1] == value:
            extents[-1] = (extents[-1][0] + status.length, value)
        else:
            if one and extents:
                break
            if len(extents) >= MAX_STATUS_EXTENTS:
                break
            extents.append((status.length, value))
    return extents
