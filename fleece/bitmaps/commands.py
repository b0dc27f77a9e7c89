"""The dirty bitmap commands of ``Storage``: ``block-dirty-bitmap-add/remove/clear/enable/
disable/merge``, and the rules a backup's ``bitmap`` / ``bitmap-mode`` arguments follow.

Every command runs in two phases so that a transaction can take part: ``prepare_bitmap_*``
checks the arguments and the bitmaps' state and returns a :class:`BitmapAction` without changing
anything (``GenericError`` when the command would fail); the action's :meth:`BitmapAction.apply`
then makes the change, which cannot fail, and :meth:`BitmapAction.undo` reverts an applied
action. The QMP command is prepare-then-apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleece.block.dirty_bitmap import (
    CHECK_ALLOW_RO,
    CHECK_BUSY,
    CHECK_DEFAULT,
    CHECK_READONLY,
    MAX_NAME_LENGTH,
    DirtyBitmap,
    bitmaps_on,
    check_granularity,
    default_granularity,
    find_bitmap,
    node_bitmaps,
)
from fleece.block.node import BlockNode
from fleece.commands import Nodes, command
from fleece.errors import DeviceNotFound, GenericError, QMPError

BITMAP_MODES = ("on-success", "never", "always")


def _nothing() -> None:
    return None


@dataclass
class BitmapAction:
    """A checked bitmap command: ``apply`` performs it (never fails), ``undo`` reverts it."""

    description: str
    _apply: Callable[[], None]
    _undo: Callable[[], None] = _nothing
    applied: bool = False

    def apply(self) -> None:
        if not self.applied:
            self._apply()
            self.applied = True

    def undo(self) -> None:
        if self.applied:
            self._undo()
            self.applied = False


@dataclass(frozen=True)
class BackupBitmap:
    """A backup's bitmap arguments once checked: the effective sync mode (``incremental`` is
    ``bitmap`` with ``on-success``), the bitmap, and its mode."""

    sync: str
    bitmap: DirtyBitmap | None
    mode: str


def check_backup_bitmap(
    source: BlockNode, sync: str, name: str | None, mode: str | None
) -> BackupBitmap:
    """QEMU's rules for ``sync`` / ``bitmap`` / ``bitmap-mode`` (iotest 257), in QEMU's order,
    with QEMU's messages. Raises ``GenericError``; changes nothing."""
    if sync in ("bitmap", "incremental") and name is None:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise GenericError(
                f"Bitmap sync mode must be 'on-success' when using sync mode '{sync}'"
            )
        sync, mode = "bitmap", "on-success"
    bitmap: DirtyBitmap | None = None
    if name is not None:
        bitmap = find_bitmap(source, name)
        if bitmap is None:
            raise GenericError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check(CHECK_ALLOW_RO)
        if sync == "none":
            raise GenericError(
                f"sync mode '{sync}' does not produce meaningful bitmap outputs"
            )
        if mode == "never" and sync != "bitmap":
            raise GenericError(
                f"Bitmap sync mode '{mode}' has no meaningful effect when combined with sync "
                f"mode '{sync}'"
            )
        if mode != "never":
            bitmap.check(CHECK_DEFAULT)  # the job will write it: it must be writable
    elif mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    return BackupBitmap(sync, bitmap, mode or "on-success")


