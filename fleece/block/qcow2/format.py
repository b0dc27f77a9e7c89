"""qcow2 on-disk constants, the header, its extensions, and the checks done before trusting them.

Everything here is pure: functions take bytes (and the file size) and return values or raise
:class:`fleece.errors.ImageError` naming what is wrong. Table contents (L1, refcount table) are
validated by :func:`check_metadata_layout` once they are read. Tables are ``array('Q')`` in the
host's byte order (:func:`be64_array`); the scans over them that must be fast are in
:mod:`fleece.block.qcow2.kernels`.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field

from fleece.errors import ImageError

MAGIC = b"QFI\xfb"
HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH = 112  # with the compression type byte and its padding
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_REFCOUNT_ORDER = 6

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# table entry layout
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

# Kinds of cluster runs (a plan's segments use the same numbers).
UNALLOC = 0  # this layer does not decide: the backing node (or zeroes)
ZERO = 1  # reads as zeroes (zero flag, with or without a preallocated host cluster)
NORMAL = 2  # data at a host cluster with refcount 1 (OFLAG_COPIED)
SHARED = 3  # data at a host cluster that may be shared (no OFLAG_COPIED): copied on write
COMPRESSED = 4  # a compressed cluster (one per run)

# byte offsets of header fields the driver rewrites in place
OFF_REFTABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")

_INCOMPAT_NAMES = {
    INCOMPAT_DIRTY: "dirty bit",
    INCOMPAT_CORRUPT: "corrupt bit",
    INCOMPAT_DATA_FILE: "external data file",
    INCOMPAT_COMPRESSION: "compression type",
    INCOMPAT_EXTL2: "extended L2 entries",
}


@dataclass
class Header:
    """The fields of a qcow2 header, plus what its extensions and backing name say."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[int] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    def l1_entries_needed(self) -> int:
        """How many L1 entries it takes to map the virtual size."""
        per_l1 = self.cluster_size * self.l2_entries
        return -(-self.size // per_l1)


def pack_header(h: Header) -> bytes:
    """The header fields (72 bytes for v2, ``h.header_length`` for v3), without extensions."""
    fixed = _V2.pack(
        MAGIC, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits, h.size,
        h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
        h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset,
    )
    if h.version == 2:
        return fixed
    v3 = _V3.pack(h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length)
    tail = bytes([h.compression_type]) if h.header_length > HEADER_V3_MIN_LENGTH else b""
    out = fixed + v3 + tail
    return out + bytes(h.header_length - len(out))


def pack_extension(kind: int, data: bytes) -> bytes:
    """One header extension, padded to a multiple of 8 bytes."""
    pad = -len(data) % 8
    return struct.pack(">II", kind, len(data)) + data + bytes(pad)


def zstd_available() -> bool:
    """True when a zstd decompressor module can be imported (it is never a dependency)."""
    return importlib.util.find_spec("zstandard") is not None


def parse_header(read: Callable[[int, int], bytes], file_size: int) -> Header:
    """Parse and check the header, its extensions and the backing file name.

    ``read(offset, length)`` returns bytes of the image file (short at its end). Raises
    :class:`ImageError` for anything that is not a qcow2 image fleece can read: bad magic,
    version, cluster size, header length, unknown or unsupported features, encryption, a bad
    backing name or extension. Feature bits that only matter for writing (dirty, corrupt) are
    reported in the header, not refused here.
    """
    head = read(0, HEADER_V3_LENGTH)
    if len(head) < 4 or head[:4] != MAGIC:
        raise ImageError("Image is not in qcow2 format")
    if len(head) < HEADER_V2_LENGTH:
        raise ImageError("qcow2 header is truncated (the file is too short)")
    fields = _V2.unpack_from(head)
    h = Header(*fields[1:])
    if h.version not in (2, 3):
        raise ImageError(f"Unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(
            f"Unsupported cluster size: 2^{h.cluster_bits} (qcow2 allows 2^9 to 2^21 bytes)"
        )
    cs = h.cluster_size
    if h.version == 3:
        if len(head) < HEADER_V3_MIN_LENGTH:
            raise ImageError("qcow2 header is truncated (the file is too short)")
        h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length = (
            _V3.unpack_from(head, HEADER_V2_LENGTH)
        )
        if (
            h.header_length < HEADER_V3_MIN_LENGTH
            or h.header_length > cs
            or h.header_length % 8
        ):
            raise ImageError(
                f"Invalid qcow2 header length {h.header_length} (must be a multiple of 8 "
                f"between {HEADER_V3_MIN_LENGTH} and the cluster size {cs})"
            )
        if h.header_length > HEADER_V3_MIN_LENGTH:
            if len(head) <= HEADER_V3_MIN_LENGTH:
                raise ImageError("qcow2 header is truncated (the file is too short)")
            h.compression_type = head[HEADER_V3_MIN_LENGTH]
    first = read(0, min(cs, max(file_size, 0)))
    if len(first) < h.header_length:
        raise ImageError("qcow2 header is truncated (the file is too short)")
    _parse_extensions(h, first)
    _check_features(h)
    if h.crypt_method != 0:
        raise ImageError(
            f"Unsupported qcow2 feature(s): encryption (crypt_method {h.crypt_method})"
        )
    if h.refcount_order > MAX_REFCOUNT_ORDER:
        raise ImageError(
            f"Invalid refcount_order {h.refcount_order}: reference count entries may not "
            "exceed 64 bits"
        )
    if h.backing_file_offset or h.backing_file_size:
        if h.backing_file_size > MAX_BACKING_NAME:
            raise ImageError(
                f"Backing file name too long ({h.backing_file_size} bytes, at most "
                f"{MAX_BACKING_NAME})"
            )
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_offset < h.header_length or end > len(first):
            raise ImageError(
                f"Invalid backing file offset {h.backing_file_offset} (the name must lie in "
                "the first cluster, after the header)"
            )
        raw = first[h.backing_file_offset : end]
        h.backing_file = raw.decode("utf-8", "surrogateescape") if raw else None
    return h


def _extension_area_end(h: Header, first: bytes) -> int:
    """Where the header extension area of the header cluster ``first`` ends: at the backing
    name, or the cluster's end."""
    end = len(first)
    if h.backing_file_offset and h.backing_file_offset < end:
        end = h.backing_file_offset
    return end


def _extension_records(h: Header, first: bytes, end: int) -> Iterator[tuple[int, int, int]]:
    """``(kind, data offset, length)`` of each record of the extension area up to ``end``,
    the end marker included. It stops after the end marker or a record whose data runs past
    ``end`` (yielded: the caller decides what that means)."""
    pos = h.header_length
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", first, pos)
        yield kind, pos + 8, length
        if kind == EXT_END or length > end - pos - 8:
            return
        pos += 8 + length + (-length % 8)


def header_extensions(h: Header, first: bytes) -> Iterator[tuple[int, bytes]]:
    """The ``(kind, data)`` of each header extension in the header cluster ``first``, in order,
    up to the end marker, the backing name or the cluster's end (no end marker before that
    limit: QEMU accepts it, the area is simply full). ``ImageError`` for an extension that runs
    past the limit."""
    end = _extension_area_end(h, first)
    for kind, at, length in _extension_records(h, first, end):
        if kind == EXT_END:
            return
        if length > end - at:
            raise ImageError(
                f"Invalid qcow2 header extension 0x{kind:08x}: length {length} runs past the "
                "end of the header area"
            )
        yield kind, first[at : at + length]


def header_used(h: Header, first: bytes) -> int:
    """How many bytes at the start of the header cluster ``first`` the header ``h`` uses: the
    header, its extensions with their end marker, the backing name. The rest is free (a header
    rewrite may put new bytes there before the header points at them)."""
    end = _extension_area_end(h, first)
    pos = end  # no end marker before the limit: the area is full
    for kind, at, length in _extension_records(h, first, end):
        if kind == EXT_END or length > end - at:
            pos = at
            break
    if h.backing_file_offset and h.backing_file_size:
        pos = max(pos, h.backing_file_offset + h.backing_file_size)
    return min(max(pos, h.header_length), len(first))


def _parse_extensions(h: Header, first: bytes) -> None:
    """Read the header extensions between the header and the backing name (or cluster end)."""
    for kind, data in header_extensions(h, first):
        length = len(data)
        h.extensions.append(kind)
        if kind == EXT_BACKING_FORMAT:
            if length > 15:
                raise ImageError(f"Invalid backing format extension: name of {length} bytes")
            h.backing_format = data.decode("ascii", "replace").rstrip("\0") or None
        elif kind == EXT_FEATURE_TABLE:
            for at in range(0, length - length % 48, 48):
                ftype, bit = data[at], data[at + 1]
                name = data[at + 2 : at + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                h.feature_names[(ftype, bit)] = name


def _check_features(h: Header) -> None:
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    refused: list[str] = []
    bit = 0
    while unknown >> bit:
        if unknown >> bit & 1:
            name = h.feature_names.get((0, bit))
            refused.append(name if name else f"Unknown incompatible feature: {1 << bit:x}")
        bit += 1
    if h.incompatible & INCOMPAT_DATA_FILE:
        refused.append(_INCOMPAT_NAMES[INCOMPAT_DATA_FILE])
    if h.incompatible & INCOMPAT_EXTL2:
        refused.append(_INCOMPAT_NAMES[INCOMPAT_EXTL2])
    if refused:
        raise ImageError("Unsupported qcow2 feature(s): " + ", ".join(refused))
    has_bit = bool(h.incompatible & INCOMPAT_COMPRESSION)
    if h.compression_type == COMPRESSION_DEFLATE:
        if has_bit:
            raise ImageError(
                "Invalid qcow2 header: the compression type bit is set for zlib compression"
            )
    elif not has_bit:
        raise ImageError(
            f"Invalid qcow2 header: compression type {h.compression_type} without the "
            "compression type feature bit"
        )
    elif h.compression_type == COMPRESSION_ZSTD:
        if not zstd_available():
            raise ImageError(
                "Unsupported qcow2 feature(s): compression type 'zstd' (no zstd module "
                "is available)"
            )
    else:
        raise ImageError(
            f"Unsupported qcow2 feature(s): unknown compression type {h.compression_type}"
        )


def check_layout(h: Header, file_size: int) -> None:
    """Check the header's table geometry against the virtual size and the file size.

    Raises :class:`ImageError` for an L1 table too large or too small for the virtual size,
    tables unaligned, beyond the end of the file or overlapping the header or each other, a
    refcount table too large, or a snapshot table out of bounds. After this, reading the L1
    and refcount tables allocates at most what the file holds.
    """
    cs = h.cluster_size
    max_l1 = MAX_L1_BYTES // 8
    needed = h.l1_entries_needed()
    if h.size > (1 << 62) or needed > max_l1:
        raise ImageError(f"Image is too big: virtual size {h.size} needs {needed} L1 entries")
    if h.l1_size > max_l1:
        raise ImageError(
            f"qcow2 image has an L1 table too large ({h.l1_size} entries, at most {max_l1})"
        )
    if h.l1_size < needed:
        raise ImageError(
            f"qcow2 image has an L1 table too small for its virtual size ({h.l1_size} "
            f"entries, {needed} needed)"
        )
    if h.l1_size:
        _check_table("L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise ImageError("qcow2 image has no refcount table")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageError(
            f"qcow2 refcount table too large ({h.refcount_table_clusters} clusters, at most "
            f"{MAX_REFTABLE_BYTES} bytes)"
        )
    _check_table(
        "refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size
    )
    if h.l1_size and _overlap(
        h.l1_table_offset, h.l1_size * 8, h.refcount_table_offset, h.refcount_table_clusters * cs
    ):
        raise ImageError("qcow2 metadata overlap: the L1 table overlaps the refcount table")
    if h.nb_snapshots:
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise ImageError(f"qcow2 image has too many snapshots ({h.nb_snapshots})")
        _check_table("snapshot table", h.snapshots_offset, 40 * h.nb_snapshots, cs, file_size)


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def _check_table(what: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise ImageError(f"qcow2 {what} offset {offset:#x} is not cluster aligned")
    if offset < cs:
        raise ImageError(f"qcow2 metadata overlap: the {what} overlaps the header")
    if offset + length > file_size:
        raise ImageError(
            f"qcow2 {what} at {offset:#x} ({length} bytes) lies beyond the end of the "
            f"image ({file_size} bytes)"
        )


class CorruptEntry(ValueError):
    """An L2 entry no valid image has (the driver reports it as its image being corrupt)."""


def classify_entry(entry: int, cluster_size: int, v3: bool) -> tuple[int, int]:
    """``(kind, aux)`` of one L2 entry: ``aux`` is a data cluster's host offset, a compressed
    cluster's entry, else 0. ``CorruptEntry`` for a zero flag in a version 2 image or an
    unaligned data cluster."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED, entry
    host = entry & L2E_OFFSET_MASK
    if entry & OFLAG_ZERO:
        if not v3:
            raise CorruptEntry("zero cluster flag in a version 2 image")
        return ZERO, 0
    if host == 0:
        return UNALLOC, 0
    if host & (cluster_size - 1):
        raise CorruptEntry(f"unaligned data cluster offset {host:#x}")
    return (NORMAL if entry & OFLAG_COPIED else SHARED), host


def be64_array(raw: bytes | bytearray) -> array[int]:
    """A table of big-endian 64-bit entries, as native integers."""
    table = array("Q", raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def be64_bytes(table: array[int]) -> bytes:
    """A table's entries, big-endian, as the image stores them."""
    if sys.byteorder == "big":
        return table.tobytes()
    swapped = array("Q", table)
    swapped.byteswap()
    return swapped.tobytes()


def zero_table(entries: int) -> array[int]:
    """A table of ``entries`` zero entries."""
    return array("Q", bytes(8 * entries))


def check_metadata_layout(h: Header, file_size: int, l1: array[int], reftable: array[int]
                          ) -> None:
    """Check every refcount block and L2 table the tables point at.

    Each must be cluster aligned, inside the file, and must not overlap the header, the L1
    table, the refcount table or any other block or table. Raises :class:`ImageError`.
    """
    cs = h.cluster_size
    cb = h.cluster_bits
    ranges = [("the header", 0, 1)]
    if h.l1_size:
        ranges.append(("the L1 table", h.l1_table_offset >> cb, -(-h.l1_size * 8 // cs)))
    ranges.append(
        ("the refcount table", h.refcount_table_offset >> cb, h.refcount_table_clusters)
    )
    seen: list[list[int]] = []
    for what, table, mask in (
        ("refcount block", reftable, REFT_OFFSET_MASK),
        ("L2 table", l1, L1E_OFFSET_MASK),
    ):
        if what == "refcount block" and any(e & 0x1FF for e in table):
            raise ImageError("qcow2 refcount table has an entry with reserved bits set")
        offsets = [e & mask for e in table if e]
        for off in offsets:
            if off & (cs - 1):
                raise ImageError(f"qcow2 {what} offset {off:#x} is not cluster aligned")
        for off in offsets:
            if off > max(file_size - cs, 0) or file_size < cs:
                raise ImageError(f"qcow2 {what} offset {off:#x} lies beyond the end of the "
                                 f"image ({file_size} bytes)")
        clusters = [off >> cb for off in offsets]
        for name, start, count in ranges:
            if any(start <= c < start + count for c in clusters):
                raise ImageError(f"qcow2 metadata overlap: a {what} overlaps {name}")
        seen.append(clusters)
    blocks, tables = seen
    if len(set(blocks)) < len(blocks):
        raise ImageError("qcow2 metadata overlap: two refcount table entries share a block")
    if len(set(tables)) < len(tables):
        raise ImageError("qcow2 metadata overlap: two L1 entries share an L2 table")
    if not set(blocks).isdisjoint(tables):
        raise ImageError("qcow2 metadata overlap: an L2 table is also a refcount block")


def extensions_except(h: Header, first: bytes, dropped: int) -> list[bytes]:
    """The header extensions in ``first`` (the header cluster), packed again, but for those of
    kind ``dropped``: what a rewrite of the header keeps (up to a malformed one, if any)."""
    kept: list[bytes] = []
    with suppress(ImageError):
        for kind, data in header_extensions(h, first):
            if kind != dropped:
                kept.append(pack_extension(kind, data))
    return kept


def header_area(
    h: Header, first: bytes, backing_file: str | None, backing_format: str | None
) -> bytes:
    """The header cluster's new prefix naming a new backing file (and format).

    Keeps every extension but the backing format, which is replaced. Raises ``ValueError`` when
    the name is too long or the result does not fit in the first cluster.
    """
    kept = extensions_except(h, first, EXT_BACKING_FORMAT)
    name = backing_file.encode() if backing_file else b""
    if len(name) > MAX_BACKING_NAME:
        raise ValueError(f"backing file name of {len(name)} bytes (at most 1023)")
    if backing_format is not None and name:
        kept.append(pack_extension(EXT_BACKING_FORMAT, backing_format.encode()))
    extensions = b"".join(kept) + pack_extension(EXT_END, b"")
    h.backing_file_offset = h.header_length + len(extensions) if name else 0
    h.backing_file_size = len(name)
    area = pack_header(h) + extensions + name
    if len(area) > h.cluster_size:
        raise ValueError("the backing file name does not fit in the image's header cluster")
    return area
