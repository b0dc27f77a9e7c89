"""Block nodes, their users and child links.

Lifetime: every user of a node holds a :class:`NodeUser` (the monitor after ``blockdev-add``, a
device, a job, a parent's child link, an NBD export). The node closes, and leaves its graph, when
its last user lets go; closing releases its own child links, so a chain goes down from the top.

Data path: the public I/O methods check the range, count the request in flight and call the
driver; what a write does beyond that is visible in the graph (a ``copy-before-write`` filter node
above a source copies first). The node itself keeps only what QEMU's node keeps: its dirty bitmaps
(marked after every write), serialising requests (a stream job holds clusters against guest
writes) and, for a fleecing target, the snapshot's read guard. They raise ``OSError`` with an
errno; ``EINVAL`` for a read past the end, ``ENOSPC`` for a write past it.

Drained sections (:meth:`drain_begin` / :meth:`drain_end`, through
:meth:`fleece.block.graph.BlockGraph.drained`): while a node is drained, requests from threads
other than the drainer wait at :meth:`_begin`, and the drain waits for those in flight. Graph
changes (a filter inserted or removed, a guard set, a job's initial bitmap) happen drained.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fleece.block import direct, nowait
from fleece.block.direct import DirectWrite
from fleece.block.dirty_bitmap import NodeBitmaps
from fleece.block.driver import BlockStatus, Driver, HostMap, Status
from fleece.block.perm import NO_PERM, ChildRole, Perm
from fleece.block.rangelock import ClusterRangeLocks
from fleece.errors import GenericError

if TYPE_CHECKING:
    from fleece._fast.dataplane import Route
    from fleece.block.graph import BlockGraph
    from fleece.block.root import Root

log = logging.getLogger(__name__)


#: seconds between two asks to finish direct writes while a drain waits for them
_REAP_INTERVAL = 0.02


class UserKind(enum.Enum):
    """Who holds a reference. The monitor's reference is the one ``blockdev-del`` drops."""

    MONITOR = "monitor"
    DEVICE = "device"
    CHILD = "child"
    JOB = "job"
    EXPORT = "export"
    INTERNAL = "internal"


@dataclass(eq=False)
class NodeUser:
    """One reference on ``node``, with the permissions its holder needs and shares."""

    node: BlockNode
    kind: UserKind
    description: str  # completes "Node 'x' is busy: ...", e.g. "used as backing of 'top'"
    perm: Perm = NO_PERM
    shared: Perm = field(default_factory=Perm.all)
    released: bool = False
    #: set for devices and exports: the root a graph change drains and moves onto another node
    #: (a filter inserted above this one); the other users stay where they are
    root: Root | None = None
    #: how QEMU's permission errors name the holder and its link to the node, e.g.
    #: ``("node 'top'", "backing")`` or ``("backup job 'j0'", "main node")``; None: a device
    #: (``block device 'id'``) or an export (``an unnamed block device``), linked as ``root``
    holder: tuple[str, str] | None = None

    def holder_desc(self) -> tuple[str, str]:
        """QEMU's ``bdrv_child_user_desc`` of this user, and the name of its link."""
        if self.holder is not None:
            return self.holder
        if self.kind is UserKind.DEVICE and "'" in self.description:
            device = self.description.split("'")[1]  # "attached to device 'v0'"
            return f"block device '{device}'", "root"
        if self.kind in (UserKind.DEVICE, UserKind.EXPORT):
            return "an unnamed block device", "root"
        return self.description, self.kind.value

    def release(self) -> None:
        """Drop this reference (idempotent). The node closes when it was the last."""
        self.node.remove_user(self)


@dataclass(eq=False)
class ChildLink:
    """``parent --name/role--> child``; holds the parent's reference on the child."""

    parent: BlockNode
    name: str
    role: ChildRole
    user: NodeUser

    @property
    def node(self) -> BlockNode:
        return self.user.node


