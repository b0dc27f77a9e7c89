"""Dirty bitmaps: which parts of a node were written since a point in time.

Design note
-----------
* A :class:`DirtyBitmap` has one bit per ``granularity`` bytes of its node (a
  :class:`fleece.bitmap.ClusterBitmap`). Every write, write-zeroes or discard that *reaches* the
  node marks the bitmaps that record; a write the node skips (``pwrite(unchanged=True)``, a
  discard ignored without ``discard=unmap``) marks nothing.
* Marking happens *after* the request, even a failed one (the bytes may have changed anyway),
  while the request still counts in flight: the node's write path marks its
  :class:`NodeBitmaps` on the way out, so a drained section sees every write marked.
* A backup job *freezes* a bitmap: it gets a *successor* that records from then on while the
  frozen bitmap keeps the job's input unchanged (QEMU's successor/abdicate/reclaim). A frozen
  or exported bitmap is *busy*: commands that would change or use it are refused.
* The bitmaps of a node belong to it (``node.bitmaps``); :func:`find_bitmap` and friends are
  the lookups the commands use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fleece import bitmap as cluster_bitmap
from fleece.errors import GenericError

if TYPE_CHECKING:
    from fleece.bitmap import ClusterBitmap
    from fleece.block.node import BlockNode

#: QEMU's bounds: granularity is a power of two from 512 bytes to 2 GiB (a QAPI uint32)
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
#: QEMU's BDRV_BITMAP_MAX_NAME_SIZE
MAX_NAME_LENGTH = 1023
#: QEMU's default granularity when the node has no cluster size
DEFAULT_GRANULARITY = 64 * 1024

# check flags, as QEMU's bdrv_dirty_bitmap_check takes them
CHECK_BUSY = 1
CHECK_READONLY = 2
CHECK_INCONSISTENT = 4
CHECK_DEFAULT = CHECK_BUSY | CHECK_READONLY | CHECK_INCONSISTENT
CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT


class DirtyBitmap:
    """One named (or anonymous) dirty bitmap over ``size`` bytes.

    Thread-safe: marks come from any I/O thread; a lock guards the bits.
    """

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int,
        *,
        disabled: bool = False,
        persistent: bool = False,
    ) -> None:
        check_granularity(granularity)
        self.name = name
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.bits = cluster_bitmap.ClusterBitmap(-(-size // granularity))
        self.disabled = disabled
        self.persistent = persistent
        #: loaded from an image that was not closed properly: unusable but removable
        self.inconsistent = False
        #: the node is read-only: the bitmap cannot be changed (QEMU's readonly bitmaps)
        self.readonly = False
        #: in use by a job or an export
        self.busy = False
        #: records the writes while a job holds this bitmap frozen
        self.successor: DirtyBitmap | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<DirtyBitmap {self.name!r} granularity={self.granularity} "
            f"count={self.count()} recording={self.recording}>"
        )

    # -- state ---------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return not self.disabled

    @property
    def recording(self) -> bool:
        """QEMU's ``recording``: this bitmap, or the successor standing in for it, records."""
        successor = self.successor
        return not self.disabled or (successor is not None and not successor.disabled)

    def check(self, flags: int) -> None:
        """QEMU's ``bdrv_dirty_bitmap_check``: ``GenericError`` when busy / read-only /
        inconsistent, as ``flags`` asks."""
        if flags & CHECK_BUSY and self.busy:
            raise GenericError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be "
                "used"
            )
        if flags & CHECK_READONLY and self.readonly:
            raise GenericError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & CHECK_INCONSISTENT and self.inconsistent:
            raise GenericError(
                f"Bitmap '{self.name}' is inconsistent and cannot be used (try "
                "block-dirty-bitmap-remove to delete this bitmap from disk)"
            )

    # -- bits ----------------------------------------------------------------------------------
    def _bit_span(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        offset = max(0, offset)
        if offset >= end:
            return 0, 0
        first = offset >> self.shift
        return first, ((end - 1) >> self.shift) + 1 - first

    def mark(self, offset: int, length: int) -> None:
        """Set the bits covering ``[offset, offset + length)`` (clipped to the size)."""
        first, count = self._bit_span(offset, length)
        if count:
            with self._lock:
                self.bits.set_range(first, count)

    def record(self, offset: int, length: int) -> None:
        """A write reached the node: mark this bitmap, or its successor while frozen.

        The successor's bits are only ever touched under this bitmap's lock, so a mark never
        lands in a successor that :meth:`abdicate` / :meth:`reclaim` already took apart.
        """
        first, count = self._bit_span(offset, length)
        if not count:
            return
        with self._lock:
            target = self.successor if self.successor is not None else self
            if not target.disabled:
                target.bits.set_range(first, count)

    def clear(self) -> None:
        with self._lock:
            self.bits.clear_range(0, len(self.bits))

    def get(self, offset: int) -> bool:
        """Whether the byte at ``offset`` is dirty."""
        with self._lock:
            return self.bits.get(offset >> self.shift)

    def count(self) -> int:
        """Dirty bytes, counted in whole granules as QEMU counts them."""
        with self._lock:
            return self.bits.count() << self.shift

    def snapshot(self) -> ClusterBitmap:
        """A copy of the bits."""
        with self._lock:
            return self.bits.copy()

    def restore(self, bits: ClusterBitmap) -> None:
        """Put back bits taken by :meth:`snapshot` (a transaction's undo)."""
        with self._lock:
            self.bits = bits.copy()

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """``(offset, length, dirty)`` byte extents exactly covering the range (clipped to
        the size), alternating dirty and clean."""
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return
        first, count = self._bit_span(offset, end - offset)
        with self._lock:
            bit_runs = list(self.bits.runs(first, first + count))
        for bit, n, value in bit_runs:
            start = max(offset, bit << self.shift)
            stop = min(end, (bit + n) << self.shift)
            if start < stop:
                yield start, stop - start, value

    def dirty_runs(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of each dirty byte extent."""
        for start, length, dirty in self.runs():
            if dirty:
                yield start, length

    def merge_from(self, other: DirtyBitmap) -> None:
        """OR ``other`` (same size, any granularity) into this bitmap."""
        if other.size != self.size:
            raise GenericError(
                f"Bitmaps are of different sizes (destination size is {self.size}, source "
                f"size is {other.size}) and can't be merged"
            )
        if other.granularity == self.granularity:
            bits = other.snapshot()
            with self._lock:
                self.bits.merge(bits)
            return
        for start, length in list(other.dirty_runs()):
            self.mark(start, length)

    # -- freezing for a job -------------------------------------------------------------------
    def freeze(self) -> DirtyBitmap:
        """Give the bitmap a successor that records from now on; the bitmap becomes busy and
        stops changing. ``GenericError`` if it is busy already."""
        with self._lock:
            if self.busy or self.successor is not None:
                raise GenericError(
                    "Cannot create a successor for a bitmap that is in-use by an operation"
                )
            successor = DirtyBitmap("", self.size, self.granularity, disabled=self.disabled)
            self.successor = successor
            self.disabled = True
            self.busy = True
            return successor

    def abdicate(self) -> None:
        """End a freeze keeping only what the successor recorded (the job consumed the rest)."""
        with self._lock:
            successor = self._end_freeze()
            self.bits = successor.bits

    def reclaim(self) -> None:
        """End a freeze keeping everything: the frozen bits and what the successor recorded."""
        with self._lock:
            successor = self._end_freeze()
            self.bits.merge(successor.bits)

    def _end_freeze(self) -> DirtyBitmap:
        successor = self.successor
        if successor is None:
            raise GenericError(f"Bitmap '{self.name}' is not frozen")
        self.successor = None
        self.disabled = successor.disabled
        self.busy = False
        return successor

    # -- introspection -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """QEMU's ``BlockDirtyInfo``."""
        info: dict[str, Any] = {
            "name": self.name,
            "recording": self.recording,
            "persistent": self.persistent,
            "busy": self.busy,
            "granularity": self.granularity,
            "count": self.count(),
        }
        if self.inconsistent:
            info["inconsistent"] = True
        return info


def check_granularity(granularity: int) -> None:
    """``GenericError`` unless ``granularity`` is a power of two in ``[512, 2 GiB]``."""
    if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
        raise GenericError("Granularity must be power of 2 and at least 512")
    if granularity > MAX_GRANULARITY:
        raise GenericError("Parameter 'granularity' expects uint32_t")


class NodeBitmaps:
    """The named dirty bitmaps of one node (``node.bitmaps``)."""

    def __init__(self) -> None:
        self._bitmaps: dict[str, DirtyBitmap] = {}
        self._snapshot: tuple[DirtyBitmap, ...] = ()
        self._lock = threading.Lock()

    def list(self) -> tuple[DirtyBitmap, ...]:
        """The bitmaps, oldest first (a tuple replaced on change: safe to iterate anywhere)."""
        return self._snapshot

    def get(self, name: str) -> DirtyBitmap | None:
        return self._bitmaps.get(name)

    def add(self, node: BlockNode, bitmap: DirtyBitmap) -> None:
        with self._lock:
            if bitmap.name in self._bitmaps:
                raise GenericError(f"Bitmap already exists: {bitmap.name}")
            self._bitmaps[bitmap.name] = bitmap
            self._snapshot = tuple(self._bitmaps.values())
        node.invalidate_routes()  # native writes would not mark it

    def remove(self, node: BlockNode, bitmap: DirtyBitmap) -> None:
        with self._lock:
            if self._bitmaps.get(bitmap.name) is not bitmap:
                return
            del self._bitmaps[bitmap.name]
            self._snapshot = tuple(self._bitmaps.values())


def node_bitmaps(node: BlockNode) -> NodeBitmaps:
    """The bitmaps of ``node``."""
    return node.bitmaps


def bitmaps_on(node: BlockNode) -> tuple[DirtyBitmap, ...]:
    """The bitmaps of ``node``, oldest first."""
    return node.bitmaps.list()


def find_bitmap(node: BlockNode, name: str) -> DirtyBitmap | None:
    """The bitmap ``name`` of ``node``, or of the node below the filters a backup inserted
    above it (they hold no bitmaps of their own)."""
    return node.skip_implicit_filters().bitmaps.get(name)


def default_granularity(node: BlockNode) -> int:
    """QEMU's default: the node's cluster size clamped to [4 KiB, 64 KiB], else 64 KiB."""
    cluster = node.driver.image_info().get("cluster-size")
    if isinstance(cluster, int) and cluster > 0:
        return min(DEFAULT_GRANULARITY, max(4096, cluster))
    return DEFAULT_GRANULARITY


def query_dirty_bitmaps(node: BlockNode) -> list[dict[str, Any]]:
    """``BlockDirtyInfo`` for each bitmap of ``node``, newest first as QEMU lists them."""
    return [bitmap.info() for bitmap in reversed(bitmaps_on(node))]


def add_bitmap_info(info: dict[str, Any], node: BlockNode) -> dict[str, Any]:
    """Add ``dirty-bitmaps`` to a ``BlockDeviceInfo`` when the node has bitmaps."""
    bitmaps = query_dirty_bitmaps(node)
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


# -- bitmaps published by NBD exports ---------------------------------------------------------
_published: dict[int, tuple[object, BlockNode, tuple[DirtyBitmap, ...]]] = {}
_published_lock = threading.Lock()


def publish(owner: object, node: BlockNode, bitmaps: list[DirtyBitmap]) -> None:
    """``owner`` (an export of ``node``) offers ``bitmaps`` as ``qemu:dirty-bitmap:NAME``:
    they become busy until :func:`unpublish`."""
    with _published_lock:
        for bitmap in bitmaps:
            bitmap.busy = True
        _published[id(owner)] = (owner, node, tuple(bitmaps))


def unpublish(owner: object) -> None:
    """``owner`` no longer offers its bitmaps: they are no longer busy."""
    with _published_lock:
        entry = _published.pop(id(owner), None)
        if entry is not None:
            for bitmap in entry[2]:
                bitmap.busy = False


def published(node: BlockNode, name: str) -> DirtyBitmap | None:
    """The bitmap an export of ``node`` offers under ``name`` (the export may since serve
    from a filter inserted above the node it was made on: looked up down through filters)."""
    with _published_lock:
        entries = list(_published.values())
    seen: set[int] = set()
    walk: BlockNode | None = node
    while walk is not None and id(walk) not in seen:
        seen.add(id(walk))
        for _, holder, bitmaps in entries:
            if holder is walk:
                for bitmap in bitmaps:
                    if bitmap.name == name:
                        return bitmap
        walk = walk.driver.filtered_child()
    return None


def status_extents(
    node: BlockNode, name: str, offset: int, length: int, one: bool, limit: int
) -> list[tuple[int, int]]:
    """NBD block status of the ``qemu:dirty-bitmap:NAME`` context: ``(length, 1 if dirty)``
    extents from ``offset``. Raises ``OSError(EINVAL)`` when the export offers no such
    bitmap."""
    import errno

    bitmap = published(node, name)
    if bitmap is None:
        raise OSError(errno.EINVAL, f"no dirty bitmap '{name}' is exported")
    extents: list[tuple[int, int]] = []
    covered = offset
    for start, size, dirty in bitmap.runs(offset, length):
        extents.append((size, 1 if dirty else 0))
        covered = start + size
        if one or len(extents) >= limit:
            break
    end = min(offset + length, node.size)
    if not extents or (covered < end and not one and len(extents) < limit):
        # past the bitmap's size (the node grew): clean
        extents.append((end - covered, 0))
    return [(size, flags) for size, flags in extents if size > 0]