class BitmapCommands:
    """The ``block-dirty-bitmap-*`` commands, given the nodes they look up (bitmaps live with
    their nodes, :mod:`fleece.block.dirty_bitmap`). The ``prepare_bitmap_*`` methods are the
    same actions in two phases, for ``transaction``."""

    def __init__(self, nodes: Nodes) -> None:
        self.find_node = nodes.find

    # -- lookups -------------------------------------------------------------------------------
    def _bitmap_node(self, node: str) -> BlockNode:
        """The node, by device or node name (below the filters a backup put above a device);
        QEMU's bitmap commands say so in their own words."""
        try:
            return self.find_node(node).skip_implicit_filters()
        except DeviceNotFound:
            raise GenericError(f"Node '{node}' not found") from None

    def lookup_bitmap(self, node: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
        """QEMU's ``block_dirty_bitmap_lookup``: ``GenericError`` for an unknown node or
        bitmap."""
        bs = self._bitmap_node(node)
        bitmap = find_bitmap(bs, name)
        if bitmap is None:
            raise GenericError(f"Dirty bitmap '{name}' not found")
        return bs, bitmap

    # -- add / remove --------------------------------------------------------------------------
    def prepare_bitmap_add(
        self,
        node: str,
        name: str,
        granularity: int | None = None,
        persistent: bool = False,
        disabled: bool = False,
    ) -> BitmapAction:
        """Check ``block-dirty-bitmap-add``'s arguments and return the action that adds the
        bitmap (and its undo, for a transaction). ``GenericError`` for a bad name,
        granularity or node; nothing changes until the action is applied."""
        if not name:
            raise GenericError("Bitmap name cannot be empty")
        try:
            bs = self.find_node(node).skip_implicit_filters()
        except QMPError as exc:
            raise GenericError(str(exc)) from exc
        if granularity is None:
            granularity = default_granularity(bs)
        else:
            check_granularity(granularity)
        if persistent:
            self._check_persistent(bs, name, granularity)
        if find_bitmap(bs, name) is not None:
            raise GenericError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME_LENGTH:
            raise GenericError(f"Bitmap name too long: {name}")
        bitmap = DirtyBitmap(name, bs.size, granularity, disabled=disabled,
                             persistent=persistent)
        registry = node_bitmaps(bs)
        return BitmapAction(
            f"block-dirty-bitmap-add {name}",
            lambda: registry.add(bs, bitmap),
            lambda: registry.remove(bs, bitmap),
        )

    def _check_persistent(self, bs: BlockNode, name: str, granularity: int) -> None:
        check = getattr(bs.driver, "check_new_persistent_bitmap", None)
        if check is None:
            raise GenericError(
                f"Can't store persistent bitmaps to {bs.name}: Operation not supported"
            )
        if bs.read_only:
            raise GenericError(
                f"Cannot store persistent bitmaps in read-only node '{bs.name}'"
            )
        persistent = [b for b in bitmaps_on(bs) if b.persistent]
        directory = sum(24 + len(b.name.encode()) + (-(24 + len(b.name.encode())) % 8)
                        for b in persistent)
        check(name, granularity, len(persistent), directory)

    @command(
        "block-dirty-bitmap-add",
        {"node": "str", "name": "str", "*granularity": "int", "*persistent": "bool",
         "*disabled": "bool"},
    )
    def block_dirty_bitmap_add(
        self,
        node: str,
        name: str,
        granularity: int | None = None,
        persistent: bool = False,
        disabled: bool = False,
    ) -> dict[str, Any]:
        """Create a dirty bitmap on ``node`` (a node or device name). ``persistent`` stores it
        in the qcow2 image when the node closes; ``disabled`` makes it not record yet."""
        self.prepare_bitmap_add(node, name, granularity, persistent, disabled).apply()
        return {}

    def prepare_bitmap_remove(self, node: str, name: str) -> BitmapAction:
        """The action that removes the bitmap, and its undo; ``GenericError`` when the
        bitmap is unknown or busy. Nothing changes until it is applied."""
        bs, bitmap = self.lookup_bitmap(node, name)
        bitmap.check(CHECK_BUSY | CHECK_READONLY)
        registry = node_bitmaps(bs)
        return BitmapAction(
            f"block-dirty-bitmap-remove {name}",
            lambda: registry.remove(bs, bitmap),
            lambda: registry.add(bs, bitmap),
        )

    @command("block-dirty-bitmap-remove", {"node": "str", "name": "str"})
    def block_dirty_bitmap_remove(self, node: str, name: str) -> dict[str, Any]:
        """Delete a bitmap (also from the image, when it is persistent, at close)."""
        self.prepare_bitmap_remove(node, name).apply()
        return {}

    # -- clear / enable / disable --------------------------------------------------------------
    def prepare_bitmap_clear(self, node: str, name: str) -> BitmapAction:
        """The action that clears the bitmap, and its undo (the old bits back); errors as
        :meth:`prepare_bitmap_remove`."""
        _, bitmap = self.lookup_bitmap(node, name)
        bitmap.check(CHECK_DEFAULT)
        saved: list[Any] = []

        def apply() -> None:
            saved.append(bitmap.snapshot())
            bitmap.clear()

        def undo() -> None:
            if saved:
                bitmap.restore(saved.pop())

        return BitmapAction(f"block-dirty-bitmap-clear {name}", apply, undo)

    @command("block-dirty-bitmap-clear", {"node": "str", "name": "str"})
    def block_dirty_bitmap_clear(self, node: str, name: str) -> dict[str, Any]:
        """Mark every granule clean."""
        self.prepare_bitmap_clear(node, name).apply()
        return {}

    def _prepare_toggle(self, node: str, name: str, disabled: bool) -> BitmapAction:
        _, bitmap = self.lookup_bitmap(node, name)
        bitmap.check(CHECK_ALLOW_RO)
        old = bitmap.disabled

        def apply() -> None:
            bitmap.disabled = disabled

        def undo() -> None:
            bitmap.disabled = old

        verb = "disable" if disabled else "enable"
        return BitmapAction(f"block-dirty-bitmap-{verb} {name}", apply, undo)

    def prepare_bitmap_enable(self, node: str, name: str) -> BitmapAction:
        """The action that makes the bitmap record writes, and its undo; errors as
        :meth:`prepare_bitmap_remove`."""
        return self._prepare_toggle(node, name, False)

    def prepare_bitmap_disable(self, node: str, name: str) -> BitmapAction:
        """The action that stops the bitmap recording, and its undo; errors as
        :meth:`prepare_bitmap_remove`."""
        return self._prepare_toggle(node, name, True)

    @command("block-dirty-bitmap-enable", {"node": "str", "name": "str"})
    def block_dirty_bitmap_enable(self, node: str, name: str) -> dict[str, Any]:
        """Start recording writes."""
        self.prepare_bitmap_enable(node, name).apply()
        return {}

    @command("block-dirty-bitmap-disable", {"node": "str", "name": "str"})
    def block_dirty_bitmap_disable(self, node: str, name: str) -> dict[str, Any]:
        """Stop recording writes (the bits stay)."""
        self.prepare_bitmap_disable(node, name).apply()
        return {}

    # -- merge ---------------------------------------------------------------------------------
    def prepare_bitmap_merge(self, node: str, target: str, bitmaps: list[Any]) -> BitmapAction:
        """The action that ORs ``bitmaps`` into ``target``, and its undo; ``GenericError`` for
        an unknown or busy bitmap or a granularity mismatch."""
        bs, dst = self.lookup_bitmap(node, target)
        sources: list[DirtyBitmap] = []
        for item in bitmaps:
            if isinstance(item, str):
                src = find_bitmap(bs, item)
                if src is None:
                    raise GenericError(f"Dirty bitmap '{item}' not found")
            elif isinstance(item, dict):
                src_node, src_name = item.get("node"), item.get("name")
                if not isinstance(src_node, str):
                    raise GenericError("Parameter 'node' is missing")
                if not isinstance(src_name, str):
                    raise GenericError("Parameter 'name' is missing")
                _, src = self.lookup_bitmap(src_node, src_name)
            else:
                raise GenericError(
                    "Invalid parameter type for 'bitmaps[0]', expected: string or object"
                )
            src.check(CHECK_ALLOW_RO)
            if src.size != dst.size:
                raise GenericError(
                    f"Bitmaps are of different sizes (destination size is {dst.size}, source "
                    f"size is {src.size}) and can't be merged"
                )
            sources.append(src)
        dst.check(CHECK_DEFAULT)
        saved: list[Any] = []

        def apply() -> None:
            saved.append(dst.snapshot())
            merged = DirtyBitmap("", dst.size, dst.granularity)
            for src in sources:
                merged.merge_from(src)
            dst.merge_from(merged)

        def undo() -> None:
            if saved:
                dst.restore(saved.pop())

        return BitmapAction(f"block-dirty-bitmap-merge {target}", apply, undo)

    @command(
        "block-dirty-bitmap-merge",
        {"node": "str", "target": "str", "bitmaps": "array"},
    )
    def block_dirty_bitmap_merge(
        self, node: str, target: str, bitmaps: list[Any]
    ) -> dict[str, Any]:
        """OR the ``bitmaps`` (names on ``node``, or ``{node, name}``) into ``target``."""
        self.prepare_bitmap_merge(node, target, bitmaps).apply()
        return {}


def export_bitmap(
    node: BlockNode,
    item: Any,
    read_only: bool,
    lookup: Callable[[str, str], tuple[BlockNode, DirtyBitmap]],
) -> DirtyBitmap:
    """The bitmap an export of ``node`` publishes for ``item``, checked as QEMU (7.1+) checks
    it: a name is looked for on the node and down its backing chain (through filters), and an
    enabled bitmap of a writable node cannot go into a read-only export; ``{node, name}`` is
    looked up as the bitmap commands do (``lookup``). Raises ``GenericError``; the caller marks
    the bitmap busy."""
    if isinstance(item, dict):
        src_node, name = item.get("node"), item.get("name")
        if not isinstance(src_node, str) or not isinstance(name, str):
            raise GenericError("Parameter 'bitmaps' expects a name or {node, name}")
        _, bitmap = lookup(src_node, name)
    elif isinstance(item, str):
        holder: BlockNode | None = node
        found: DirtyBitmap | None = None
        while holder is not None:
            found = find_bitmap(holder, item)
            if found is not None:
                break
            holder = holder.backing() or _filtered(holder)
        if found is None or holder is None:
            raise GenericError(f"Bitmap '{item}' is not found")
        if read_only and not holder.read_only and found.enabled:
            raise GenericError(f"Enabled bitmap '{item}' incompatible with readonly export")
        bitmap = found
    else:
        raise GenericError("Parameter 'bitmaps' expects a name or {node, name}")
    bitmap.check(CHECK_ALLOW_RO)
    return bitmap


def _filtered(node: BlockNode) -> BlockNode | None:
    """The child a filter node passes I/O to, if ``node`` is one."""
    return node.driver.filtered_child()
