"""``qcow2``: QEMU's copy-on-write image format (v2 "compat 0.10" and v3 "compat 1.1").

Design note
-----------
* **Write-through metadata, ordered for power loss.** Every change to an L1 or L2 entry, a
  refcount or the header is written to the file child when it is made, in crash-safe order:
  refcounts before anything references a cluster; new L2 tables (zeroed) before the L1 entry;
  copied-on-write data before the L2 entry that maps it; references removed before refcounts
  drop. "Before" means *on stable storage before* (:mod:`fleece.block.qcow2.order`): a
  dependent write first syncs the file if what it depends on was written since the last sync.
  A ``kill -9`` or a power loss can leak clusters, never corrupt; ``flush()`` has nothing of
  its own to write: the node's flush of the file child makes everything durable.
* **Clusters come from a reservation** (16 MiB allocated at once, doubling up to 256 MiB
  while a stream of writes uses them up; the file grown to cover it; both synced by the first
  write that maps one of them): an allocating write's refcounts are then already durable and
  it syncs nothing, and no L2 entry ever points past the end of the file. A crash leaks the
  unused rest; a close frees it (and shrinks the file back).
* **One metadata lock** (an ``RLock``) guards tables, caches and the allocator. Reads and
  in-place writes take it only to turn their range into a *plan* (host runs, zero runs,
  backing runs, compressed clusters) and to take an I/O ticket; data moves without it.
  Allocating writes, zeroing and discards run under it (they serialise).
* **Freeing waits for older I/O.** A host cluster is freed (discard, zeroing with unmap,
  rewriting a compressed cluster) by first removing its reference, then waiting until every
  I/O ticket taken before that is done, then dropping the refcount. So a cluster is never
  reused while a read or write planned earlier still targets it.
* **Whole runs, not clusters.** L2 tables are cached as native ``array('Q')`` tables in a
  bounded LRU (32 MiB of entries by default, ``l2-cache-size`` overrides). A request maps a
  table slice at once (classification and run detection in one compiled loop,
  :mod:`fleece.block.qcow2.kernels`), and contiguous host clusters become one file read or
  write.
* **Persistent dirty bitmaps** (:mod:`fleece.block.qcow2.bitmaps`): loaded on open (one left
  *in use* by a crash comes back inconsistent), flagged in use by a writable open, stored on
  close or when going read-only; autoclear bit 0 is kept, any other autoclear bit is cleared.
* **Dirty images**: a read-only open works; a writable open is *refused* (fleece does not
  rebuild refcounts; ``qemu-img check -r all`` repairs them). Corrupt images likewise, and
  images with internal snapshots are read-only (their shared clusters are never written).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, ClassVar

from fleece.block.direct import DirectWrite
from fleece.block.dirty_bitmap import DirtyBitmap, bitmaps_on, node_bitmaps
from fleece.block.driver import BlockStatus, Driver, HostMap, Options, Status
from fleece.block.node import BlockNode
from fleece.block.perm import ChildRole, Perm
from fleece.block.qcow2 import kernels
from fleece.block.qcow2.bitmaps import BitmapStore, LoadedBitmap, check_new_bitmap
from fleece.block.qcow2.create import probe_format
from fleece.block.qcow2.format import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSED,
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    OFF_AUTOCLEAR,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SHARED,
    UNALLOC,
    ZERO,
    CorruptEntry,
    be64_array,
    check_layout,
    check_metadata_layout,
    classify_entry,
    header_area,
    header_used,
    parse_header,
    zero_table,
)
from fleece.block.qcow2.order import WriteOrder, rewrite_header
from fleece.block.qcow2.refcount import Refcounts
from fleece.errors import GenericError, ImageError

#: an L1 or L2 table: its entries as native integers (:func:`be64_array`)
Table = array

_ZEROES = bytes(1 << 21)
_MAX_CHAIN = 64
_DEFAULT_L2_CACHE = 32 * 1024 * 1024
#: host clusters allocated at once for new clusters (allocating and direct writes, L2
#: tables): one refcount update, and one sync, per reservation. The first is this many bytes;
#: each one used up doubles the next, up to the maximum (and to the virtual disk's size).
_RESERVE_BYTES = 16 << 20
_RESERVE_MAX_BYTES = 256 << 20
#: the first reservation of an image about to receive a stream of writes (prepare_writes)
_PREPARED_RESERVE_BYTES = 64 << 20
_RESERVE_MAX_CLUSTERS = 32768
#: a reservation with this fraction of it left makes the next one and syncs it in the
#: background, so a stream of allocating writes never waits for a sync (which writes back
#: every dirty page of the file: a tenth of a second under a stream of copies)
_AHEAD_AT = 4
_MAX_BEYOND_EOF = 1 << 30  # an in-place write further past the end of the file is corruption

log = logging.getLogger(__name__)

_opening = threading.local()  # the image files being opened in this thread (backing loops)

#: QEMU's qcow2 options fleece accepts and ignores (metadata is written through, always)
_BOOL_OPTIONS = (
    "lazy-refcounts", "pass-discard-snapshot", "discard-no-unref",
)
_INT_OPTIONS = (
    "cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-clean-interval",
)

_ABSENT: Any = object()


def _zero_fill(view: memoryview) -> None:
    n = len(view)
    pos = 0
    while pos < n:
        chunk = min(n - pos, len(_ZEROES))
        view[pos : pos + chunk] = _ZEROES[:chunk]
        pos += chunk


class _FileIO:
    """The file child for metadata: short reads at the end of the file read as zeroes."""

    def __init__(self, file: BlockNode) -> None:
        self.file = file
        self.end = file.size  # cached; only this driver grows the file
        #: writes are durable when they return (set under the driver's lock, which every
        #: metadata write holds: see ``_reserve_ahead``)
        self.fua = False

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_short(self, offset: int, length: int) -> bytes:
        end = self.file.driver.refresh_size()
        length = max(0, min(length, end - offset))
        return self.read(offset, length)

    def read_into(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        if end > self.end:
            self.end = self.file.driver.refresh_size()
        if offset >= self.end:
            _zero_fill(view)
            return
        if end > self.end:
            n = self.end - offset
            self.file.pread_into(offset, view[:n])
            _zero_fill(view[n:])
            return
        self.file.pread_into(offset, view)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.file.pwrite(offset, data, fua=self.fua)
        end = offset + len(data)
        if end > self.end:
            self.end = end

    def file_end(self) -> int:
        self.end = self.file.driver.refresh_size()
        return self.end


class Qcow2Driver(Driver):
    """A qcow2 image on its ``file`` child, with an optional ``backing`` child."""

    name: ClassVar[str] = "qcow2"

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self._lock = threading.RLock()
        self._io_done = threading.Condition(self._lock)
        self._tickets: set[int] = set()
        self._next_ticket = 0
        self._waiting = 0
        self._file: BlockNode | None = None
        self._zcache: tuple[int, bytes] | None = None
        self._l2_cache: OrderedDict[int, Table[int]] = OrderedDict()
        self._reserve = (0, 0)  # host clusters [next, end) allocated, not handed out yet

    # -- opening -----------------------------------------------------------------------------
    def open(self, options: Options) -> None:
        """Open the image on its ``file`` child and its backing chain.

        Raises :class:`ImageError` for an image fleece refuses (see
        :func:`fleece.block.qcow2.format.parse_header`), a writable open of a dirty, corrupt or
        snapshotted image, or a backing chain loop; ``GenericError`` for bad options.
        """
        if not options.has("file"):
            raise GenericError("Parameter 'file' is missing")
        file_ref = options.raw("file")
        backing_ref = options.raw("backing") if options.has("backing") else _ABSENT
        for key in _BOOL_OPTIONS:
            options.bool(key, False)
        self._pass_discard_request = options.bool("pass-discard-request", True)
        self._pass_discard_other = options.bool("pass-discard-other", False)
        self._reserve = (0, 0)  # host clusters [next, end) allocated, not handed out yet
        self._reserve_size = 0  # clusters in the next reservation (0: the first size)
        #: a freed cluster is punched out of the file (so a route may send pages without a
        #: copy: HostMap.zero_copy); False while unknown or when the file cannot punch
        self._zero_copy = False
        self._fresh = 0  # reserved clusters from this one on were never written (read zeroes)
        #: the reservation after this one, made ahead: (next, end, fresh, deferred mark)
        self._ahead: tuple[int, int, int, int] | None = None
        for key in _INT_OPTIONS:
            options.int(key, minimum=0)
        l2_cache = options.int("l2-cache-size", minimum=0)
        options.raw("overlap-check")
        if options.raw("data-file") is not None:
            raise ImageError("Unsupported qcow2 feature(s): external data file")
        if options.raw("encrypt") is not None:
            raise ImageError("Unsupported qcow2 feature(s): encryption")

        self._file = self.node.graph.open_child(self.node, "file", file_ref, ChildRole.FILE)
        self._io = _FileIO(self._file)
        self._order = WriteOrder(self._file.flush)
        stack: list[str] = getattr(_opening, "stack", None) or []
        _opening.stack = stack
        me = os.path.realpath(self._file.driver.filename() or f"<{self.node.name}>")
        if len(stack) >= _MAX_CHAIN:
            raise ImageError(f"qcow2 backing chain is too deep (more than {_MAX_CHAIN} images)")
        stack.append(me)
        try:
            self._load(l2_cache)
            self._open_backing(backing_ref)
        finally:
            stack.pop()

    def _load(self, l2_cache: int | None) -> None:
        io = self._io
        file_size = io.file_end()
        h = parse_header(io.read_short, file_size)
        check_layout(h, file_size)
        self.header = h
        writable = not self.node.read_only
        if writable and h.incompatible & INCOMPAT_CORRUPT:
            raise ImageError(
                "qcow2 image is marked corrupt: it can only be opened read-only (repair it "
                "with 'qemu-img check -r all')"
            )
        if writable and h.incompatible & INCOMPAT_DIRTY:
            raise ImageError(
                "qcow2 image is dirty (its refcounts may be stale): fleece opens dirty images "
                "read-only only; repair it with 'qemu-img check -r all'"
            )
        if writable and h.nb_snapshots:
            raise ImageError(
                f"qcow2 image has {h.nb_snapshots} internal snapshot(s): fleece opens such "
                "images read-only only"
            )
        cs = h.cluster_size
        self._cb = h.cluster_bits
        self._cs = cs
        self._zero_cluster = bytes(cs)
        self._l2_bits = h.cluster_bits - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        self._size = h.size
        self._v3 = h.version >= 3
        self._csize_shift = 62 - (h.cluster_bits - 8)
        self._csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self._coff_mask = (1 << self._csize_shift) - 1
        self._zstd = h.compression_type == COMPRESSION_ZSTD
        capacity = _DEFAULT_L2_CACHE if l2_cache is None else l2_cache
        self._l2_cache_tables = max(2, capacity // cs)
        self._zero_copy = self._punches()

        l1_bytes = io.read(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
        self._l1: Table[int] = be64_array(l1_bytes)
        reftable = be64_array(io.read(h.refcount_table_offset, h.refcount_table_clusters * cs))
        check_metadata_layout(h, file_size, self._l1, reftable)

        cb = h.cluster_bits
        meta: set[int] = {0}
        if h.l1_size:
            first = h.l1_table_offset >> cb
            meta.update(range(first, first + -(-h.l1_size * 8 // cs)))
        first = h.refcount_table_offset >> cb
        meta.update(range(first, first + h.refcount_table_clusters))
        meta.update((e & REFT_OFFSET_MASK) >> cb for e in reftable if e)
        meta.update((e & L1E_OFFSET_MASK) >> cb for e in self._l1 if e)
        self._meta = meta
        self._refs = Refcounts(
            io,
            cluster_bits=cb,
            order=h.refcount_order,
            table_offset=h.refcount_table_offset,
            table_clusters=h.refcount_table_clusters,
            table=reftable,
            meta=meta,
            write_order=self._order,
        )
        self._bitmaps = BitmapStore(io, self._refs, h, meta)
        for loaded in self._bitmaps.load(io.read_short(0, cs), file_size):
            self._register_bitmap(loaded, writable)
        if writable:
            self._bitmaps_writable()

    # -- persistent dirty bitmaps ------------------------------------------------------------
    def _register_bitmap(self, loaded: LoadedBitmap, writable: bool) -> None:
        """Make a bitmap read from the image one of the node's dirty bitmaps."""
        entry = loaded.entry
        bitmap = DirtyBitmap(
            entry.name, self._size, entry.granularity,
            disabled=loaded.inconsistent or not loaded.enabled, persistent=True,
        )
        bitmap.bits = loaded.bits
        bitmap.inconsistent = loaded.inconsistent
        bitmap.readonly = not writable
        node_bitmaps(self.node).add(self.node, bitmap)

    def _bitmaps_writable(self) -> None:
        """The image is (now) open for writing: keep the autoclear bit we maintain (bitmaps),
        clear the others (QEMU's rule for what a program does not maintain), and flag the
        stored bitmaps in use so that a crash is detected."""
        h = self.header
        keep = AUTOCLEAR_BITMAPS if self._bitmaps.entries else 0
        wrote = False
        if h.autoclear & ~keep:
            h.autoclear &= keep
            self._io.write(OFF_AUTOCLEAR, struct.pack(">Q", h.autoclear))
            wrote = True
        if self._bitmaps.mark_in_use() or wrote:
            # On disk before any guest write: else a power loss could leave a bitmap that
            # misses writes and still looks consistent.
            self._order.sync()
        for bitmap in bitmaps_on(self.node):
            bitmap.readonly = False

    def check_new_persistent_bitmap(self, name: str, granularity: int, existing: int,
                                    directory_size: int) -> None:
        """``GenericError`` (QEMU's wording) unless a bitmap could be stored in this image."""
        try:
            check_new_bitmap(self.header, name, granularity, existing, directory_size)
        except ValueError as exc:
            raise GenericError(
                f"Can't make bitmap '{name}' persistent in '{self.node.name}': {exc}"
            ) from exc

    def store_bitmaps(self) -> None:
        """Write the node's persistent bitmaps to the image (close, or going read-only).

        Raises ``OSError`` or ``ValueError``; the bitmaps on disk then stay as they were.
        """
        if self._file is None or getattr(self, "_bitmaps", None) is None:
            return
        records = [
            (b.name, b.granularity, b.snapshot(), b.enabled or b.successor is not None,
             b.inconsistent)
            for b in bitmaps_on(self.node)
            if b.persistent
        ]
        with self._lock:
            self._bitmaps.store(records)

    def reopen(self, read_only: bool) -> None:
        if read_only:
            with self._lock, contextlib.suppress(OSError):  # else the clusters leak
                self._release_reserves()
            with contextlib.suppress(OSError, ValueError):
                self.store_bitmaps()
            for bitmap in bitmaps_on(self.node):
                bitmap.readonly = True
        else:
            with self._lock:
                self._bitmaps_writable()
                self._zero_copy = self._punches()

    def _open_backing(self, ref: Any) -> None:
        if ref is None:
            return
        if ref is _ABSENT:
            name = self.header.backing_file
            if not name:
                return
            assert self._file is not None
            path = name
            if not os.path.isabs(path):
                base = os.path.dirname(self._file.driver.filename())
                path = os.path.join(base, path)
            fmt = self.header.backing_format
            if fmt is None:
                try:
                    fmt = probe_format(path)
                except OSError as exc:
                    raise ImageError(
                        f"Could not open backing file '{path}': {exc.strerror}"
                    ) from exc
            if fmt not in ("qcow2", "raw"):
                raise ImageError(f"Unsupported backing file format '{fmt}' for '{path}'")
            if os.path.realpath(path) in _opening.stack:
                raise ImageError(f"qcow2 backing chain loop: '{path}' is its own backing file")
            ref = {"driver": fmt, "file": {"driver": "file", "filename": path}}
        self.node.graph.open_child(
            self.node, "backing", ref, ChildRole.BACKING, read_only=True
        )

    def child_perm(self, role: ChildRole, read_only: bool) -> tuple[Perm, Perm]:
        """A writable image's file child is read, written and grown; else QEMU's defaults."""
        if role & ChildRole.FILE and not read_only:
            return (
                Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
                Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
            )
        return super().child_perm(role, read_only)

    def close(self) -> None:
        if self._file is None:  # the open failed before the image was read: nothing to undo
            return
        if not self.node.read_only:
            with self._lock, contextlib.suppress(OSError):  # else the clusters leak
                self._release_reserves(shrink=True)
            with contextlib.suppress(OSError, ValueError):  # they stay "in use": inconsistent
                self.store_bitmaps()
        self._l2_cache.clear()
        self._zcache = None

    # -- introspection -----------------------------------------------------------------------
    def size(self) -> int:
        return self._size

    def image_info(self) -> dict[str, Any]:
        h = self.header
        data: dict[str, Any] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "lazy-refcounts": bool(h.compatible & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": 1 << h.refcount_order,
            "corrupt": bool(h.incompatible & INCOMPAT_CORRUPT),
            "extended-l2": False,
            "compression-type": COMPRESSION_NAMES.get(h.compression_type, "zlib"),
        }
        bitmaps = self._bitmaps.info()
        if bitmaps:
            data["bitmaps"] = bitmaps
        info: dict[str, Any] = {
            "cluster-size": h.cluster_size,
            "format-specific": {"type": "qcow2", "data": data},
        }
        if h.incompatible & INCOMPAT_DIRTY:
            info["dirty-flag"] = True
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
        return info

    def backing_filename(self) -> str | None:
        return self.header.backing_file

    def change_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """Rewrite the header to name a new backing file (``None``: no backing file).

        A crash or a power loss leaves the old name or the new one (see
        :func:`~fleece.block.qcow2.order.rewrite_header`; a name spanning sectors the old header
        uses is written whole, as QEMU writes it). Raises
        ``GenericError`` when the image is read-only or the name does not fit.
        """
        self._check_writable()
        with self._lock:
            h = self.header
            first = self._io.read(0, h.cluster_size)
            used = header_used(h, first)
            old = (h.backing_file_offset, h.backing_file_size)
            try:
                area = header_area(h, first, filename, fmt if filename else None)
            except ValueError as exc:
                h.backing_file_offset, h.backing_file_size = old
                raise GenericError(f"Could not change the backing file: {exc}") from exc
            rewrite_header(self._io, self._order, first, used, area)
            h.backing_file = filename or None
            h.backing_format = fmt if filename else None

    # -- mapping -----------------------------------------------------------------------------
    def _l2_table(self, l1_index: int) -> Table[int] | None:
        """The cached L2 table for ``l1_index``, or None when it is unallocated."""
        offset = int(self._l1[l1_index]) & L1E_OFFSET_MASK
        if offset == 0:
            return None
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        table = be64_array(self._io.read(offset, self._cs))
        self._l2_cache[offset] = table
        if len(self._l2_cache) > self._l2_cache_tables:
            self._l2_cache.popitem(last=False)
        return table

    def _corrupt(self, what: str) -> OSError:
        return OSError(errno.EIO, f"qcow2 image '{self.filename()}' is corrupt: {what}")

    def _classify(self, entry: int) -> tuple[int, int]:
        """``(kind, host offset or entry)`` of one L2 entry (:func:`classify_entry`)."""
        try:
            return classify_entry(entry, self._cs, self._v3)
        except CorruptEntry as exc:
            raise self._corrupt(str(exc)) from None

    def _slice_runs(self, table: Table[int], i0: int, i1: int, cluster: int
                    ) -> list[tuple[int, int, int, int]]:
        """Runs ``(kind, first cluster, count, host or entry)`` of entries ``[i0, i1)`` of an
        L2 table, the first of them guest cluster ``cluster``."""
        try:
            return kernels.l2_runs(table, i0, i1, cluster, self._cs, self._v3)
        except CorruptEntry as exc:
            raise self._corrupt(str(exc)) from None

    def _first_run(self, first: int, end: int) -> tuple[int, int, int, int]:
        """The merged run at cluster ``first`` (within ``[first, end)``), looking only as far
        as it reaches: a window that doubles while the run fills it. (``_runs`` over the whole
        range costs as much as the range, however short the first run: a route learning
        64 MiB ahead over a fragmented image asked for a thousand runs to use one.)"""
        window = 16
        while True:
            stop = min(end, first + window)
            run = next(self._runs(first, stop))
            if run[1] + run[2] < stop or stop == end:
                return run
            window *= 4

    def _runs(self, first: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Merged runs over clusters ``[first, end)``; each yielded run is complete."""
        cs = self._cs
        pending: tuple[int, int, int, int] | None = None
        c = first
        while c < end:
            l1_index = c >> self._l2_bits
            stop = min(end, (l1_index + 1) << self._l2_bits)
            table = self._l2_table(l1_index)
            if table is None:
                runs = [(UNALLOC, c, stop - c, 0)]
            else:
                i0 = c & self._l2_mask
                runs = self._slice_runs(table, i0, i0 + stop - c, c)
            for run in runs:
                if pending is not None:
                    k, f, n, a = pending
                    if run[0] == k and k != COMPRESSED and (
                        k not in (NORMAL, SHARED) or a + n * cs == run[3]
                    ):
                        pending = (k, f, n + run[2], a)
                        continue
                    yield pending
                pending = run
            c = stop
        if pending is not None:
            yield pending

    def _plan(self, offset: int, length: int) -> list[tuple[int, int, int, int, int]]:
        """Segments ``(kind, buffer position, length, host or entry, offset in cluster)``."""
        cb = self._cb
        end = offset + length
        plan: list[tuple[int, int, int, int, int]] = []
        for kind, first, count, aux in self._runs(offset >> cb, ((end - 1) >> cb) + 1):
            start = max(offset, first << cb)
            stop = min(end, (first + count) << cb)
            inside = start - (first << cb)
            if kind in (NORMAL, SHARED):
                plan.append((kind, start - offset, stop - start, aux + inside, 0))
            else:
                plan.append((kind, start - offset, stop - start, aux, inside))
        return plan

    # -- I/O tickets -------------------------------------------------------------------------
    def _ticket(self) -> int:
        """Register an I/O that will touch host clusters without the lock (lock held)."""
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets.add(ticket)
        return ticket

    def _done(self, ticket: int) -> None:
        with self._lock:
            self._tickets.discard(ticket)
            if self._waiting:
                self._io_done.notify_all()

    def _wait_older_io(self) -> None:
        """Wait (lock held, released meanwhile) until every I/O planned so far is done."""
        mark = self._next_ticket
        self._waiting += 1
        try:
            self._io_done.wait_for(lambda: not any(t < mark for t in self._tickets))
        finally:
            self._waiting -= 1

    # -- reading -----------------------------------------------------------------------------
    def preadv(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the image's bytes at ``offset``; ``OSError`` on failure.

        Host clusters are read under an I/O ticket (so they cannot be freed and reused
        meanwhile); backing data is read after the ticket is returned, so a slow backing read
        never holds up a free of this image.
        """
        with self._lock:
            plan = self._plan(offset, len(buf))
            host = any(seg[0] in (NORMAL, SHARED, COMPRESSED) for seg in plan)
            ticket = self._ticket() if host else -1
        try:
            for kind, pos, length, aux, inside in plan:
                view = buf[pos : pos + length]
                if kind in (NORMAL, SHARED):
                    self._io.read_into(aux, view)
                elif kind == ZERO:
                    _zero_fill(view)
                elif kind == COMPRESSED:
                    view[:] = self._decompress(aux)[inside : inside + length]
        finally:
            if ticket >= 0:
                self._done(ticket)
        for kind, pos, length, _, _ in plan:
            if kind == UNALLOC:
                self._read_backing(offset + pos, buf[pos : pos + length])

    def _read_backing(self, guest: int, view: memoryview) -> None:
        backing = self.node.backing()
        if backing is None:
            _zero_fill(view)
            return
        n = max(0, min(len(view), backing.size - guest))
        if n:
            backing.pread_into(guest, view[:n])
        if n < len(view):
            _zero_fill(view[n:])

    def _compressed_span(self, entry: int) -> tuple[int, int]:
        """``(host offset, bytes)`` a compressed cluster's data may occupy."""
        offset = entry & self._coff_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return offset, sectors * 512 - (offset & 511)

    def _decompress(self, entry: int) -> bytes:
        cached = self._zcache
        if cached is not None and cached[0] == entry:
            return cached[1]
        offset, length = self._compressed_span(entry)
        raw = bytearray(length)
        self._io.read_into(offset, memoryview(raw))
        cs = self._cs
        try:
            if self._zstd:
                zstd: Any = importlib.import_module("zstandard")
                out = bytes(zstd.ZstdDecompressor().decompressobj().decompress(bytes(raw)))[:cs]
            else:
                out = zlib.decompressobj(-12).decompress(raw, cs)
        except Exception as exc:
            raise self._corrupt(f"compressed cluster at {offset:#x} does not decompress") from exc
        if len(out) != cs:
            raise self._corrupt(
                f"compressed cluster at {offset:#x} decompresses to {len(out)} bytes, not {cs}"
            )
        self._zcache = (entry, out)
        return out

    # -- writing -----------------------------------------------------------------------------
    def pwritev(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``, allocating (and copying on write) where needed."""
        self._check_writable()
        with self._lock:
            plan = self._plan(offset, len(data))
            if any(seg[0] != NORMAL for seg in plan):
                self._write_allocating(offset, data)
                return
            self._check_meta(plan)
            ticket = self._ticket()
        try:
            for _, pos, length, host, _ in plan:
                self._file_write(host, data[pos : pos + length])
        finally:
            self._done(ticket)

    def begin_direct_write(self, offset: int, length: int) -> DirectWrite | None:
        """Allocate contiguous new clusters for a write over whole clusters this image does not
        hold yet (unallocated, or zero without a host cluster), and map them when the data is
        written (see :class:`~fleece.block.direct.DirectWrite`); the refcounts are written
        now, the L2 entries only then, so a crash in between leaks clusters at worst. None for
        any other range (partial clusters, clusters held here, ranges spanning L2 tables): the
        normal write path handles those."""
        self._check_writable()
        assert self._file is not None
        cb, cs = self._cb, self._cs
        end = offset + length
        if offset & (cs - 1) or (end & (cs - 1) and end != self._size):
            return None
        first, count = offset >> cb, ((end - 1) >> cb) + 1 - (offset >> cb)
        l1_index = first >> self._l2_bits
        if (first + count - 1) >> self._l2_bits != l1_index:
            return None
        i0 = first & self._l2_mask
        with self._lock:
            table, l2_offset = self._l2_for_write(l1_index)
            if kernels.any_but_zero_flag(table, i0, i0 + count):
                return None
            base = self._new_clusters(count)
            clusters = list(range(base, base + count))
            try:
                direct = self._file.begin_direct_write(base << cb, length)
            except BaseException:
                self._free(clusters, [], False, referenced=False)
                raise
            if direct is None:
                self._free(clusters, [], False, referenced=False)
                return None

        def map_clusters(written: bool) -> None:
            with self._lock:
                if not written:
                    self._free(clusters, [], False, referenced=False)
                    return
                current = self._l2_table(l1_index)  # the cached table may have been evicted
                assert current is not None
                entries = [((base + j) << cb) | OFLAG_COPIED for j in range(count)]
                self._write_entries(l2_offset, current, i0, entries)

        direct.finishers.append(map_clusters)
        return direct

    def _new_clusters(self, count: int) -> int:
        """``count`` contiguous new host clusters (lock held), cut from a reservation allocated
        in bulk: writes come in streams, and one refcount update (and one sync, made by the
        first pointer to them) per reservation is far cheaper than one per write. The file is
        grown to cover the reservation at once, so a pointer never reaches past its end, even
        when the data write that would have grown it is lost. What is left of it is freed on
        close; a crash leaks it, which ``qemu-img check -r leaks`` repairs."""
        self._reserve_room(count)
        nxt, end = self._reserve
        self._reserve = (nxt + count, end)
        if self._ahead is None and end - nxt - count <= self._reserve_size // _AHEAD_AT:
            self._reserve_ahead()
        return nxt

    def _reserve_room(self, count: int) -> None:
        """Make the reservation hold at least ``count`` clusters (lock held): a new one when
        the old is (nearly) used up, the rest of the old freed. Freeing waits for older I/O
        with the lock let go, so the new reservation is in place before, and the room is
        checked again after: another thread may have taken from it meanwhile. (Freeing
        first let a second thread, finding no reservation, make one that the first then
        replaced: its rest leaked; with a reservation made ahead, both took that one.)"""
        while True:
            nxt, end = self._reserve
            if end - nxt >= count:
                return
            old_fresh = self._fresh
            ahead = self._ahead
            if ahead is not None and ahead[1] - ahead[0] >= count:
                self._ahead = None
                self._reserve, self._fresh = (ahead[0], ahead[1]), ahead[2]
                self._order.adopt(ahead[3])  # no sync when the background one finished
                self._reserve_ahead()  # a stream: give the next sync all this one's time
            else:
                size = self._next_reserve_size(end - nxt)
                first, last, self._fresh = self._allocate_reserve(max(count, size))
                self._reserve = (first, last)
            self._release(nxt, end, old_fresh, False)  # may let the lock go

    def _next_reserve_size(self, left: int) -> int:
        """The clusters of the next reservation, when the current one has ``left``; a stream
        (the current one used up) doubles the size of the one after it."""
        limit = min(_RESERVE_MAX_BYTES >> self._cb, _RESERVE_MAX_CLUSTERS,
                    (self._size + self._cs - 1) >> self._cb)
        size = self._reserve_size or _RESERVE_BYTES >> self._cb
        if left <= size >> 4:
            self._reserve_size = min(2 * size, limit)
        return min(size, limit)

    def _allocate_reserve(self, count: int) -> tuple[int, int, int]:
        """Allocate ``count`` clusters and grow the file over them (lock held): their first,
        their end, and the first never written (read zeroes)."""
        cb = self._cb
        nxt = self._refs.alloc(count)
        end = nxt + count
        file_end = self._io.file_end()
        fresh = max(nxt, (file_end + self._cs - 1) >> cb)
        if end << cb > file_end:
            self._io.write((end << cb) - 512, _ZEROES[:512])  # grows the file (sparse)
            self._order.wrote_target()
        return nxt, end, fresh

    def _reserve_ahead(self, background: bool = True) -> None:
        """Allocate the next reservation now and make it durable (lock held): when the current
        one is used up, its first pointer needs no sync. A file that makes single writes
        durable (:meth:`BlockNode.native_fua`) gets the allocation's few metadata writes that
        way, here; another is synced in a thread of its own, which writes back every dirty
        data cluster of the image first. Without ``background`` the caller syncs."""
        nxt, end = self._reserve
        size = self._next_reserve_size(end - nxt)
        assert self._file is not None
        fua = background and self._file.native_fua()
        self._order.begin_deferring()
        self._io.fua = fua
        try:
            first, last, fresh = self._allocate_reserve(size)
        finally:
            self._io.fua = False
            mark = self._order.end_deferring()
        self._ahead = (first, last, fresh, -1 if fua else mark)  # durable writes: nothing owed
        if background and not fua:
            threading.Thread(target=self._sync_quietly, name="fleece-qcow2-reserve",
                             daemon=True).start()

    def _sync_quietly(self) -> None:
        """A background sync: a failure is the next pointer's to meet (it syncs again)."""
        try:
            self._order.sync()
        except (OSError, ValueError) as exc:
            log.debug("qcow2 %r: background sync failed: %s", self.node.name, exc)

    def prepare_writes(self) -> None:
        """Reserve clusters for the writes to come and make the reservation durable now:
        the first writes (a backup's first copies into its target) then map clusters without
        a sync in the guest's path. A read-only image does nothing."""
        if self.node.read_only or self._file is None:
            return
        with self._lock:
            # Copies come in a stream: start where a stream's reservations would have grown
            # to, so the first minutes of a backup map clusters without a sync of their own.
            self._reserve_size = max(self._reserve_size, _PREPARED_RESERVE_BYTES >> self._cb)
            self._reserve_room(1)
            if self._ahead is None:
                self._reserve_ahead(background=False)
        self._order.sync()

    def _punches(self) -> bool:
        """Whether a freed cluster can be punched out of the file (probed past its end, where
        a punch changes nothing). A read-only image frees nothing."""
        if self.node.read_only:
            return True
        assert self._file is not None
        end = -(-self._io.file_end() // self._cs) * self._cs
        try:
            return self._file.driver.punch_hole(end, self._cs)
        except OSError:
            return False

    def _release_reserves(self, shrink: bool = False) -> None:
        """Free the reservation made ahead, then the current one (lock held)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._release(ahead[0], ahead[1], ahead[2], shrink)
        self._release_reserve(shrink)

    def _release_reserve(self, shrink: bool = False) -> None:
        """Free the unused rest of the reservation (lock held); with ``shrink``, cut the file
        back when the rest is all that lies beyond the last cluster in use."""
        nxt, end = self._reserve
        self._reserve = (0, 0)
        self._release(nxt, end, self._fresh, shrink)

    def _release(self, nxt: int, end: int, fresh: int, shrink: bool) -> None:
        if nxt >= end:
            return
        self._free(list(range(nxt, end)), [], False, referenced=False)
        truncate = getattr(self._file.driver, "truncate", None) if self._file else None
        if shrink and truncate is not None and self._io.file_end() == end << self._cb:
            self._order.sync()  # the refcounts first: the clusters must not reappear in use
            truncate(max(nxt, fresh) << self._cb)
            self._io.file_end()

    def _check_writable(self) -> None:
        if self.node.read_only or self._file is None:
            raise OSError(errno.EROFS, f"qcow2 node '{self.node.name}' is read-only")

    def _file_write(self, host: int, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None
        self._file.pwrite(host, data)

    def _check_meta(self, plan: list[tuple[int, int, int, int, int]]) -> None:
        """Refuse (``EIO``) an in-place write into metadata or far beyond the end of the file.

        Both only happen with a corrupt or hostile L2 table; QEMU's overlap checks refuse the
        first, and the second would grow a huge sparse file.
        """
        cb = self._cb
        meta = self._meta
        for _, _, length, host, _ in plan:
            if host + length > self._io.end + _MAX_BEYOND_EOF:
                self._io.file_end()
                if host + length > self._io.end + _MAX_BEYOND_EOF:
                    raise self._corrupt(f"data cluster {host:#x} lies far beyond the file end")
            for c in range(host >> cb, ((host + length - 1) >> cb) + 1):
                if c in meta:
                    raise self._corrupt(f"data cluster {c << cb:#x} overlaps metadata")

    def _l2_for_write(self, l1_index: int) -> tuple[Table[int], int]:
        """The L2 table for ``l1_index`` and its offset, allocating a zeroed one if needed."""
        offset = int(self._l1[l1_index]) & L1E_OFFSET_MASK
        if offset:
            table = self._l2_table(l1_index)
            assert table is not None
            return table, offset
        cluster = self._new_clusters(1)
        self._meta.add(cluster)
        offset = cluster << self._cb
        if cluster < self._fresh:  # a reused cluster: its zeroes must be on disk first
            self._io.write(offset, _ZEROES[: self._cs])
            self._order.wrote_target()
        # A fresh one (never written, beyond the old end of the file) already reads as
        # zeroes, an empty table, even if a power loss takes every write after this one.
        entry = offset | OFLAG_COPIED
        self._order.before_pointer()
        self._io.write(self.header.l1_table_offset + 8 * l1_index, struct.pack(">Q", entry))
        self._order.wrote_pointer()
        self._l1[l1_index] = entry
        table = zero_table(self._cs // 8)
        self._l2_cache[offset] = table
        if len(self._l2_cache) > self._l2_cache_tables:
            self._l2_cache.popitem(last=False)
        return table, offset

    def _write_entries(self, l2_offset: int, table: Table[int], first: int, values: list[int]
                       ) -> None:
        """Set ``table[first:first + len(values)]`` in memory and on disk."""
        table[first : first + len(values)] = array("Q", values)
        self._order.before_pointer()
        self._io.write(l2_offset + 8 * first, struct.pack(f">{len(values)}Q", *values))
        self._order.wrote_pointer()

    def _old_cluster(self, entry: int, cluster: int, buf: bytearray) -> None:
        """Fill ``buf`` (zeroed, one cluster) with what guest cluster ``cluster`` reads as."""
        start = cluster << self._cb
        valid = min(self._cs, self._size - start)
        if valid <= 0:
            return
        view = memoryview(buf)[:valid]
        kind, aux = self._classify(entry)
        if kind == UNALLOC:
            self._read_backing(start, view)
        elif kind in (NORMAL, SHARED):
            self._io.read_into(aux, view)
        elif kind == COMPRESSED:
            view[:] = self._decompress(aux)[:valid]

    def _write_allocating(self, offset: int, data: memoryview) -> None:
        """Write under the lock: allocate, copy on write, then map (lock held)."""
        cb, cs = self._cb, self._cs
        end = offset + len(data)
        c = offset >> cb
        last = (end - 1) >> cb
        frees: list[int] = []
        compressed: list[int] = []
        while c <= last:
            l1_index = c >> self._l2_bits
            stop = min(last + 1, (l1_index + 1) << self._l2_bits)
            table, l2_offset = self._l2_for_write(l1_index)
            i0 = c & self._l2_mask
            entries: list[int] = table[i0 : i0 + stop - c].tolist()
            reuse = [
                not e & OFLAG_COMPRESSED and bool(e & OFLAG_COPIED) and bool(e & L2E_OFFSET_MASK)
                for e in entries
            ]
            need = reuse.count(False)
            base = self._new_clusters(need) << cb if need else 0
            fresh = self._fresh << cb  # new clusters from here on read zeroes until written
            k = 0
            ordered = False  # some copied-on-write data must be durable before the L2 entry
            writes: list[tuple[int, int, int, bytes | bytearray | None]] = []
            new_entries = list(entries)
            for j, entry in enumerate(entries):
                cstart = (c + j) << cb
                lo, hi = max(offset, cstart), min(end, cstart + cs)
                if reuse[j]:
                    host = entry & L2E_OFFSET_MASK
                    if host & (cs - 1):
                        raise self._corrupt(f"unaligned data cluster offset {host:#x}")
                    self._check_meta([(NORMAL, 0, cs, host, 0)])
                    if not entry & OFLAG_ZERO and (lo, hi) != (cstart, cstart + cs):
                        writes.append((host + lo - cstart, lo - offset, hi - offset, None))
                        continue
                else:
                    host = base + (k << cb)
                    k += 1
                    if entry & OFLAG_COMPRESSED:
                        compressed.append(entry)
                    elif entry & L2E_OFFSET_MASK:
                        frees.append((entry & L2E_OFFSET_MASK) >> cb)
                if (lo, hi) == (cstart, cstart + cs):
                    writes.append((host, lo - offset, hi - offset, None))
                else:
                    buf = bytearray(cs)
                    self._old_cluster(entry, c + j, buf)
                    # Lost after a power loss, old data of a fresh cluster that was all zeroes
                    # reads back unchanged: only other copies must precede the L2 entry.
                    if reuse[j] or host < fresh or buf != self._zero_cluster:
                        ordered = True
                    buf[lo - cstart : hi - cstart] = data[lo - offset : hi - offset]
                    writes.append((host, 0, cs, buf))
                new_entries[j] = host | OFLAG_COPIED
            self._flush_writes(writes, data)
            if ordered:
                self._order.wrote_target()
            changed = [j for j in range(len(entries)) if new_entries[j] != entries[j]]
            if changed:
                a, b = changed[0], changed[-1] + 1
                self._write_entries(l2_offset, table, i0 + a, new_entries[a:b])
            c = stop
        self._free(frees, compressed, self._pass_discard_other)

    def _flush_writes(
        self, writes: list[tuple[int, int, int, bytes | bytearray | None]], data: memoryview
    ) -> None:
        """Issue planned writes, merging runs of ``data`` that are contiguous on the host."""
        i = 0
        while i < len(writes):
            host, a, b, buf = writes[i]
            if buf is not None:
                self._io.write(host, buf)
                i += 1
                continue
            j = i + 1
            while j < len(writes):
                h2, a2, b2, buf2 = writes[j]
                if buf2 is not None or h2 != host + (b - a) or a2 != b:
                    break
                b = b2
                j += 1
            self._io.write(host, data[a:b])
            i = j

    # -- freeing -----------------------------------------------------------------------------
    def _free(
        self, clusters: list[int], compressed: list[int], discard: bool, *,
        referenced: bool = True,
    ) -> None:
        """Drop one reference from each host cluster (references already removed, or never
        made when ``referenced`` is False; lock held)."""
        if not clusters and not compressed:
            return
        self._wait_older_io()
        self._zcache = None
        runs: list[tuple[int, int]] = []
        for c in sorted(clusters):
            if runs and runs[-1][0] + runs[-1][1] == c:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((c, 1))
        cb = self._cb
        for entry in compressed:
            offset, length = self._compressed_span(entry)
            offset &= ~511
            first = offset >> cb
            last = (offset + length + (entry & self._coff_mask & 511) - 1) >> cb
            runs.append((first, last - first + 1))
        assert self._file is not None
        for first, count in runs:
            for c, n in self._refs.change(first, count, -1, referenced=referenced):
                if referenced and self._zero_copy:
                    # Its pages may sit in a socket, sent without a copy (HostMap.zero_copy):
                    # punched, they leave the file before the cluster can hold other data.
                    if not self._file.driver.punch_hole(c << cb, n << cb):
                        self._zero_copy = False  # unexpected: copy from now on
                        if discard:
                            self._file.pdiscard(c << cb, n << cb)
                elif discard:
                    self._file.pdiscard(c << cb, n << cb)

    # -- zeroes and discards -----------------------------------------------------------------
    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The clusters ``[first, end)`` the range covers entirely (the last may be short)."""
        cb, cs = self._cb, self._cs
        end = offset + length
        first = (offset + cs - 1) >> cb
        last_end = ((self._size + cs - 1) >> cb) if end >= self._size else end >> cb
        return first, max(first, last_end)

    def _reads_zero(self, offset: int, length: int) -> bool:
        """True if the range already reads as zeroes from this layer's metadata alone."""
        for seg in self._plan(offset, length):
            kind, pos = seg[0], seg[1]
            if kind == ZERO:
                continue
            if kind == UNALLOC and (
                (backing := self.node.backing()) is None or offset + pos >= backing.size
            ):
                continue
            return False
        return True

    def _partial_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            if self._reads_zero(offset, length):
                return
        self.pwritev(offset, memoryview(_ZEROES)[:length])

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeroes, hiding backing data.

        v3 marks whole clusters with the zero flag (``may_unmap`` frees their host clusters,
        else an allocated cluster keeps its host cluster); partial clusters get written
        zeroes. v2 writes zeroes when there is a backing file, else deallocates.
        """
        self._check_writable()
        first, end_cluster = self._whole_clusters(offset, length)
        cb = self._cb
        end = offset + length
        if first >= end_cluster:
            self._partial_zeroes(offset, length)
            return
        if offset < first << cb:
            self._partial_zeroes(offset, (first << cb) - offset)
        whole_end = min(end, end_cluster << cb)
        if whole_end < end:
            self._partial_zeroes(whole_end, end - whole_end)
        if self._v3:
            mode = "unmap" if may_unmap else "keep"
        elif self.node.backing() is None:
            mode = "dealloc"
        else:
            pos = first << cb
            while pos < whole_end:
                chunk = min(whole_end - pos, 1 << 20)
                self.pwritev(pos, memoryview(_ZEROES)[:chunk])
                pos += chunk
            return
        with self._lock:
            self._zero_clusters(first, end_cluster, mode, self._pass_discard_request)

    def pdiscard(self, offset: int, length: int) -> None:
        """Drop whole clusters of the range; never exposes backing data.

        v3 with a backing file marks them zero; without one they become unallocated (reading
        zeroes). v2 with a backing file ignores the hint; without one, deallocates.
        """
        self._check_writable()
        first, end_cluster = self._whole_clusters(offset, length)
        if first >= end_cluster:
            return
        if self.node.backing() is not None:
            if not self._v3:
                return
            mode = "unmap"
        else:
            mode = "dealloc"
        with self._lock:
            self._zero_clusters(first, end_cluster, mode, self._pass_discard_request)

    @staticmethod
    def _zeroed_entry(entry: int, mode: str, no_backing: bool) -> int:
        """What an L2 entry becomes when its cluster is zeroed in ``mode`` (see
        :meth:`_zero_clusters`)."""
        if mode == "dealloc" or (no_backing and entry == 0):
            return 0
        host = entry & L2E_OFFSET_MASK
        if mode == "keep" and host and entry & OFLAG_COPIED and not entry & OFLAG_COMPRESSED:
            return host | OFLAG_COPIED | OFLAG_ZERO  # ours alone: the host cluster stays
        return OFLAG_ZERO

    def _zero_clusters(self, first: int, end: int, mode: str, discard: bool) -> None:
        """Rewrite the entries of clusters ``[first, end)`` (lock held).

        ``mode``: ``"unmap"`` (zero flag, host freed), ``"keep"`` (zero flag, host kept when
        it is ours alone) or ``"dealloc"`` (unallocated). Unallocated clusters of an image
        without a backing file already read as zeroes and are left alone.
        """
        frees: list[int] = []
        compressed: list[int] = []
        # Unallocated reads as zeroes only when the image has no backing at all: one whose
        # header names a backing file that is not attached now (drive-backup mode=existing)
        # would read through to it once opened with it, so it gets zero clusters.
        no_backing = self.node.backing() is None and not self.backing_filename()
        c = first
        while c < end:
            l1_index = c >> self._l2_bits
            stop = min(end, (l1_index + 1) << self._l2_bits)
            if int(self._l1[l1_index]) & L1E_OFFSET_MASK == 0 and (
                mode == "dealloc" or no_backing
            ):
                c = stop
                continue
            table, l2_offset = self._l2_for_write(l1_index)
            i0 = c & self._l2_mask
            old: list[int] = table[i0 : i0 + stop - c].tolist()
            new = [self._zeroed_entry(entry, mode, no_backing) for entry in old]
            changed = [j for j, (o, n) in enumerate(zip(old, new, strict=True)) if o != n]
            if changed:
                a, b = changed[0], changed[-1] + 1
                self._write_entries(l2_offset, table, i0 + a, new[a:b])
                for entry, now in zip(old[a:b], new[a:b], strict=True):
                    if entry & OFLAG_COMPRESSED:
                        compressed.append(entry)
                    elif entry & L2E_OFFSET_MASK and not now & L2E_OFFSET_MASK:
                        frees.append((entry & L2E_OFFSET_MASK) >> self._cb)
            c = stop
        self._free(frees, compressed, discard)

    # -- flush and status --------------------------------------------------------------------
    def flush(self) -> None:
        """Nothing of its own to write: metadata is written through, in an order that holds on
        stable storage (:mod:`fleece.block.qcow2.order`), so the node's flush of the file
        child, which follows, makes every write that returned before durable. (Syncing here
        too would sync the file twice per flush; the write order not knowing of that sync
        costs at most one sync, when a pointer next depends on a target written before.)"""

    def host_map(self, offset: int, length: int) -> HostMap | None:
        """Data clusters this image owns alone (refcount 1, not compressed) are settled: they
        are written in place and leave only by a discard or a zero write of the node."""
        cb = self._cb
        end = offset + length
        with self._lock:
            kind, first, count, host = self._first_run(offset >> cb, ((end - 1) >> cb) + 1)
        file = self._file
        if kind != NORMAL or file is None:
            return None
        stop = min(end, (first + count) << cb)
        return HostMap(stop - offset, file, host + offset - (first << cb), writable=True,
                       data=True, zero_copy=self._zero_copy)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """This layer's status of the first uniform extent at ``offset``.

        Data: ``ALLOCATED|DATA`` with ``host_offset`` for a host-contiguous run; compressed
        runs have no ``host_offset``; zero clusters ``ALLOCATED|ZERO``; unallocated ``0``
        (the backing decides) or ``ZERO`` without a backing node.
        """
        cb = self._cb
        end = offset + length
        with self._lock:
            runs = self._runs(offset >> cb, ((end - 1) >> cb) + 1)
            kind, first, count, aux = next(runs)
            run_end = (first + count) << cb
            if kind == COMPRESSED:
                for k, f, n, _ in runs:
                    if k != COMPRESSED:
                        break
                    run_end = (f + n) << cb
        stop = min(end, run_end)
        if kind in (NORMAL, SHARED):
            host = aux + offset - (first << cb)
            return BlockStatus(offset, stop - offset, Status.ALLOCATED | Status.DATA, 1, host)
        if kind == COMPRESSED:
            return BlockStatus(offset, stop - offset, Status.ALLOCATED | Status.DATA)
        if kind == ZERO:
            return BlockStatus(offset, stop - offset, Status.ALLOCATED | Status.ZERO)
        flags = Status(0) if self.node.backing() is not None else Status.ZERO
        return BlockStatus(offset, stop - offset, flags)