class ReadGuard(Protocol):
    """What a snapshot's reads of a node hold (a fleecing target reads through to the live
    source): held across a whole read, or a whole block status walk down the chain."""

    def hold(self, offset: int, length: int) -> AbstractContextManager[None]:
        ...

    def span(self, offset: int, length: int) -> int:
        """How much of ``[offset, offset + length)`` (at least its first byte) one status
        step should cover: a step never needs to hold more than one kind of cluster."""
        ...

    def read_through_map(self, offset: int, length: int) -> HostMap | None:
        """Where the guarded node's backing has the bytes of a range it reads through to,
        for a reader below the graph (see :class:`~fleece.block.driver.HostMap`)."""
        ...


@dataclass(frozen=True)
class Serialiser:
    """Writes to the node hold their clusters exclusively in ``locks`` while they run (QEMU's
    serialising requests): a stream job copying data up holds the same clusters."""

    locks: ClusterRangeLocks
    cluster: int

    def hold(self, offset: int, length: int) -> AbstractContextManager[None]:
        first = offset // self.cluster
        return self.locks.locked(first, max(first + 1, -(-(offset + length) // self.cluster)),
                                 exclusive=True)


class BlockNode:
    """A node of the block graph: a driver instance, its children and its users."""

    def __init__(
        self, graph: BlockGraph, name: str, driver_name: str, *, read_only: bool, auto_named: bool
    ) -> None:
        self.graph = graph
        self.name = name
        self.driver_name = driver_name
        self.read_only = read_only
        self.auto_named = auto_named
        self.driver: Driver = Driver(self)  # replaced by the real driver once open
        self.children: dict[str, ChildLink] = {}
        self.users: list[NodeUser] = []
        #: the dirty bitmaps of this node, marked after every write that reaches it
        self.bitmaps = NodeBitmaps()
        #: the snapshot's guard on reads of this node (a fleecing target in the backing scheme);
        #: set and cleared only while the node is drained
        self.read_guard: ReadGuard | None = None
        #: writes hold their clusters here (a stream job); set and cleared only drained
        self.serialiser: Serialiser | None = None
        self.closed = False
        self._closing = False  # the last user let go; close() is on its way
        #: QEMU's force-share: this node's links share every permission (read-only nodes only)
        self.force_share = False
        #: QEMU's discard=unmap; with the default (ignore) discard requests do nothing
        self.discard_unmap = False
        #: called with the node once it has closed (used to delete temporary files)
        self.on_close: list[Callable[[BlockNode], None]] = []
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._drained = 0  # > 0: requests of threads other than the drainers wait
        self._drainers: list[int] = []  # the threads whose drained sections are open
        #: extra fields for query-named-block-nodes, computed when asked (fleecing cost, ...)
        self.extra_info: dict[str, Callable[[], Any]] = {}
        self._draining = 0  # threads waiting in drain(): only they need a notify
        #: the routes (see :mod:`fleece.block.route`) that learned a mapping through this
        #: node: dropped whenever this node's mapping may change
        self._routes: weakref.WeakSet[Route] = weakref.WeakSet()
        self._routes_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<BlockNode {self.name!r} {self.driver_name}>"

    # -- users and references ----------------------------------------------------------------
    def add_user(
        self, kind: UserKind, description: str, perm: Perm = NO_PERM, shared: Perm | None = None,
        *, holder: tuple[str, str] | None = None
    ) -> NodeUser:
        """Take a reference. ``GenericError`` if the permissions conflict with another user."""
        user = NodeUser(self, kind, description, perm, Perm.all() if shared is None else shared,
                        holder=holder)
        with self._lock:
            if self.closed or self._closing:
                raise GenericError(f"Node '{self.name}' is closed")
            self._check_perm(user, perm, user.shared)
            self.users.append(user)
            try:
                self._apply_perm()
            except BaseException:
                self.users.remove(user)
                raise
        return user

    def update_user(self, user: NodeUser, perm: Perm, shared: Perm) -> None:
        """Change what ``user`` needs and shares, or raise ``GenericError`` and change nothing."""
        with self._lock:
            self._check_perm(user, perm, shared)
            old = (user.perm, user.shared)
            user.perm, user.shared = perm, shared
            try:
                self._apply_perm()
            except BaseException:
                user.perm, user.shared = old
                raise

    def remove_user(self, user: NodeUser) -> None:
        with self._lock:
            if user.released:
                return
            user.released = True
            self.users.remove(user)
            last = not self.users
            if last:
                self._closing = True
            else:
                self._apply_perm()
        if last:
            self.close()

    def _check_perm(self, user: NodeUser, perm: Perm, shared: Perm) -> None:
        if perm & Perm.WRITE and self.read_only:
            raise GenericError(f"Block node '{self.name}' is read-only")
        others = [other for other in self.users if other is not user]
        # QEMU's order: first whether the new holder lets the others keep what they use, then
        # whether the others let it have what it asks for
        for other in others:
            if other.perm & ~shared:
                raise self._conflict(Perm(other.perm & ~shared), other.holder_desc(),
                                     user.holder_desc())
        for other in others:
            if perm & ~other.shared:
                raise self._conflict(Perm(perm & ~other.shared), user.holder_desc(),
                                     other.holder_desc())

    def _conflict(self, perms: Perm, needs: tuple[str, str],
                  unshares: tuple[str, str]) -> GenericError:
        """QEMU's words for a permission conflict (``bdrv_a_allow_b``)."""
        name = self.name
        return GenericError(
            f"Permission conflict on node '{name}': permissions '{perms.describe()}' are both "
            f"required by {needs[0]} (uses node '{name}' as '{needs[1]}' child) and unshared "
            f"by {unshares[0]} (uses node '{name}' as '{unshares[1]}' child)."
        )

    def _apply_perm(self) -> None:
        perm, shared = NO_PERM, Perm.all()
        for user in self.users:
            perm |= user.perm
            shared &= user.shared
        self.driver.set_perm(perm, shared)

    def roots(self) -> list[Root]:
        """The roots (devices, exports) whose requests come to this node."""
        with self._lock:
            return [user.root for user in self.users if user.root is not None]

    def move_roots_to(self, new: BlockNode) -> None:
        """Move the roots (devices, exports) of this node onto ``new``. Call it drained."""
        for root in self.roots():
            root.move_to(new)
        log.debug("roots of %r moved to %r", self.name, new.name)

    def busy_users(self) -> list[NodeUser]:
        """Users other than the monitor: while there is one, ``blockdev-del`` refuses."""
        return [u for u in self.users if u.kind is not UserKind.MONITOR]

    def monitor_user(self) -> NodeUser | None:
        return next((u for u in self.users if u.kind is UserKind.MONITOR), None)

    @property
    def refcount(self) -> int:
        return len(self.users)

    # -- children ----------------------------------------------------------------------------
    def attach_child(self, name: str, child: BlockNode, role: ChildRole) -> ChildLink:
        """Link ``child`` under ``name``; the link holds a reference with the driver's perms."""
        perm, shared = self.driver.child_perm(role, self.read_only)
        if self.force_share:
            shared = Perm.all()
        article = "as" if role & (ChildRole.BACKING | ChildRole.FILE | ChildRole.TARGET) else "by"
        user = child.add_user(
            UserKind.CHILD, f"used {article} {name} of '{self.name}'", perm, shared,
            holder=(f"node '{self.name}'", name)
        )
        link = ChildLink(self, name, role, user)
        with self._lock:
            old = self.children.get(name)
            self.children[name] = link
        self.invalidate_routes()  # what this node maps onto may have changed
        if old is not None:
            old.user.release()
        return link

    def detach_child(self, name: str) -> None:
        with self._lock:
            link = self.children.pop(name, None)
        self.invalidate_routes()
        if link is not None:
            link.user.release()

    def child(self, name: str) -> BlockNode | None:
        link = self.children.get(name)
        return link.node if link is not None else None

    def file_child(self) -> BlockNode | None:
        return self.child("file")

    def backing(self) -> BlockNode | None:
        for link in self.children.values():
            if link.role & ChildRole.BACKING:
                return link.node
        return None

    def skip_filters(self) -> BlockNode:
        """The first node at or below this one that is not a filter (QEMU's skip_filters)."""
        node = self
        while (below := node.driver.filtered_child()) is not None:
            node = below
        return node

    def skip_implicit_filters(self) -> BlockNode:
        """Below the filters nobody named (a backup's copy-before-write), as QEMU's
        ``query-block`` and device-name lookups of bitmaps see a device's node."""
        node = self
        while node.auto_named and (below := node.driver.filtered_child()) is not None:
            node = below
        return node

    def parents(self) -> list[BlockNode]:
        return [link.parent for link in self.graph.links_to(self)]

    def reopen(self, read_only: bool) -> None:
        """Switch the node (and the storage under it) between read-only and read-write.

        ``GenericError`` when going read-only while a user still writes, or when the storage
        cannot be reopened for writing (a lock held by another process, a read-only file).
        """
        if read_only == self.read_only:
            return
        if read_only and any(user.perm & Perm.WRITE for user in self.users):
            raise GenericError(f"Node '{self.name}' is in use for writing")
        storage = [link for link in self.children.values() if not link.role & ChildRole.BACKING]
        if not read_only:
            for link in storage:
                link.node.reopen(False)
        self.invalidate_routes()
        self.driver.reopen(read_only)
        self.read_only = read_only
        self.invalidate_routes()
        for link in storage:
            perm, shared = self.driver.child_perm(link.role, read_only)
            link.node.update_user(link.user, perm, shared)
        if read_only:
            for link in storage:
                link.node.reopen(True)

    # -- lifetime ----------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait until no request is in flight on this node. Direct writes count as in flight
        until their owner finishes them, which it does when it next passes by: while some
        exist, the wait wakes now and then to ask the owners to finish what is written."""
        while True:
            with self._idle:
                self._draining += 1
                try:
                    if self._idle.wait_for(lambda: self._in_flight == 0,
                                           _REAP_INTERVAL if direct.reapers_exist() else None):
                        return
                finally:
                    self._draining -= 1
            direct.reap_all()  # outside the node's lock: finishing ends requests on this node

    def drain_begin(self) -> None:
        """Open a drained section: requests of other threads wait until :meth:`drain_end`,
        and those in flight finish first. The calling thread's own requests go on."""
        with self._idle:
            self._drained += 1
            self._drainers.append(threading.get_ident())
        self.invalidate_routes()  # a drained section may change the graph or the guards
        self.drain()

    def drain_end(self) -> None:
        with self._idle:
            self._drained -= 1
            self._drainers.remove(threading.get_ident())
            self._idle.notify_all()

    def close(self) -> None:
        """Close the driver and let go of the children. Called by the last ``remove_user``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.invalidate_routes()  # no native read may reach the descriptors being closed
        self.drain()
        try:
            if not self.read_only:
                with suppress(OSError):  # close anyway; the error was the writer's to see
                    self.driver.flush()
            self.driver.close()
        finally:
            for name in list(self.children):
                self.detach_child(name)
            self.graph.forget(self)
            for callback in self.on_close:
                callback(self)

    # -- I/O ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.driver.size()

    def _begin(self) -> None:
        """Count a request in flight (``ENODEV`` once the node closed). While the node is
        drained by another thread, wait first (or, in a thread that must not wait, raise
        ``WouldBlock``); the check and the count are one step under the lock."""
        with self._lock:
            if self._drained and threading.get_ident() not in self._drainers:
                if nowait.active():
                    raise nowait.WouldBlock
                self._idle.wait_for(lambda: not self._drained or self.closed)
            if self.closed:
                raise OSError(errno.ENODEV, f"node '{self.name}' is closed")
            self._in_flight += 1

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0 and self._draining:
                self._idle.notify_all()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count a request in flight for the block (the node cannot close under it; a drained
        section waits for it): for callers that reach below the node themselves, such as a
        ``sendfile`` of its host file."""
        self._begin()
        try:
            yield
        finally:
            self._end()

    def check_read(self, offset: int, length: int) -> None:
        """``EINVAL`` unless ``[offset, offset + length)`` lies inside the node."""
        if offset + length > self.size and self.driver.growable:
            self.driver.refresh_size()  # the cached size may predate another thread's growth
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(
                errno.EINVAL,
                f"read of {length} bytes at {offset} beyond the end of '{self.name}' "
                f"({self.size} bytes)",
            )

    def _check_write(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"bad write range {offset}+{length} on '{self.name}'")
        if offset + length > self.size and not self.driver.growable:
            raise OSError(
                errno.ENOSPC,
                f"write of {length} bytes at {offset} beyond the end of '{self.name}' "
                f"({self.size} bytes)",
            )
        if self.read_only:
            raise OSError(errno.EROFS, f"node '{self.name}' is read-only")

    def pread_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        view = memoryview(buf).cast("B")
        self.check_read(offset, len(view))
        if not view:
            return
        self._begin()
        try:
            guard = self.read_guard  # stable while we are in flight: it changes drained
            if guard is None:
                self.driver.preadv(offset, view)
            else:
                with guard.hold(offset, len(view)):
                    self.driver.preadv(offset, view)
        finally:
            self._end()

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(offset, buf)
        return bytes(buf)

    def _write_hold(self, offset: int, length: int) -> AbstractContextManager[None]:
        serialiser = self.serialiser
        return nullcontext() if serialiser is None else serialiser.hold(offset, length)

    def _written(self, offset: int, length: int) -> None:
        """Mark the dirty bitmaps, even after a failed write (some bytes may have landed).
        Called while the write still counts in flight, so a drained section sees it."""
        for bitmap in self.bitmaps.list():
            bitmap.record(offset, length)

    def begin_direct_write(self, offset: int, length: int) -> DirectWrite | None:
        """Reserve ``length`` bytes at ``offset`` for a write whose data the caller puts into
        the host file itself (see :class:`~fleece.block.direct.DirectWrite`). None when this
        node cannot take one: it records dirty bitmaps or serialises writes, or its driver
        cannot place the range in one contiguous run of a host file without copy-on-write."""
        self._check_write(offset, length)
        if not length or self.bitmaps.list() or self.serialiser is not None:
            return None
        self._begin()
        try:
            direct = self.driver.begin_direct_write(offset, length)
        except BaseException:
            self._end()
            raise
        if direct is None:
            self._end()
            return None
        direct.finishers.append(lambda _written: self._end())
        return direct

    def native_fua(self) -> bool:
        """True when a ``fua`` write makes only itself durable; False when it flushes all the
        node's writes (see :meth:`~fleece.block.driver.Driver.native_fua`)."""
        return self.driver.native_fua()

    def pwrite_from_file(self, offset: int, fd: int, host: int, length: int) -> bool:
        """Write ``length`` bytes of the open host file ``fd`` from ``host`` at ``offset``
        without reading them into memory, when the driver can (an ``nbd`` node sends them to
        its server with ``sendfile``); False when it cannot, and nothing was written. The
        caller keeps those bytes of the file unchanged until this returns (the kernel may
        pass the page cache's pages on instead of copying them)."""
        self._check_write(offset, length)
        if not length or self.serialiser is not None:
            return False
        self._begin()
        try:
            written: bool | None = None  # None: failed part-way, as a pwrite that raised
            try:
                written = self.driver.pwrite_from_file(offset, fd, host, length)
            finally:
                if written is not False:
                    self._written(offset, length)
            return written
        finally:
            self._end()

    def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, *, unchanged: bool = False,
        fua: bool = False,
    ) -> None:
        """Write ``data`` at ``offset``.

        ``unchanged`` promises the bytes already read so (a stream job copying backing data up,
        holding the clusters itself): such a write neither serialises nor marks dirty bitmaps.
        ``fua``: durable when this returns (see :meth:`native_fua` for what that costs).
        """
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        if not view:
            return
        native = fua and self.driver.native_fua()
        write = self.driver.pwritev_fua if native else self.driver.pwritev
        self._begin()
        try:
            if unchanged:
                write(offset, view)
            else:
                try:
                    if self.serialiser is None:
                        write(offset, view)
                    else:
                        with self.serialiser.hold(offset, len(view)):
                            write(offset, view)
                finally:
                    self._written(offset, len(view))
        finally:
            self._end()
        if fua and not native:
            self.flush()

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_write(offset, length)
        if not length:
            return
        self._begin()
        try:
            with self._write_hold(offset, length), self._remapping():
                self.driver.pwrite_zeroes(offset, length, may_unmap)
        finally:
            self._written(offset, length)
            self._end()

    def pdiscard(self, offset: int, length: int) -> None:
        """Drop the range's content if the node was opened with ``discard=unmap`` (QEMU
        ignores discards otherwise, and so does fleece)."""
        self._check_write(offset, length)
        if not length or not self.discard_unmap:
            return
        self._begin()
        try:
            with self._write_hold(offset, length), self._remapping():
                self.driver.pdiscard(offset, length)
        finally:
            self._written(offset, length)
            self._end()

    # -- routes (the native data plane's view: see fleece.block.route) -----------------------
    def add_route(self, route: Route) -> None:
        """Drop ``route``'s mappings whenever this node's mapping may change (from now on)."""
        with self._routes_lock:
            self._routes.add(route)

    def invalidate_routes(self) -> None:
        """Make every route through this node forget what it learned, and wait for the
        native reads using it."""
        if not self._routes:
            return
        with self._routes_lock:
            routes = list(self._routes)
        for route in routes:
            route.invalidate()

    @contextmanager
    def _remapping(self) -> Iterator[None]:
        """Around a request that may free or move what the node maps (a discard, a zero
        write): routes forget before it (native reads in flight finish first) and again after
        it (a learner that looked meanwhile may have seen the old mapping)."""
        self.invalidate_routes()
        try:
            yield
        finally:
            self.invalidate_routes()

    def host_map(self, offset: int, length: int) -> HostMap | None:
        """Where the start of ``[offset, offset + length)`` lies below this node (see
        :class:`~fleece.block.driver.HostMap`), asked under the node's read guard; None when
        it must be read through the node. A guarded node (a fleecing target) that reads a
        range through to its backing maps it onto the source, for the uncopied clusters."""
        self.check_read(offset, length)
        if not length:
            return None
        with self.request():
            guard = self.read_guard
            if guard is None:
                return self.driver.host_map(offset, length)
            length = guard.span(offset, length)
            with guard.hold(offset, length):
                found = self.driver.host_map(offset, length)
                if found is not None:
                    return found
                status = self.driver.block_status(offset, length)
                backing = self.backing()
                if status.allocated or backing is None:
                    return None
                through = guard.read_through_map(offset, status.length)
                if through is None or through.node is not backing:
                    return None
                return through

    def flush(self) -> None:
        with self.request():
            self.driver.flush()
            for link in list(self.children.values()):
                if not link.node.read_only:
                    link.node.flush()

    # -- block status ------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> BlockStatus:
        """This layer's status of the first extent in ``[offset, offset + length)``."""
        self.check_read(offset, length)
        if not length:
            return BlockStatus(offset, 0, Status(0))
        with self.request():
            guard = self.read_guard  # status is a read of metadata: the same guard holds
            if guard is None:
                return self.driver.block_status(offset, length)
            with guard.hold(offset, length):
                return self.driver.block_status(offset, length)

    def block_status_above(
        self, offset: int, length: int, base: BlockNode | None = None
    ) -> BlockStatus:
        """Status through the backing chain down to (not including) ``base``.

        ``depth`` is the layer that allocates the extent (1 = this node), or 0 when none does;
        an extent no layer allocates reads as zeroes unless ``base`` is under it. A guarded
        node (a fleecing target) holds its guard across the whole walk, so the layers below
        cannot change between two steps of it.
        """
        self.check_read(offset, length)
        if base is self:
            return BlockStatus(offset, length, Status(0), 0)
        with self.request():
            guard = self.read_guard
            if guard is None:
                return self._status_walk(offset, length, base)
            length = guard.span(offset, length)
            with guard.hold(offset, length):
                return self._status_walk(offset, length, base)

    def _status_walk(self, offset: int, length: int, base: BlockNode | None) -> BlockStatus:
        """:meth:`block_status_above` for a caller counted in flight here (and holding this
        node's guard): this layer asks its driver, the layers below their own status."""
        if not length:
            return BlockStatus(offset, 0, Status(0))
        status = self.driver.block_status(offset, length)
        node: BlockNode | None = self
        depth = 1
        while True:
            if status.allocated:
                return BlockStatus(offset, status.length, status.flags, depth, status.host_offset)
            assert node is not None
            length = status.length
            below = node.backing()
            if below is None or offset >= below.size:
                # Nothing below: unallocated reads as zeroes (QEMU pads short backings likewise).
                return BlockStatus(offset, length, Status.ZERO, 0 if base is None else depth)
            if below is base:
                return BlockStatus(offset, length, Status(0), 0)
            length = min(length, below.size - offset)
            node = below
            depth += 1
            status = node.block_status(offset, length)

    def extents(self, offset: int, length: int, above: bool = True) -> Iterator[BlockStatus]:
        """Walk ``[offset, offset + length)`` extent by extent."""
        end = offset + length
        while offset < end:
            if above:
                status = self.block_status_above(offset, end - offset)
            else:
                status = self.block_status(offset, end - offset)
            if status.length <= 0:
                raise OSError(errno.EIO, f"block status made no progress at {offset}")
            yield status
            offset += status.length

    # -- introspection -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """QEMU's ``BlockDeviceInfo`` for this node."""
        backing = self.backing()
        image: dict[str, Any] = {
            "filename": self.driver.filename(),
            "format": self.driver_name,
            "virtual-size": self.size,
            "dirty-flag": False,
        }
        file = self.file_child()
        fd = file.driver.posix_fd() if file is not None else None
        if fd is not None:
            with suppress(OSError):
                image["actual-size"] = os.fstat(fd).st_blocks * 512
        image.update(self.driver.image_info())
        backing_name = self.driver.backing_filename()
        if backing_name:
            image["backing-filename"] = backing_name
        if backing is not None:
            image["backing-image"] = backing.info()["image"]
        depth, walk = 0, backing
        while walk is not None:
            depth += 1
            walk = walk.backing()
        info: dict[str, Any] = {
            "node-name": self.name,
            "drv": self.driver_name,
            "file": self.driver.filename(),
            "ro": self.read_only,
            "encrypted": False,
            "detect_zeroes": "off",
            "bps": 0,
            "bps_rd": 0,
            "bps_wr": 0,
            "iops": 0,
            "iops_rd": 0,
            "iops_wr": 0,
            "write_threshold": 0,
            "backing_file_depth": depth,
            "cache": {"writeback": True, "direct": False, "no-flush": False},
            "image": image,
        }
        if backing_name:
            info["backing_file"] = backing_name
        for key, compute in list(self.extra_info.items()):
            info[key] = compute()
        return info

