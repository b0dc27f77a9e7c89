"""Creating empty qcow2 images (what ``qemu-img create -f qcow2`` makes).

Layout: the header (with its extensions and the backing file name) in cluster 0, then the
refcount table, the refcount blocks, and the L1 table. Every cluster of that layout has
refcount 1, so ``qemu-img check`` finds nothing to say.
"""

from __future__ import annotations

import os

from fleece.block.qcow2 import kernels
from fleece.block.qcow2.format import (
    EXT_BACKING_FORMAT,
    EXT_END,
    HEADER_V2_LENGTH,
    HEADER_V3_LENGTH,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
    Header,
    be64_bytes,
    pack_extension,
    pack_header,
    zero_table,
)


def probe_format(path: str) -> str:
    """``"qcow2"`` if the file at ``path`` starts with the qcow2 magic, else ``"raw"``.

    Raises ``OSError`` if the file cannot be read.
    """
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == MAGIC else "raw"


def create(
    path: str,
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_format: str | None = None,
    version: int = 3,
    refcount_bits: int = 16,
) -> None:
    """Create (or overwrite) an empty qcow2 image of ``size`` virtual bytes at ``path``.

    Like ``qemu-img create``, the size is rounded up to a multiple of 512 bytes.
    ``backing_file`` is stored as given (a relative name is relative to the image's folder);
    without ``backing_format`` the backing file is probed when it exists. Raises
    ``ValueError`` for a cluster size that is not a power of two in 512..2 MiB, a bad size,
    version or backing name, and ``OSError`` if the file cannot be written.
    ``refcount_bits`` (1, 2, 4, ..., 64; not 16 only with version 3) is QEMU's option.
    """
    if (
        not isinstance(cluster_size, int)
        or cluster_size <= 0
        or cluster_size & (cluster_size - 1)
        or not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS)
    ):
        raise ValueError(
            f"cluster_size {cluster_size!r} must be a power of two between 512 and 2097152"
        )
    if version not in (2, 3):
        raise ValueError(f"version {version!r} must be 2 (compat 0.10) or 3 (compat 1.1)")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (version == 2 and refcount_bits != 16):
        raise ValueError(
            f"refcount_bits {refcount_bits!r} must be a power of two up to 64 (16 for version 2)"
        )
    order = refcount_bits.bit_length() - 1
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size {size!r} must be a non-negative integer")
    size = -(-size // 512) * 512  # QEMU's block layer counts 512-byte sectors: round up
    cluster_bits = cluster_size.bit_length() - 1
    l2_entries = cluster_size // 8
    l1_size = max(1, -(-size // (cluster_size * l2_entries)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(f"size {size} is too large for cluster_size {cluster_size}")
    if backing_format is not None and backing_file is None:
        raise ValueError("backing_format needs a backing_file")
    name = b""
    if backing_file is not None:
        name = os.fsencode(backing_file)
        if not name or len(name) > MAX_BACKING_NAME:
            raise ValueError(f"backing_file name of {len(name)} bytes (1 to 1023 allowed)")
        if backing_format is None:
            where = backing_file
            if not os.path.isabs(where):
                where = os.path.join(os.path.dirname(os.path.abspath(path)), where)
            try:
                backing_format = probe_format(where)
            except OSError:
                backing_format = None
        if backing_format is not None and len(backing_format.encode()) > 15:
            raise ValueError(f"backing_format {backing_format!r} is too long")

    # Layout: header | refcount table | refcount blocks | L1 table, sized to a fixed point.
    per_block = cluster_size * 8 >> order
    l1_clusters = -(-l1_size * 8 // cluster_size)
    table_clusters, blocks = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        want_blocks = -(-total // per_block)
        want_table = -(-want_blocks * 8 // cluster_size)
        if (want_blocks, want_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, want_blocks), max(table_clusters, want_table)

    header_length = HEADER_V2_LENGTH if version == 2 else HEADER_V3_LENGTH
    ext = b""
    if backing_format is not None:
        ext += pack_extension(EXT_BACKING_FORMAT, backing_format.encode())
    ext += pack_extension(EXT_END, b"")
    backing_offset = header_length + len(ext) if name else 0
    if backing_offset + len(name) > cluster_size:
        raise ValueError(
            f"backing_file name of {len(name)} bytes does not fit in a {cluster_size}-byte "
            "header cluster"
        )
    header = Header(
        version=version,
        backing_file_offset=backing_offset,
        backing_file_size=len(name),
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(1 + table_clusters + blocks) * cluster_size,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=table_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=header_length,
    )
    first = pack_header(header) + ext + name
    table = zero_table(table_clusters * cluster_size // 8)
    for k in range(blocks):
        table[k] = (1 + table_clusters + k) * cluster_size
    refcounts = bytearray(blocks * cluster_size)  # the blocks' counters follow each other
    kernels.refblock_add(refcounts, order, 0, total, 1)

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, 0, first)
        _write_all(fd, cluster_size, be64_bytes(table))
        _write_all(fd, (1 + table_clusters) * cluster_size, refcounts)
        os.ftruncate(fd, total * cluster_size)
        os.fdatasync(fd)  # on stable storage before anyone writes into it (QEMU flushes too)
    finally:
        os.close(fd)


def _write_all(fd: int, offset: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done
