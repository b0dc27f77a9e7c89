"""qcow2 reference counts: reading any entry width, allocating clusters, growing the table.

Crash safety (a ``kill -9`` or a power loss may leak clusters, never corrupt), as promised by
every method, with :class:`~fleece.block.qcow2.order.WriteOrder` turning "before" into "on
stable storage before" (its barriers sync only when needed):

- an allocation writes the new refcounts before returning and marks them as targets, so the
  caller's pointer to the cluster waits for them;
- a new refcount block is written, already counting itself, before the table points at it;
- a new, larger refcount table is written (with its blocks) before the header points at it,
  and the old table's clusters are released only after that;
- a refcount drops only once the pointers written before it are durable (the caller removed
  the references first), unless the caller says the clusters were never referenced.

Not thread-safe by itself: the driver calls it under its metadata lock.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections import OrderedDict
from typing import Protocol

from fleece.block.qcow2 import kernels
from fleece.block.qcow2.format import (
    MAX_REFTABLE_BYTES,
    OFF_REFTABLE,
    REFT_OFFSET_MASK,
    be64_bytes,
    zero_table,
)
from fleece.block.qcow2.order import WriteOrder


class MetaIO(Protocol):
    """Positional access to the image file for metadata."""

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; zeroes past the end of the file."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def file_end(self) -> int:
        """The current size of the image file in bytes."""
        ...


class Refblock:
    """One refcount block: ``entries`` counters of ``1 << order`` bits in a cluster buffer."""

    __slots__ = ("buf", "entries", "order")

    def __init__(self, buf: bytearray, order: int) -> None:
        self.buf = buf
        self.order = order
        self.entries = len(buf) * 8 >> order

    def get(self, i: int) -> int:
        if self.order >= 3:
            width = 1 << (self.order - 3)
            return int.from_bytes(self.buf[i * width : (i + 1) * width], "big")
        bits = 1 << self.order
        per = 8 >> self.order
        return self.buf[i // per] >> (bits * (i % per)) & ((1 << bits) - 1)

    def byte_span(self, first: int, end: int) -> tuple[int, int]:
        """The bytes of the buffer holding counters ``first`` to ``end - 1``."""
        bits = 1 << self.order
        return first * bits // 8, -(-end * bits // 8)

    def add(self, first: int, end: int, delta: int) -> None:
        """Add ``delta`` to counters ``first..end-1``, or to none: ``OSError`` if any would
        leave its range."""
        kernels.refblock_add(self.buf, self.order, first, end, delta)


class Refcounts:
    """The refcount table and blocks of one open image."""

    def __init__(
        self,
        io: MetaIO,
        *,
        cluster_bits: int,
        order: int,
        table_offset: int,
        table_clusters: int,
        table: array[int],
        meta: set[int],
        write_order: WriteOrder | None = None,
        cache_blocks: int = 1024,
    ) -> None:
        self.io = io
        #: the image's write order (None: no syncs, for a read-only image or a checker)
        self.writes = write_order if write_order is not None else WriteOrder(lambda: None)
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = order
        self.entries = (self.cluster_size * 8) >> order  # counters per block
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = array("Q", table)
        self.meta = meta  # cluster indices holding metadata; shared with the driver
        self._cache: OrderedDict[int, Refblock] = OrderedDict()
        self._cache_blocks = max(cache_blocks, 4)
        self.hint = 0  # no free cluster lies below this index

    # -- reading -----------------------------------------------------------------------------
    def block(self, index: int) -> Refblock | None:
        """Refcount block ``index``, or None when the table has no block there."""
        if index >= len(self.table):
            return None
        offset = int(self.table[index]) & REFT_OFFSET_MASK
        if offset == 0:
            return None
        blk = self._cache.get(index)
        if blk is not None:
            self._cache.move_to_end(index)
            return blk
        blk = Refblock(bytearray(self.io.read(offset, self.cluster_size)), self.order)
        self._cache[index] = blk
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return blk

    def get(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (0 where no block covers it)."""
        blk = self.block(cluster // self.entries)
        return 0 if blk is None else blk.get(cluster % self.entries)

    # -- changing ----------------------------------------------------------------------------
    def change(
        self, cluster: int, count: int, delta: int, *, referenced: bool = True
    ) -> list[tuple[int, int]]:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster``, on disk.

        Blocks must exist (an allocation ensures that). An increase is marked as a target (see
        :class:`WriteOrder`); a decrease first waits for the pointers written so far, unless
        ``referenced`` is False (nothing ever pointed at the clusters). Returns the runs
        ``(first, count)`` whose refcount dropped to zero. Raises ``OSError`` (``EIO`` for a
        missing block or an underflow, ``ERANGE`` for an overflow).
        """
        if delta < 0 and referenced:
            self.writes.before_decrease()
        freed: list[tuple[int, int]] = []
        end = cluster + count
        while cluster < end:
            index = cluster // self.entries
            first = cluster - index * self.entries
            stop = min(self.entries, first + end - cluster)
            blk = self.block(index)
            if blk is None:
                raise OSError(
                    errno.EIO,
                    f"qcow2: cluster {cluster} has no refcount block: the image is corrupt",
                )
            blk.add(first, stop, delta)
            lo, hi = blk.byte_span(first, stop)
            self.io.write((int(self.table[index]) & REFT_OFFSET_MASK) + lo, blk.buf[lo:hi])
            if delta < 0:
                zeroes = kernels.refblock_zero_runs(blk.buf, blk.order, first, stop)
                if zeroes:
                    base = index * self.entries
                    freed.extend((base + run_start, run_len) for run_start, run_len in zeroes)
                    self.hint = min(self.hint, base + zeroes[0][0])
            cluster = index * self.entries + stop
        if delta > 0:
            self.writes.wrote_target()
        return freed

    def alloc(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1, written); return the first index.

        Creates refcount blocks (placed right after the run) and grows the table as needed.
        Raises ``OSError``.
        """
        for _ in range(256):
            cluster = self._find_free(count)
            missing = self._missing_blocks(cluster, count)
            if not missing:
                self.change(cluster, count, +1)
                if cluster <= self.hint:
                    self.hint = cluster + count
                return cluster
            if missing[-1] >= len(self.table):
                self._grow_table(missing[-1] + 1)
                continue
            # Room for the run and, after it, the blocks that will count it (and themselves).
            extra = len(missing)
            for _ in range(64):
                cluster = self._find_free(count + extra)
                missing = self._missing_blocks(cluster, count + extra)
                if len(missing) <= extra:
                    break
                extra = len(missing)
            if missing and missing[-1] >= len(self.table):
                self._grow_table(missing[-1] + 1)
                continue
            self._place_blocks(missing, cluster + count)
        raise OSError(errno.EIO, "qcow2: cluster allocation made no progress")

    def _missing_blocks(self, cluster: int, count: int) -> list[int]:
        """Indices of the refcount blocks ``[cluster, cluster + count)`` needs and lacks."""
        return [
            index
            for index in range(cluster // self.entries, (cluster + count - 1) // self.entries + 1)
            if index >= len(self.table) or int(self.table[index]) & REFT_OFFSET_MASK == 0
        ]

    def _place_blocks(self, indices: list[int], at: int) -> None:
        """Create blocks ``indices`` in the free clusters from ``at``, each counting all of them.

        Existing blocks count their share first; then the new blocks are written, then the
        table points at them, a block only once the block that counts it is in the table
        (:meth:`_link_order`): a crash between two of those writes leaks, never corrupts.
        """
        end = at + len(indices)
        for index in range(at // self.entries, (end - 1) // self.entries + 1):
            if index not in indices:
                lo, hi = max(at, index * self.entries), min(end, (index + 1) * self.entries)
                self.change(lo, hi - lo, +1)
        blocks: dict[int, tuple[int, Refblock]] = {}
        for k, index in enumerate(indices):
            blk = Refblock(bytearray(self.cluster_size), self.order)
            lo, hi = max(at, index * self.entries), min(end, (index + 1) * self.entries)
            if lo < hi:
                blk.add(lo - index * self.entries, hi - index * self.entries, 1)
            blocks[index] = (at + k, blk)
            self.io.write((at + k) << self.cluster_bits, blk.buf)
        self.writes.wrote_target()
        for level in self._link_order({index: c for index, (c, _) in blocks.items()}):
            # A power loss keeps any subset of unsynced writes: the blocks linked at one
            # level are targets of the next level's entries.
            self.writes.before_pointer()
            for index in level:
                cluster, blk = blocks[index]
                offset = cluster << self.cluster_bits
                self.table[index] = offset
                self.io.write(self.table_offset + 8 * index, struct.pack(">Q", offset))
                self.meta.add(cluster)
                self._cache[index] = blk
            self.writes.wrote_pointer()
            self.writes.wrote_target()

    def _link_order(self, placed: dict[int, int]) -> list[list[int]]:
        """The new blocks ``placed`` (index -> its cluster) in levels to link one after the
        other: a block comes once the block counting its cluster is linked (an existing one, one
        of an earlier level, or itself). The blocks lie in a run in the order of their indices,
        so the index of the block counting each one never decreases along the run: following
        "counted by" from any block ends in a block that counts itself, never in a cycle, and
        every level links at least one."""
        levels: list[list[int]] = []
        pending = dict(placed)
        while pending:
            level = [
                index for index, cluster in pending.items()
                if (cover := cluster // self.entries) == index or cover not in pending
            ]
            if not level:
                raise OSError(errno.EIO, "qcow2: new refcount blocks count each other")
            for index in level:
                del pending[index]
            levels.append(level)
        return levels

    def _find_free(self, count: int) -> int:
        """The first run of ``count`` clusters with refcount 0 and no metadata, from the hint."""
        start = self.hint
        fast = self._free_at(start, count)
        if fast is not None:
            return fast
        entries = self.entries
        run_start, run_len = start, 0
        index = start // entries
        first_free: int | None = None
        while True:
            base = index * entries
            lo = max(start - base, 0)
            blk = self.block(index)

            def next_counter(pos: int, zero: bool, blk: Refblock | None = blk) -> int:
                """The first counter from ``pos`` that is zero (or not); ``entries`` if none."""
                if blk is None:  # no block: every cluster it would count is free
                    return pos if zero else entries
                return kernels.refblock_next(blk.buf, blk.order, pos, entries, zero)

            if first_free is None:
                found_free = next_counter(lo, True)
                if found_free < entries:
                    first_free = self.hint = base + found_free
            pos = lo
            while pos < entries:
                if run_len == 0:
                    pos = next_counter(pos, True)
                    if pos >= entries:
                        break
                    run_start = base + pos
                stop = next_counter(pos, False)
                if run_len + stop - pos >= count:
                    found = self._skip_meta(run_start, count)
                    if found is None:
                        return run_start
                    # A metadata cluster its refcount does not count (a hostile image):
                    # restart after it.
                    run_len = 0
                    pos = max(found + 1 - base, lo)
                    continue
                run_len += stop - pos
                pos = stop
                if pos < entries:
                    run_len = 0
            index += 1

    def _free_at(self, start: int, count: int) -> int | None:
        """``start`` if the ``count`` clusters there are free: the common case of an image
        that grows at its end, answered without scanning the whole refcount block."""
        index, lo = divmod(start, self.entries)
        if lo + count > self.entries:
            return None
        blk = self.block(index)
        if blk is not None and kernels.refblock_next(
            blk.buf, blk.order, lo, lo + count, False
        ) < lo + count:
            return None
        return start if self._skip_meta(start, count) is None else None

    def _skip_meta(self, start: int, count: int) -> int | None:
        meta = self.meta
        if count > len(meta):
            hits = [m for m in meta if start <= m < start + count]
            return max(hits) if hits else None
        for c in range(start + count - 1, start - 1, -1):
            if c in meta:
                return c
        return None

    def _highest_used(self) -> int:
        """One past the highest cluster with a nonzero refcount, or metadata."""
        top = max(self.meta, default=-1) + 1
        for index in range(len(self.table) - 1, -1, -1):
            if self.table[index] & REFT_OFFSET_MASK == 0:
                continue
            blk = self.block(index)
            assert blk is not None
            last = kernels.refblock_last_used(blk.buf, blk.order)
            if last >= 0:
                return max(top, index * self.entries + last + 1)
        return top

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger one at the end of the image.

        The new table and the new blocks that count it are written first, then the header
        points at the new table, then the old table's clusters are released.
        """
        cs = self.cluster_size
        per_cluster = cs // 8
        old_len = len(self.table)
        start = max(self._highest_used(), -(-self.io.file_end() // cs))
        new_blocks: list[int] = []
        clusters = 0
        for _ in range(64):
            # Fixed point: the table must index every block, and the new blocks must count
            # the table and themselves.
            region_end = start + clusters + len(new_blocks)
            last_index = (region_end - 1) // self.entries if region_end > start else 0
            want = max(min_entries, last_index + 1, 2 * old_len)
            want_clusters = -(-want // per_cluster)
            region_end = start + want_clusters + len(new_blocks)
            blocks = [
                i
                for i in range(start // self.entries, (region_end - 1) // self.entries + 1)
                if i >= old_len or int(self.table[i]) & REFT_OFFSET_MASK == 0
            ]
            if want_clusters == clusters and blocks == new_blocks:
                break
            clusters, new_blocks = want_clusters, blocks
        else:
            raise OSError(errno.EIO, "qcow2: refcount table growth did not converge")
        if clusters * cs > MAX_REFTABLE_BYTES:
            raise OSError(errno.EFBIG, "qcow2: the refcount table would exceed its size limit")
        table_at = start
        region_end = start + clusters + len(new_blocks)
        # 1. count the region in existing blocks
        for index in range(start // self.entries, (region_end - 1) // self.entries + 1):
            if index in new_blocks:
                continue
            lo = max(start, index * self.entries)
            hi = min(region_end, (index + 1) * self.entries)
            self.change(lo, hi - lo, +1)
        # 2. write the new blocks, counting the region (themselves included)
        table = zero_table(clusters * per_cluster)
        table[:old_len] = self.table
        for k, index in enumerate(new_blocks):
            blk = Refblock(bytearray(cs), self.order)
            lo = max(start, index * self.entries)
            hi = min(region_end, (index + 1) * self.entries)
            blk.add(lo - index * self.entries, hi - index * self.entries, 1)
            offset = (start + clusters + k) << self.cluster_bits
            self.io.write(offset, blk.buf)
            table[index] = offset
            self._cache[index] = blk
        # 3. the new table, then 4. the header
        new_offset = table_at << self.cluster_bits
        self.io.write(new_offset, be64_bytes(table))
        self.writes.wrote_target()
        self.writes.before_pointer()
        self.io.write(OFF_REFTABLE, struct.pack(">QI", new_offset, clusters))
        self.writes.wrote_pointer()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = table
        self.table_offset, self.table_clusters = new_offset, clusters
        old_first = old_offset >> self.cluster_bits
        for c in range(old_first, old_first + old_clusters):
            self.meta.discard(c)
        self.meta.update(range(table_at, table_at + clusters))
        self.meta.update(start + clusters + k for k in range(len(new_blocks)))
        # 5. release the old table
        self.change(old_first, old_clusters, -1)
