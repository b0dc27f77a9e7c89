"""Persistent dirty bitmaps in qcow2: the bitmaps header extension (QEMU's docs/interop/qcow2.txt).

Layout: the extension (``EXT_BITMAPS``) names a *bitmap directory* of variable-size entries;
each entry points at a *bitmap table* whose 64-bit entries point at clusters of bitmap data
(0: all zeroes; 1: all ones). Autoclear bit 0 vouches for the extension: a program that does
not know bitmaps clears it when it writes the image, and the bitmaps are then ignored.

What fleece does, as QEMU does:

* **Open**: load every bitmap; one flagged *in use* was never stored after its last writable
  open (a crash): it is loaded *inconsistent* (unusable, only removable). A writable open then
  sets *in use* on the others, in place, so a crash from here on is detected.
* **Close** (or going read-only): write each persistent bitmap's data and table to new clusters,
  then a new directory, then the header pointing at it, then free the old clusters. A crash
  leaks clusters, never corrupts.

Not thread-safe by itself: the driver calls it under its metadata lock.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fleece.bitmap import ClusterBitmap
from fleece.block.qcow2.format import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    EXT_END,
    Header,
    extensions_except,
    header_extensions,
    header_used,
    pack_extension,
    pack_header,
)
from fleece.block.qcow2.order import rewrite_header
from fleece.block.qcow2.refcount import MetaIO, Refcounts
from fleece.errors import ImageError

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 64 * 1024 * 1024
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


@dataclass
class BitmapEntry:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def pack(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(
            self.table_offset, self.table_size, self.flags, self.type, self.granularity_bits,
            len(name), len(self.extra_data),
        ) + self.extra_data + name
        return raw + bytes(-len(raw) % 8)

    def flag_names(self) -> list[str]:
        names = []
        if self.flags & FLAG_IN_USE:
            names.append("in-use")
        if self.flags & FLAG_AUTO:
            names.append("auto")
        return names


@dataclass
class LoadedBitmap:
    """A bitmap read from the image: its entry, its bits, and whether to trust them."""

    entry: BitmapEntry
    bits: ClusterBitmap
    inconsistent: bool
    enabled: bool


def find_extension(h: Header, first: bytes, kind: int) -> bytes | None:
    """The data of header extension ``kind`` in the header cluster ``first``, or None (also
    when a malformed extension comes first)."""
    with suppress(ImageError):
        for ext, data in header_extensions(h, first):
            if ext == kind:
                return data
    return None


def header_with_bitmaps(h: Header, first: bytes, ext: bytes | None) -> bytes:
    """The header cluster's new prefix: the same extensions and backing name, with the bitmaps
    extension replaced by ``ext`` (removed when None). Raises ``ValueError`` when it does not
    fit in the first cluster."""
    kept = extensions_except(h, first, EXT_BITMAPS)
    if ext is not None:
        kept.append(pack_extension(EXT_BITMAPS, ext))
    name = b""
    if h.backing_file_offset and h.backing_file_size:
        name = first[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
    extensions = b"".join(kept) + pack_extension(EXT_END, b"")
    old = (h.backing_file_offset, h.backing_file_size)
    h.backing_file_offset = h.header_length + len(extensions) if name else 0
    h.backing_file_size = len(name)
    area = pack_header(h) + extensions + name
    if len(area) > h.cluster_size:
        h.backing_file_offset, h.backing_file_size = old
        raise ValueError("the bitmaps extension does not fit in the image's header cluster")
    return area


def bitmap_bits(disk_size: int, granularity_bits: int) -> int:
    return -(-disk_size // (1 << granularity_bits))


def table_size_for(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Bitmap table entries needed: one per cluster of bitmap data."""
    data_bytes = -(-bitmap_bits(disk_size, granularity_bits) // 8)
    return -(-data_bytes // cluster_size)


def check_new_bitmap(
    h: Header, name: str, granularity: int, existing: int, directory_size: int
) -> None:
    """QEMU's checks before a bitmap may be made persistent in this image: ``ValueError``
    with QEMU's wording."""
    if h.version < 3:
        raise ValueError("Cannot store dirty bitmaps in qcow2 v2 files")
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        raise ValueError(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if bits < MIN_GRANULARITY_BITS:
        raise ValueError(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    if (
        h.size > MAX_PHYS_SIZE << bits
        or h.size > (MAX_TABLE_SIZE * h.cluster_size) << bits
    ):
        raise ValueError("Too much space will be occupied by the bitmap. Use larger granularity")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise ValueError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
    if existing >= MAX_BITMAPS:
        raise ValueError("Maximum number of persistent bitmaps is already reached")
    entry = _ENTRY.size + len(name.encode())
    if directory_size + entry + (-entry % 8) > MAX_DIRECTORY_SIZE:
        raise ValueError("Not enough space in the bitmap directory")


def parse_directory(raw: bytes, count: int, h: Header, file_size: int) -> list[BitmapEntry]:
    """The entries of a bitmap directory. Raises :class:`ImageError` for a malformed one."""
    entries: list[BitmapEntry] = []
    names: set[str] = set()
    pos = 0
    cs = h.cluster_size
    for _ in range(count):
        if pos + _ENTRY.size > len(raw):
            raise ImageError("qcow2 bitmap directory is truncated")
        (table_offset, table_size, flags, kind, gbits, name_size, extra_size) = (
            _ENTRY.unpack_from(raw, pos)
        )
        end = pos + _ENTRY.size + extra_size + name_size
        if end > len(raw):
            raise ImageError("qcow2 bitmap directory entry runs past the directory")
        extra = raw[pos + _ENTRY.size : pos + _ENTRY.size + extra_size]
        name_raw = raw[pos + _ENTRY.size + extra_size : end]
        name = name_raw.decode("utf-8", "replace")
        what = f"qcow2 bitmap '{name}'"
        if name_size == 0 or name_size > MAX_NAME_SIZE:
            raise ImageError(f"{what} has an invalid name length {name_size}")
        if name in names:
            raise ImageError(f"{what} is listed twice in the bitmap directory")
        if kind != TYPE_DIRTY_TRACKING:
            raise ImageError(f"{what} has unsupported type {kind}")
        if flags & ~FLAGS_KNOWN:
            raise ImageError(f"{what} has unknown flags {flags:#x}")
        if extra_size and not flags & FLAG_EXTRA_DATA_COMPATIBLE:
            raise ImageError(f"{what} has incompatible extra data")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise ImageError(f"{what} has an invalid granularity 2^{gbits}")
        if table_size != table_size_for(h.size, gbits, cs) or table_size > MAX_TABLE_SIZE:
            raise ImageError(f"{what} has a bitmap table of the wrong size ({table_size})")
        if table_offset % cs or table_offset < cs or table_offset + table_size * 8 > file_size:
            raise ImageError(f"{what} has an invalid bitmap table offset {table_offset:#x}")
        names.add(name)
        entries.append(BitmapEntry(name, table_offset, table_size, flags, gbits, kind, extra))
        pos = end + (-end % 8)
    return entries


class BitmapStore:
    """The bitmaps extension of one open image: reads, marks in use, and rewrites it."""

    def __init__(
        self, io: MetaIO, refs: Refcounts, header: Header, meta: set[int]
    ) -> None:
        self.io = io
        self.refs = refs
        self.h = header
        self.meta = meta
        self.cs = header.cluster_size
        self.cb = header.cluster_bits
        self.entries: list[BitmapEntry] = []
        self.dir_offset = 0
        self.dir_size = 0
        #: host clusters each entry owns (its table and data), for freeing
        self._owned: dict[str, list[int]] = {}

    @property
    def directory_size(self) -> int:
        return self.dir_size

    # -- loading -------------------------------------------------------------------------------
    def load(self, first: bytes, file_size: int) -> list[LoadedBitmap]:
        """Read every bitmap. Raises :class:`ImageError` for a malformed extension."""
        h = self.h
        if h.version < 3 or not h.autoclear & AUTOCLEAR_BITMAPS:
            return []  # absent, or stale: written by a program that does not know bitmaps
        ext = find_extension(h, first, EXT_BITMAPS)
        if ext is None:
            return []
        if len(ext) < _EXT.size:
            raise ImageError("qcow2 bitmaps extension is truncated")
        count, reserved, dir_size, dir_offset = _EXT.unpack_from(ext)
        if reserved:
            raise ImageError("qcow2 bitmaps extension has reserved bits set")
        if count == 0 or count > MAX_BITMAPS:
            raise ImageError(f"qcow2 bitmaps extension lists {count} bitmaps")
        if dir_size > MAX_DIRECTORY_SIZE or dir_size < _ENTRY.size * count:
            raise ImageError(f"qcow2 bitmap directory has an invalid size {dir_size}")
        if dir_offset % self.cs or dir_offset < self.cs or dir_offset + dir_size > file_size:
            raise ImageError(f"qcow2 bitmap directory offset {dir_offset:#x} is invalid")
        raw = self.io.read(dir_offset, dir_size)
        entries = parse_directory(raw, count, h, file_size)
        self.entries, self.dir_offset, self.dir_size = entries, dir_offset, dir_size
        self._claim(self._clusters(dir_offset, dir_size))
        loaded: list[LoadedBitmap] = []
        for entry in entries:
            table = self._read_table(entry, file_size)
            owned = self._clusters(entry.table_offset, entry.table_size * 8)
            owned += [e >> self.cb for e in table if e & TABLE_OFFSET_MASK]
            self._owned[entry.name] = owned
            self._claim(owned)
            inconsistent = bool(entry.flags & FLAG_IN_USE)
            nbits = bitmap_bits(h.size, entry.granularity_bits)
            bits = ClusterBitmap(nbits) if inconsistent else self._read_bits(table, nbits)
            loaded.append(
                LoadedBitmap(entry, bits, inconsistent, bool(entry.flags & FLAG_AUTO))
            )
        return loaded

    def _clusters(self, offset: int, length: int) -> list[int]:
        first = offset >> self.cb
        return list(range(first, first + -(-length // self.cs)))

    def _claim(self, clusters: Iterable[int]) -> None:
        self.meta.update(clusters)

    def _read_table(self, entry: BitmapEntry, file_size: int) -> list[int]:
        raw = self.io.read(entry.table_offset, entry.table_size * 8)
        table = list(struct.unpack(f">{entry.table_size}Q", raw))
        for value in table:
            offset = value & TABLE_OFFSET_MASK
            if value & TABLE_RESERVED_MASK or (offset and value & TABLE_ALL_ONES):
                raise ImageError(f"qcow2 bitmap '{entry.name}' has an invalid table entry")
            if offset and (offset % self.cs or offset < self.cs or offset + self.cs > file_size):
                raise ImageError(
                    f"qcow2 bitmap '{entry.name}' has data at an invalid offset {offset:#x}"
                )
        return table

    def _read_bits(self, table: list[int], nbits: int) -> ClusterBitmap:
        nbytes = -(-nbits // 8)
        data = bytearray(nbytes)
        for i, value in enumerate(table):
            start = i * self.cs
            n = min(self.cs, nbytes - start)
            offset = value & TABLE_OFFSET_MASK
            if offset:
                data[start : start + n] = self.io.read(offset, n)
            elif value & TABLE_ALL_ONES:
                data[start : start + n] = b"\xff" * n
        if nbits % 8:
            data[-1] &= (1 << (nbits % 8)) - 1
        return ClusterBitmap.from_bytes(bytes(data), nbits)

    def mark_in_use(self) -> bool:
        """A writable open: flag every consistent bitmap in use, in place. True if it wrote
        (the caller syncs before the guest writes)."""
        pos = self.dir_offset
        wrote = False
        for entry in self.entries:
            if not entry.flags & FLAG_IN_USE:
                entry.flags |= FLAG_IN_USE
                self.io.write(pos + 12, struct.pack(">I", entry.flags))
                wrote = True
            pos += len(entry.pack())
        return wrote

    # -- storing -------------------------------------------------------------------------------
    def store(self, bitmaps: list[tuple[str, int, ClusterBitmap, bool, bool]]) -> None:
        """Write ``(name, granularity, bits, enabled, inconsistent)`` as the image's bitmaps.

        An inconsistent bitmap keeps its old entry (still in use). Raises ``OSError`` (an I/O
        failure: the old bitmaps stay) or ``ValueError`` (the header does not fit).
        """
        h = self.h
        if not bitmaps and not self.entries:
            return
        old_entries = {e.name: e for e in self.entries}
        new_entries: list[BitmapEntry] = []
        new_owned: dict[str, list[int]] = {}
        allocated: list[int] = []
        try:
            for name, granularity, bits, enabled, inconsistent in bitmaps:
                old = old_entries.get(name)
                if inconsistent:
                    if old is not None:
                        new_entries.append(old)
                        new_owned[name] = self._owned.get(name, [])
                    continue
                entry, owned = self._write_bitmap(name, granularity, bits, enabled)
                allocated += owned
                new_entries.append(entry)
                new_owned[name] = owned
            ext: bytes | None = None
            dir_offset = dir_size = 0
            if new_entries:
                directory = b"".join(e.pack() for e in new_entries)
                dir_size = len(directory)
                dir_offset = self._alloc_write(directory)
                allocated += self._clusters(dir_offset, dir_size)
                ext = _EXT.pack(len(new_entries), 0, dir_size, dir_offset)
            first = self.io.read(0, self.cs)
            used = header_used(h, first)
            old_autoclear = h.autoclear
            if ext is not None:
                h.autoclear |= AUTOCLEAR_BITMAPS
            else:
                h.autoclear &= ~AUTOCLEAR_BITMAPS
            try:
                area = header_with_bitmaps(h, first, ext)
            except ValueError:
                h.autoclear = old_autoclear
                raise
            # The new bitmaps are on disk first; a power loss leaves the old header or this.
            rewrite_header(self.io, self.refs.writes, first, used, area)
        except BaseException:
            with suppress(OSError):
                self._free(allocated, referenced=False)  # nothing points at them yet
            raise
        # The header points at the new bitmaps: the old clusters can go.
        dropped: list[int] = []
        if self.entries:
            dropped += self._clusters(self.dir_offset, self.dir_size)
        kept = {c for owned in new_owned.values() for c in owned}
        for owned in self._owned.values():
            dropped += [c for c in owned if c not in kept]
        self.entries, self.dir_offset, self.dir_size = new_entries, dir_offset, dir_size
        self._owned = new_owned
        self._free(dropped)

    def _write_bitmap(
        self, name: str, granularity: int, bits: ClusterBitmap, enabled: bool
    ) -> tuple[BitmapEntry, list[int]]:
        gbits = granularity.bit_length() - 1
        data = bits.to_bytes()
        size = table_size_for(self.h.size, gbits, self.cs)
        table = [0] * size
        owned: list[int] = []
        try:
            for i in range(size):
                chunk = data[i * self.cs : (i + 1) * self.cs]
                if not any(chunk):
                    continue
                host = self._alloc_write(chunk + bytes(self.cs - len(chunk)))
                owned.append(host >> self.cb)
                table[i] = host
            raw = struct.pack(f">{size}Q", *table)
            table_offset = self._alloc_write(raw)
            owned += self._clusters(table_offset, len(raw))
        except BaseException:
            with suppress(OSError):
                self._free(owned, referenced=False)
            raise
        flags = FLAG_AUTO if enabled else 0
        return BitmapEntry(name, table_offset, size, flags, gbits), owned

    def _alloc_write(self, data: bytes) -> int:
        count = max(1, -(-len(data) // self.cs))
        first = self.refs.alloc(count)
        self.meta.update(range(first, first + count))
        offset = first << self.cb
        self.io.write(offset, data + bytes(count * self.cs - len(data)))
        self.refs.writes.wrote_target()
        return offset

    def _free(self, clusters: list[int], referenced: bool = True) -> None:
        """Drop the clusters' references: the header no longer points at them (durably, as
        the refcounts see to), or, ``referenced`` False, never did."""
        for c in sorted(set(clusters)):
            self.meta.discard(c)
            self.refs.change(c, 1, -1, referenced=referenced)

    # -- introspection -------------------------------------------------------------------------
    def info(self) -> list[dict[str, Any]]:
        """``Qcow2BitmapInfo`` for each bitmap on disk."""
        return [
            {"name": e.name, "granularity": e.granularity, "flags": e.flag_names()}
            for e in self.entries
        ]
