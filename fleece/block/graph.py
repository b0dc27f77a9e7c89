"""The block graph: every open node by name, and how nodes are opened from QEMU-style options.

Options are QEMU's ``BlockdevOptions``: ``{"driver": "qcow2", "node-name": "disk0", "file":
{"driver": "file", "filename": "d.qcow2"}}``. A child given as a dict is opened inline and belongs
to its parent alone; a child given as a string names an existing node, which the link then
shares with its other users.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fleece.block.driver import Options
from fleece.block.drivers import driver_class
from fleece.block.node import BlockNode, ChildLink, NodeUser
from fleece.block.perm import ChildRole
from fleece.errors import GenericError, NodeNotFound, QMPError, in_member

log = logging.getLogger(__name__)

# QEMU's rule: a letter, then letters, digits, '-', '.' and '_'; 31 characters at most
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")


class BlockGraph:
    """All open nodes. Thread-safe; node names are unique across the graph."""

    def __init__(self) -> None:
        self._nodes: dict[str, BlockNode] = {}
        self._lock = threading.RLock()
        self._auto_names = itertools.count(1)
        #: user-creatable objects by id (``tls-creds-x509``), for drivers that name one
        self.objects: Mapping[str, object] = {}

    # -- lookup ------------------------------------------------------------------------------
    def nodes(self) -> list[BlockNode]:
        with self._lock:
            return list(self._nodes.values())

    def find(self, name: str) -> BlockNode | None:
        with self._lock:
            return self._nodes.get(name)

    def get(self, name: str) -> BlockNode:
        """The node named ``name``; ``NodeNotFound`` (QEMU's ``GenericError``) if none is."""
        node = self.find(name)
        if node is None:
            raise NodeNotFound(f"Cannot find device='' nor node-name='{name}'")
        return node

    def links_to(self, node: BlockNode) -> list[ChildLink]:
        return [
            link
            for parent in self.nodes()
            for link in parent.children.values()
            if link.node is node
        ]

    # -- drained sections --------------------------------------------------------------------
    def with_parents(self, nodes: Iterable[BlockNode]) -> list[BlockNode]:
        """``nodes`` and every node above them, each parent before its children."""
        order: list[BlockNode] = []
        seen: set[int] = set()

        def visit(node: BlockNode) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            for parent in node.parents():
                visit(parent)
            order.append(node)

        for node in nodes:
            visit(node)
        return order

    @contextmanager
    def drained(self, nodes: Iterable[BlockNode]) -> Iterator[None]:
        """A drained section over ``nodes`` (QEMU's bdrv_drained_begin/end): their roots
        (devices, exports) and every node above them admit no request from other threads,
        and every request in flight there has finished. Roots drain first, then nodes from
        the top down, so a request in flight above never waits for one below. The calling
        thread may still do I/O; a root moved meanwhile is still let go at the end."""
        order = self.with_parents(nodes)
        roots = [root for node in order for root in node.roots()]
        opened: list[Any] = []
        try:
            for root in roots:
                root.drain_begin()
                opened.append(root)
            for node in order:
                node.drain_begin()
                opened.append(node)
            log.debug("drained %s", [node.name for node in order])
            yield
        finally:
            for item in reversed(opened):
                item.drain_end()

    def remove_filter(self, node: BlockNode, holder: NodeUser) -> None:
        """Take the filter ``node`` out of the graph: drained, its roots (devices, exports) go
        back to the node it filters, then ``holder`` lets go (closing it when that was the
        last reference; a filter's close ends its own state, such as a snapshot's guard)."""
        below = node.driver.filtered_child()
        if below is None:
            raise GenericError(f"Node '{node.name}' is not a filter")
        children = [link.node for link in node.children.values()]
        with self.drained([node, *children]):
            node.driver.stop_writing_child()
            node.move_roots_to(below)
            holder.release()
        log.debug("filter %r removed from above %r", node.name, below.name)

    def forget(self, node: BlockNode) -> None:
        with self._lock:
            if self._nodes.get(node.name) is node:
                del self._nodes[node.name]

    def _auto_name(self) -> str:
        # QEMU's automatic names: '#block' and a number, which a user cannot pick.
        return f"#block{next(self._auto_names) * 100 + 1:03d}"

    # -- opening -----------------------------------------------------------------------------
    def open_node(self, options: dict[str, Any], *, read_only: bool | None = None) -> BlockNode:
        """Open a node (and its inline children) from ``options``.

        The caller must take a reference on the returned node at once (``add_user``): a node
        without users is closed by the next ``remove_user`` of anything it holds.
        Raises ``GenericError`` for bad options or an image it refuses.
        """
        if not isinstance(options, dict):
            raise GenericError("Invalid parameter type for 'options', expected: object")
        opts = Options(options)
        driver_name = opts.str("driver", required=True)
        assert driver_name is not None
        driver_cls = driver_class(driver_name)
        if driver_cls is None:
            raise GenericError(f"Parameter 'driver' does not accept value '{driver_name}'")
        name = opts.str("node-name")
        ro = opts.bool("read-only", bool(read_only))
        opts.bool("auto-read-only", False)
        force_share = opts.bool("force-share", False)
        if force_share and not ro:
            raise GenericError("force-share=on can only be used with read-only images")
        discard = opts.enum("discard", ("ignore", "off", "unmap", "on"), "ignore")
        opts.enum("detect-zeroes", ("off", "on", "unmap"), "off")
        cache = opts.raw("cache")
        if cache is not None and not isinstance(cache, dict):
            raise GenericError("Invalid parameter type for 'cache', expected: object")
        # An option fleece accepts does what it says: these two it cannot do, so it refuses
        # them rather than ignore them (the daemon's command line says the same).
        if cache and cache.get("direct"):
            raise GenericError("cache.direct=on is not supported: fleece does not open images "
                               "with O_DIRECT")
        if cache and cache.get("no-flush"):
            raise GenericError("cache.no-flush=on is not supported: fleece always passes "
                               "flushes on")
        with self._lock:
            if name is None:
                name, auto = self._auto_name(), True
            else:
                if not _NODE_NAME.fullmatch(name):
                    raise GenericError(f"Invalid node-name: '{name}'")
                if name in self._nodes:
                    raise GenericError(f"Duplicate nodes with node-name='{name}'")
                auto = False
            node = BlockNode(self, name, driver_name, read_only=ro, auto_named=auto)
            node.force_share = force_share
            node.discard_unmap = discard in ("unmap", "on")
            self._nodes[name] = node
        try:
            node.driver = driver_cls(node)
            node.driver.open(opts)
            opts.finish()
        except BaseException:
            node.closed = True
            try:
                node.driver.close()
            finally:
                for child in list(node.children):
                    node.detach_child(child)
                self.forget(node)
            raise
        return node

    def open_child(
        self,
        parent: BlockNode,
        child_name: str,
        ref: Any,
        role: ChildRole,
        *,
        read_only: bool | None = None,
    ) -> BlockNode:
        """Open or look up ``ref`` (options dict or node name) and link it under ``parent``."""
        if isinstance(ref, str):
            node = self.find(ref)
            if node is None:
                raise NodeNotFound(f"Cannot find device='{ref}' nor node-name='{ref}'")
            if node is parent:
                raise GenericError(f"Node '{ref}' cannot be its own {child_name}")
            parent.attach_child(child_name, node, role)
            return node
        if isinstance(ref, dict):
            # Inline children inherit what QEMU lets them inherit from their parent.
            inherited: dict[str, Any] = {"read-only": parent.read_only if read_only is None
                                         else read_only}
            if parent.force_share:
                inherited["force-share"] = True
            if parent.discard_unmap:
                inherited["discard"] = "unmap"
            try:
                node = self.open_node({**inherited, **ref})
            except QMPError as exc:  # name the option by its path, as QEMU does
                nested = in_member(exc, child_name)
                if nested is exc:
                    raise
                raise nested from exc
            try:
                parent.attach_child(child_name, node, role)
            except BaseException:
                node.close()
                raise
            return node
        raise GenericError(f"Invalid parameter type for '{child_name}', expected: object or string")
