"""Roots: the users of a node that a graph change may move (QEMU's ``BlockBackend``).

A device and an NBD export reach the graph through a :class:`Root`. Each request resolves the
root's node *inside* the request, counted in flight on the root, so a graph change can drain the
root (wait for its requests, admit none) and move it onto a new node (a filter inserted above
its old one, or the node below a filter being removed): a request that waited at the gate then
runs against the new graph, and one that entered before runs to its end against the old one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from fleece.block import nowait, route
from fleece.block.node import BlockNode, NodeUser

if TYPE_CHECKING:
    from fleece._fast.dataplane import Route


class Root:
    """A movable, drainable reference on a node, held by a device or an export."""

    def __init__(self, user: NodeUser) -> None:
        self._user = user
        user.root = self
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._drained = 0
        self._drainers: list[int] = []  # threads with a drained section open: they go on
        self._route: Route | None = None

    # -- the native view -----------------------------------------------------------------------
    def native_route(self) -> Route | None:
        """The root's :class:`~fleece._fast.dataplane.Route` (made on first use), or None
        without the compiled data plane. A drained section closes it."""
        with self._cond:
            if self._route is None:
                self._route = route.new_route()
                if self._route is not None and self._drained:
                    self._route.close()  # as if it had been there when the section opened
            return self._route

    @property
    def route(self) -> Route | None:
        """The route if one was made (the learners' cue), else None."""
        return self._route

    @property
    def node(self) -> BlockNode:
        """The node requests go to now (read without the gate: for display and lookups)."""
        return self._user.node

    @property
    def user(self) -> NodeUser:
        return self._user

    # -- requests ----------------------------------------------------------------------------
    def begin(self) -> BlockNode:
        """Enter a request: wait while the root is drained (by another thread), then count it
        in flight and return the node it goes to. In a thread that must not wait
        (:mod:`fleece.block.nowait`), a drained root raises ``WouldBlock`` instead. Pair with
        :meth:`end`."""
        with self._cond:
            if self._drained and threading.get_ident() not in self._drainers:
                if nowait.active():
                    raise nowait.WouldBlock
                self._cond.wait_for(lambda: not self._drained)
            self._in_flight += 1
            return self._user.node

    def end(self) -> None:
        with self._cond:
            self._in_flight -= 1
            if not self._in_flight and self._drained:
                self._cond.notify_all()

    # -- graph changes -----------------------------------------------------------------------
    def drain_begin(self) -> None:
        """Admit no new request and wait for those in flight (sections nest)."""
        with self._cond:
            self._drained += 1
            self._drainers.append(threading.get_ident())
            if self._route is not None:
                self._route.close()  # no native request enters; those in flight finish
            self._cond.wait_for(lambda: not self._in_flight)

    def drain_end(self) -> None:
        with self._cond:
            self._drained -= 1
            self._drainers.remove(threading.get_ident())
            if self._route is not None:
                self._route.open()
            if not self._drained:
                self._cond.notify_all()

    def move_to(self, node: BlockNode) -> None:
        """Point the root at ``node``, with the same permissions. Call it drained."""
        old = self._user
        self._user = node.add_user(old.kind, old.description, old.perm, old.shared)
        self._user.root = self
        old.release()

    def release(self) -> None:
        """Drop the reference (idempotent)."""
        self._user.release()
