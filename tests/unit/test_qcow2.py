"""The qcow2 driver without external tools: round trips, backing chains, zeroes, discards,
block status, refcount bookkeeping (checked by a small independent checker), and hostile
images that must be refused with :class:`ImageError` without hanging.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleece.block.driver import Status
from fleece.block.graph import BlockGraph
from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import Perm
from fleece.block.qcow2 import create
from fleece.block.qcow2.format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    parse_header,
)
from fleece.errors import GenericError, ImageError

RW = (Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


class Image:
    """An open qcow2 node with its monitor reference."""

    def __init__(self, path: Path, *, read_only: bool = False, **extra: Any) -> None:
        self.graph = BlockGraph()
        options: dict[str, Any] = {
            "driver": "qcow2",
            "discard": "unmap",
            "file": {"driver": "file", "filename": str(path)},
            **extra,
        }
        if read_only:
            options["read-only"] = True
        self.node: BlockNode = self.graph.open_node(options)
        perm, shared = (Perm.CONSISTENT_READ, Perm.all()) if read_only else RW
        self.user: NodeUser = self.node.add_user(UserKind.MONITOR, "the test", perm, shared)

    def close(self) -> None:
        self.user.release()

    def __enter__(self) -> BlockNode:
        return self.node

    def __exit__(self, *exc: object) -> None:
        self.close()


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- an independent consistency checker (a small "qemu-img check") -----------------------------
def check_refcounts(path: Path) -> None:
    """Assert every cluster's refcount equals its references, and nothing is leaked."""
    data = path.read_bytes()
    h = parse_header(lambda o, n: data[o : o + n], len(data))
    cs, cb = h.cluster_size, h.cluster_bits
    refs: dict[int, int] = {}

    def ref(offset: int, length: int) -> None:
        for c in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            refs[c] = refs.get(c, 0) + 1

    ref(0, cs)
    ref(h.l1_table_offset, h.l1_size * 8)
    ref(h.refcount_table_offset, h.refcount_table_clusters * cs)
    l1 = np.frombuffer(data, ">u8", h.l1_size, h.l1_table_offset)
    x = 62 - (cb - 8)
    for e1 in l1.tolist():
        l2_off = e1 & L2E_OFFSET_MASK
        if not l2_off:
            continue
        assert e1 & OFLAG_COPIED
        ref(l2_off, cs)
        for e in np.frombuffer(data, ">u8", cs // 8, l2_off).tolist():
            if e & OFLAG_COMPRESSED:
                off = e & ((1 << x) - 1)
                nsec = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
                ref(off & ~511, nsec * 512)
            elif e & L2E_OFFSET_MASK:
                assert e & OFLAG_COPIED, hex(e)
                ref(e & L2E_OFFSET_MASK, cs)
    table = np.frombuffer(data, ">u8", h.refcount_table_clusters * cs // 8, h.refcount_table_offset)
    bits = 1 << h.refcount_order
    per_block = cs * 8 // bits
    counts: dict[int, int] = {}
    for index, e in enumerate(table.tolist()):
        if not e:
            continue
        ref(e, cs)
        block = data[e : e + cs]
        for i in range(per_block):
            bit = i * bits
            if bits >= 8:
                value = int.from_bytes(block[bit // 8 : bit // 8 + bits // 8], "big")
            else:
                value = block[bit // 8] >> (bit % 8) & ((1 << bits) - 1)
            if value:
                counts[index * per_block + i] = value
    assert counts == refs, {
        c: (counts.get(c), refs.get(c))
        for c in set(counts) | set(refs)
        if counts.get(c) != refs.get(c)
    }


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * 1024 * 1024])
def test_round_trip(tmp_path: Path, version: int, cluster_size: int) -> None:
    path = tmp_path / "a.qcow2"
    size = 3 * cluster_size * (cluster_size // 8 if cluster_size <= 4096 else 1) + 1536
    create(str(path), size, cluster_size=cluster_size, version=version)
    model = bytearray(size)
    rng = random.Random(cluster_size + version)
    with Image(path) as node:
        assert node.size == size
        assert node.pread(0, size) == bytes(size)
        writes = [(0, 100), (size - 700, 700), (cluster_size - 3, 10), (cluster_size * 2, 1)]
        writes += [(rng.randrange(size - 5000), rng.randrange(1, 5000)) for _ in range(40)]
        for i, (off, n) in enumerate(writes):
            chunk = payload(n, i)
            node.pwrite(off, chunk)
            model[off : off + n] = chunk
        assert node.pread(0, size) == model
        node.flush()
    check_refcounts(path)
    with Image(path, read_only=True) as node:
        assert node.pread(0, size) == model
        info = node.info()["image"]
        assert info["cluster-size"] == cluster_size
        data = info["format-specific"]["data"]
        assert data["compat"] == ("1.1" if version == 3 else "0.10")
        assert data["refcount-bits"] == 16 and not data["corrupt"]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "r.qcow2"
    size = 4 * 1024 * 1024
    create(str(path), size, cluster_size=512, refcount_bits=bits)
    model = bytearray(size)
    with Image(path) as node:
        for i in range(64):
            off = (i * 65537) % (size - 3000)
            chunk = payload(3000, i)
            node.pwrite(off, chunk)
            model[off : off + 3000] = chunk
        node.pdiscard(65536, 65536)
        model[65536:131072] = bytes(65536)
        assert node.pread(0, size) == model
    check_refcounts(path)
    with Image(path, read_only=True) as node:
        assert node.pread(0, size) == model


def test_growth_across_refcount_blocks_and_table(tmp_path: Path) -> None:
    """512-byte clusters: hundreds of L2 tables and refcount blocks, and a moved refcount table."""
    path = tmp_path / "g.qcow2"
    size = 12 * 1024 * 1024
    create(str(path), size, cluster_size=512)
    table_before = struct.unpack(">Q", path.read_bytes()[48:56])[0]
    model = bytearray(size)
    with Image(path) as node:
        for off in range(0, size, 65536):
            chunk = payload(65536, off)
            node.pwrite(off, chunk)
            model[off : off + 65536] = chunk
        assert node.pread(0, size) == model
    assert struct.unpack(">Q", path.read_bytes()[48:56])[0] != table_before
    check_refcounts(path)
    with Image(path) as node:
        assert node.pread(0, size) == model
        for off in range(0, size, 1 << 20):  # rewrite in place, then discard and reuse
            node.pwrite(off + 100, b"z" * 1000)
            model[off + 100 : off + 1100] = b"z" * 1000
        node.pdiscard(0, size // 2)
        model[: size // 2] = bytes(size // 2)
        chunk = payload(size // 4, 99)
        node.pwrite(size // 8, chunk)
        model[size // 8 : size // 8 + len(chunk)] = chunk
        assert node.pread(0, size) == model
    check_refcounts(path)


def test_size_rounding_and_tail_cluster(tmp_path: Path) -> None:
    path = tmp_path / "t.qcow2"
    create(str(path), 100_000, cluster_size=65536)
    with Image(path) as node:
        assert node.size == 100_352  # rounded up to 512 like qemu-img
        node.pwrite(node.size - 10, b"0123456789")
        assert node.pread(node.size - 12, 12) == b"\0\0" + b"0123456789"
        node.pwrite_zeroes(65536, node.size - 65536, may_unmap=True)
        assert node.pread(65536, node.size - 65536) == bytes(node.size - 65536)
    check_refcounts(path)


def test_create_refuses_bad_arguments(tmp_path: Path) -> None:
    for bad in (1000, 256, 4 * 1024 * 1024, 0, 3 * 512):
        with pytest.raises(ValueError, match="cluster_size"):
            create(str(tmp_path / "x"), 1 << 20, cluster_size=bad)
    with pytest.raises(ValueError, match="version"):
        create(str(tmp_path / "x"), 1 << 20, version=4)
    with pytest.raises(ValueError, match="backing_file"):
        create(str(tmp_path / "x"), 1 << 20, cluster_size=512, backing_file="b" * 1000)


# -- backing chains --------------------------------------------------------------------------
def make_raw(path: Path, size: int, seed: int) -> bytes:
    data = payload(size, seed)
    path.write_bytes(data)
    return data


def test_backing_raw_and_qcow2_chain_relative(tmp_path: Path) -> None:
    size = 1024 * 1024
    base = make_raw(tmp_path / "base.raw", size // 2, 1)  # shorter than the overlay
    create(str(tmp_path / "mid.qcow2"), size, cluster_size=4096, backing_file="base.raw")
    mid = bytearray(base + bytes(size - len(base)))
    with Image(tmp_path / "mid.qcow2") as node:
        assert node.backing() is not None
        assert node.pread(0, size) == mid
        node.pwrite(5000, b"M" * 3000)  # partial clusters over backing data
        mid[5000:8000] = b"M" * 3000
        node.pwrite(size // 2 - 100, b"E" * 200)  # straddles the end of the backing file
        mid[size // 2 - 100 : size // 2 + 100] = b"E" * 200
        assert node.pread(0, size) == mid
    sub = tmp_path / "sub"
    sub.mkdir()
    create(str(sub / "top.qcow2"), size, cluster_size=65536, backing_file="../mid.qcow2")
    with Image(sub / "top.qcow2") as node:
        info = node.info()
        assert info["backing_file"] == "../mid.qcow2"
        assert info["image"]["backing-filename-format"] == "qcow2"
        assert info["backing_file_depth"] == 2
        top = bytearray(mid)
        node.pwrite(70000, b"T" * 10)
        top[70000:70010] = b"T" * 10
        assert node.pread(0, size) == top
        assert node.backing() is not None and node.backing().read_only  # type: ignore[union-attr]
    check_refcounts(sub / "top.qcow2")
    check_refcounts(tmp_path / "mid.qcow2")


def test_backing_option_overrides(tmp_path: Path) -> None:
    make_raw(tmp_path / "base.raw", 65536, 3)
    create(str(tmp_path / "o.qcow2"), 65536, cluster_size=4096, backing_file="base.raw")
    with Image(tmp_path / "o.qcow2", backing=None) as node:
        assert node.backing() is None
        assert node.pread(0, 65536) == bytes(65536)
        assert node.block_status(0, 65536).flags == Status.ZERO


def test_backing_loop_is_refused(tmp_path: Path) -> None:
    create(str(tmp_path / "a.qcow2"), 65536, backing_file="b.qcow2", backing_format="qcow2")
    create(str(tmp_path / "b.qcow2"), 65536, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="loop"):
        Image(tmp_path / "a.qcow2", read_only=True)


def test_missing_backing_file(tmp_path: Path) -> None:
    create(str(tmp_path / "a.qcow2"), 65536, backing_file="nope.raw", backing_format="raw")
    with pytest.raises(GenericError, match=r"nope\.raw"):
        Image(tmp_path / "a.qcow2")


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("may_unmap", [False, True])
def test_zeroes_and_discards_hide_backing(tmp_path: Path, version: int, may_unmap: bool) -> None:
    size = 256 * 1024
    base = make_raw(tmp_path / "base.raw", size, 5)
    create(str(tmp_path / "o.qcow2"), size, cluster_size=4096, backing_file="base.raw",
           version=version)
    model = bytearray(base)
    with Image(tmp_path / "o.qcow2") as node:
        node.pwrite(0, b"A" * 20000)
        model[0:20000] = b"A" * 20000
        node.pwrite_zeroes(1000, 50000, may_unmap=may_unmap)  # partial + whole clusters
        model[1000:51000] = bytes(50000)
        assert node.pread(0, size) == model
        node.pdiscard(100_000, 50_000)  # a hint: must never expose backing data
        got = node.pread(0, size)
        for off in range(0, size, 4096):
            chunk = got[off : off + 4096]
            assert chunk == model[off : off + 4096] or chunk == bytes(4096)
        model[:] = got
        node.pwrite_zeroes(0, size, may_unmap=may_unmap)
        assert node.pread(0, size) == bytes(size)
    check_refcounts(tmp_path / "o.qcow2")
    with Image(tmp_path / "o.qcow2", read_only=True) as node:
        assert node.pread(0, size) == bytes(size)


def test_zero_flag_keeps_or_frees_host_clusters(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    create(str(path), 1 << 20, cluster_size=4096)
    with Image(path) as node:
        node.pwrite(0, payload(65536, 1))
        host = node.block_status(0, 65536).host_offset
        assert host is not None
        node.pwrite_zeroes(0, 16384, may_unmap=False)  # QEMU's ZERO_ALLOC: host kept
        node.pwrite_zeroes(16384, 16384, may_unmap=True)
        st = node.block_status(0, 1 << 20)
        assert st.flags == Status.ALLOCATED | Status.ZERO and st.length == 32768
        node.pwrite(4096 + 10, b"x")  # partial write into a zeroed-but-allocated cluster
        assert node.pread(4096, 4096) == bytes(10) + b"x" + bytes(4085)
        assert node.block_status(4096, 4096).host_offset == host + 4096
    check_refcounts(path)


def test_a_freed_cluster_is_punched_out_of_the_file(tmp_path: Path) -> None:
    """A data cluster whose last reference goes is punched out of the file at once, also on
    a node that does not pass discards on (``discard: ignore``): the native plane may have
    handed its page cache pages to a socket (``sendfile``), and a page rewritten in place
    for the cluster's next owner would reach that reader as another offset's data."""
    path = tmp_path / "p.qcow2"
    create(str(path), 1 << 20, cluster_size=4096)
    with Image(path, discard="ignore") as node:
        node.pwrite(0, payload(65536, 3))
        host = node.block_status(16384, 4096).host_offset
        assert host is not None
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, host, os.SEEK_DATA) == host
            node.pwrite_zeroes(16384, 8192, may_unmap=True)  # frees two clusters
            assert os.lseek(fd, host, os.SEEK_HOLE) == host
            assert os.lseek(fd, host, os.SEEK_DATA) == host + 8192
        finally:
            os.close(fd)
        assert node.pread(0, 65536) == payload(65536, 3)[:16384] + bytes(8192) + (
            payload(65536, 3)[24576:])
    check_refcounts(path)


# -- block status -----------------------------------------------------------------------------
def test_block_status_extents(tmp_path: Path) -> None:
    make_raw(tmp_path / "base.raw", 1 << 20, 7)
    path = tmp_path / "s.qcow2"
    create(str(path), 1 << 20, cluster_size=4096, backing_file="base.raw")
    with Image(path) as node:
        node.pwrite(8192, payload(5 * 4096, 2))  # clusters 2..6, contiguous on the host
        node.pwrite_zeroes(40960, 8192, may_unmap=True)  # clusters 10..11
        exts = list(node.extents(0, 1 << 20, above=False))
        kinds = [(e.offset, e.length, e.flags) for e in exts]
        assert kinds == [
            (0, 8192, Status(0)),
            (8192, 20480, Status.ALLOCATED | Status.DATA),
            (28672, 12288, Status(0)),
            (40960, 8192, Status.ALLOCATED | Status.ZERO),
            (49152, (1 << 20) - 49152, Status(0)),
        ]
        host = exts[1].host_offset
        assert host is not None and host % 4096 == 0
        st = node.block_status(8192 + 100, 4096)
        assert st.host_offset == host + 100 and st.length == 4096
        above = node.block_status_above(0, 8192)
        assert above.depth == 2 and above.allocated
    create(str(tmp_path / "n.qcow2"), 1 << 20, cluster_size=4096)
    with Image(tmp_path / "n.qcow2") as node:
        st = node.block_status(0, 1 << 20)
        assert st.flags == Status.ZERO and st.length == 1 << 20
        above = node.block_status_above(0, 1 << 20)
        assert above.zero and not above.allocated and above.length == 1 << 20


def test_host_map_is_the_host_contiguous_data_run(tmp_path: Path) -> None:
    """``host_map`` (what a route learns) maps the run of data clusters at an offset that is
    contiguous on the host, however long or short, across L2 tables (4 KiB clusters: 2 MiB
    each), and nothing where the offset is not data. Checked cluster by cluster against
    block status, on a layout of long sequential runs, shuffled single clusters, zeroes and
    holes, with ranges far longer than the runs (a route looks 64 MiB ahead)."""
    cs, size = 4096, 8 << 20
    path = tmp_path / "frag.qcow2"
    create(str(path), size, cluster_size=cs)
    rng = random.Random(5)
    with Image(path) as node:
        node.pwrite(0, payload(700 * cs, 1))  # one run across the first L2 boundary (512)
        shuffled = list(range(800, 1400))
        rng.shuffle(shuffled)
        for cluster in shuffled[:450]:  # scattered on the host, some neighbours adjacent
            node.pwrite(cluster * cs, payload(cs, cluster))
        node.pwrite_zeroes(1500 * cs, 20 * cs, may_unmap=False)
        node.pwrite(1600 * cs, payload(300 * cs, 2))
        hosts: list[int | None] = []
        for cluster in range(size // cs):
            st = node.block_status(cluster * cs, cs)
            hosts.append(st.host_offset if st.flags & Status.DATA and not st.flags & Status.ZERO
                         else None)
        for cluster in [0, 1, 511, 512, 699, 700, 799, *shuffled[:40], 1400, 1510, 1600, 1899]:
            found = node.host_map(cluster * cs, size - cluster * cs)
            host = hosts[cluster]
            if host is None:
                assert found is None, cluster
                continue
            assert found is not None and found.offset == host, cluster
            run = 1
            while cluster + run < len(hosts) and hosts[cluster + run] == host + run * cs:
                run += 1
            assert found.length == run * cs, (cluster, found.length // cs, run)


# -- compressed clusters (built by hand) ------------------------------------------------------
def compress_cluster(path: Path, guest_cluster: int, content: bytes) -> None:
    """Turn an allocated cluster into a compressed one that lives in the same host cluster."""
    data = bytearray(path.read_bytes())
    h = parse_header(lambda o, n: bytes(data[o : o + n]), len(data))
    cs, cb = h.cluster_size, h.cluster_bits
    l2_bits = cb - 3
    l1e = struct.unpack_from(">Q", data, h.l1_table_offset + 8 * (guest_cluster >> l2_bits))[0]
    l2_at = (l1e & L2E_OFFSET_MASK) + 8 * (guest_cluster & ((1 << l2_bits) - 1))
    host = struct.unpack_from(">Q", data, l2_at)[0] & L2E_OFFSET_MASK
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    blob = comp.compress(content) + comp.flush()
    assert len(blob) <= cs - 100
    data[host + 100 : host + 100 + len(blob)] = blob
    x = 62 - (cb - 8)
    start = host + 100
    extra = (start + len(blob) - 1) // 512 - start // 512
    struct.pack_into(">Q", data, l2_at, OFLAG_COMPRESSED | extra << x | start)
    path.write_bytes(bytes(data))


def test_compressed_cluster_read_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    create(str(path), 1 << 20, cluster_size=4096)
    content = (b"compressible " * 400)[:4096]
    with Image(path) as node:
        node.pwrite(3 * 4096, bytes(4096))
    compress_cluster(path, 3, content)
    check_refcounts(path)
    with Image(path) as node:
        assert node.pread(3 * 4096, 4096) == content
        assert node.pread(3 * 4096 + 13, 26) == content[13:39]
        st = node.block_status(3 * 4096, 4096)
        assert st.flags == Status.ALLOCATED | Status.DATA and st.host_offset is None
        node.pwrite(3 * 4096 + 5, b"NEW")
        assert node.pread(3 * 4096, 4096) == content[:5] + b"NEW" + content[8:]
        assert node.block_status(3 * 4096, 4096).host_offset is not None
    check_refcounts(path)


# -- concurrency ------------------------------------------------------------------------------
def _in_threads(path: Path, threads: int, work: Callable[[BlockNode, int, int], None]) -> None:
    """``work(node, start, length)`` in ``threads`` threads at once, each on its own share of
    the image at ``path``; none may fail, and the independent checker finds the refcounts
    right afterwards."""
    errors: list[BaseException] = []
    with Image(path) as node:
        share = node.size // threads

        def run(k: int) -> None:
            try:
                work(node, k * share, share)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        running = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
        for t in running:
            t.start()
        for t in running:
            t.join()
    assert not errors, errors
    check_refcounts(path)


def test_concurrent_io(tmp_path: Path) -> None:
    path = tmp_path / "p.qcow2"
    create(str(path), 4 << 20, cluster_size=4096)

    def work(node: BlockNode, region: int, share: int) -> None:
        k = region // share
        mine = bytearray(share)
        rng = random.Random(k)
        for i in range(150):
            off = rng.randrange(0, share - 9000)
            op = rng.random()
            if op < 0.6:
                chunk = payload(rng.randrange(1, 9000), k * 1000 + i)
                node.pwrite(region + off, chunk)
                mine[off : off + len(chunk)] = chunk
            elif op < 0.8:
                node.pwrite_zeroes(region + off, 8192, may_unmap=rng.random() < 0.5)
                mine[off : off + 8192] = bytes(8192)
            else:
                node.pdiscard(region + off, 8192)
                mine[off : off + 8192] = node.pread(region + off, 8192)
            assert node.pread(region, share) == mine

    _in_threads(path, 4, work)


def test_concurrent_writers_crossing_reservations(tmp_path: Path) -> None:
    """Writers that allocate, rewrite in place, zero and discard their own regions at once,
    through several reservations of new clusters (and the ones made ahead): freeing the rest
    of a reservation waits for older I/O with the lock let go, and a writer that came in
    meanwhile must neither take the same clusters (a cluster mapped twice, then freed twice:
    "refcount underflow") nor make a reservation that replaces another (leaked clusters)."""
    path = tmp_path / "r.qcow2"
    create(str(path), 48 << 20, cluster_size=4096)

    def work(node: BlockNode, region: int, share: int) -> None:
        k = region // share
        mine = bytearray(share)
        rng = random.Random(k)
        for i in range(200):
            off = rng.randrange(0, share - 131072) & ~511
            op = rng.random()
            if op < 0.7:
                chunk = payload(rng.randrange(512, 131072), k * 1000 + i)
                node.pwrite(region + off, chunk)
                mine[off : off + len(chunk)] = chunk
            elif op < 0.85:
                node.pwrite_zeroes(region + off, 65536, may_unmap=True)
                mine[off : off + 65536] = bytes(65536)
            else:
                node.pdiscard(region + off, 65536)
                mine[off : off + 65536] = node.pread(region + off, 65536)
        assert node.pread(region, share) == mine

    _in_threads(path, 8, work)


# -- dirty, corrupt, read-only ---------------------------------------------------------------
def set_incompat(path: Path, bits: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, 72, bits)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bit", [INCOMPAT_DIRTY, INCOMPAT_CORRUPT])
def test_dirty_and_corrupt_images(tmp_path: Path, bit: int) -> None:
    path = tmp_path / "d.qcow2"
    create(str(path), 1 << 20)
    with Image(path) as node:
        node.pwrite(0, b"hello")
    set_incompat(path, bit)
    with Image(path, read_only=True) as node:
        assert node.pread(0, 5) == b"hello"
        info = node.info()["image"]
        assert info["format-specific"]["data"]["corrupt"] == (bit == INCOMPAT_CORRUPT)
    with pytest.raises(ImageError, match="dirty" if bit == INCOMPAT_DIRTY else "corrupt"):
        Image(path)


def test_read_only_node_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    create(str(path), 1 << 20)
    with Image(path, read_only=True) as node, pytest.raises(OSError):
        node.pwrite(0, b"x")


def test_options(tmp_path: Path) -> None:
    path = tmp_path / "o.qcow2"
    create(str(path), 1 << 20)
    extra: dict[str, Any] = {
        "lazy-refcounts": False,
        "pass-discard-request": True,
        "overlap-check": "all",
        "cache-size": 1 << 20,
        "l2-cache-size": 65536,
        "cache-clean-interval": 0,
    }
    with Image(path, **extra) as node:
        node.pwrite(0, b"x")
    with pytest.raises(GenericError, match="unexpected"):
        Image(path, bogus=1)


# -- hostile images ---------------------------------------------------------------------------
Patch = Callable[[bytearray], None]


def _u32(at: int, value: int) -> Patch:
    return lambda d: struct.pack_into(">I", d, at, value)


def _u64(at: int, value: int) -> Patch:
    return lambda d: struct.pack_into(">Q", d, at, value)


def _l1_entry(value: int) -> Patch:
    def patch(d: bytearray) -> None:
        l1 = struct.unpack_from(">Q", d, 40)[0]
        struct.pack_into(">Q", d, l1, value)
    return patch


def _reftable_entry(index: int, value: int) -> Patch:
    def patch(d: bytearray) -> None:
        rt = struct.unpack_from(">Q", d, 48)[0]
        struct.pack_into(">Q", d, rt + 8 * index, value)
    return patch


def _both(*patches: Patch) -> Patch:
    def patch(d: bytearray) -> None:
        for one in patches:
            one(d)
    return patch


def _byte(at: int, value: int) -> Patch:
    return lambda d: d.__setitem__(at, value)


def _ext(kind: int, length: int) -> Patch:
    def patch(d: bytearray) -> None:
        struct.pack_into(">II", d, 112, kind, length)
    return patch


HOSTILE: dict[str, tuple[Patch, str]] = {
    "magic": (lambda d: d.__setitem__(slice(0, 4), b"QFI\0"), "not in qcow2 format"),
    "version": (_u32(4, 4), "version 4"),
    "cluster_bits_small": (_u32(20, 8), "cluster size"),
    "cluster_bits_large": (_u32(20, 22), "cluster size"),
    "unknown_incompat": (_u64(72, 1 << 40), "Unknown incompatible feature"),
    "external_data": (_u64(72, 1 << 2), "external data file"),
    "extended_l2": (_u64(72, 1 << 4), "extended L2"),
    "encryption": (_u32(32, 1), "encryption"),
    "compression_zstd": (_both(_u64(72, 1 << 3), _byte(104, 1)), "zstd"),
    "compression_unknown": (_both(_u64(72, 1 << 3), _byte(104, 7)), "compression"),
    "compression_bit_zlib": (_u64(72, 1 << 3), "compression"),
    "l1_too_large": (_u32(36, (32 << 20) // 8 + 1), "L1 table too large"),
    "l1_too_small": (_both(_u64(24, 1 << 40), _u32(36, 1)), "too small"),
    "l1_unaligned": (_u64(40, 3 * 65536 + 8), "not cluster aligned"),
    "l1_beyond_eof": (_u64(40, 1 << 40), "beyond the end"),
    "l1_on_header": (_u64(40, 0), "overlaps the header"),
    "reftable_on_header": (_u64(48, 0), "overlaps the header"),
    "reftable_unaligned": (_u64(48, 65536 + 512), "not cluster aligned"),
    "reftable_beyond_eof": (_u64(48, 1 << 40), "beyond the end"),
    "reftable_huge": (_u32(56, 1 << 20), "refcount table too large"),
    "reftable_empty": (_u32(56, 0), "no refcount table"),
    "reftable_on_l1": (_u64(48, 3 * 65536), "overlaps"),
    "refblock_beyond_eof": (_reftable_entry(0, 1 << 40), "beyond the end"),
    "refblock_unaligned": (_reftable_entry(0, 2 * 65536 + 4096), "not cluster aligned"),
    "refblock_loop": (_reftable_entry(0, 65536), "overlaps the refcount table"),
    "refblock_duplicate": (_reftable_entry(1, 2 * 65536), "share a block"),
    "l2_on_l1": (_l1_entry(3 * 65536 | OFLAG_COPIED), "overlaps the L1 table"),
    "l2_on_refblock": (_l1_entry(2 * 65536 | OFLAG_COPIED), "refcount block"),
    "l2_beyond_eof": (_l1_entry(1 << 40 | OFLAG_COPIED), "beyond the end"),
    "header_length_short": (_u32(100, 96), "header length"),
    "header_length_odd": (_u32(100, 110), "header length"),
    "header_length_huge": (_u32(100, 1 << 30), "header length"),
    "refcount_order": (_u32(96, 7), "refcount_order"),
    "backing_name_long": (_both(_u64(8, 200), _u32(16, 1024)), "too long"),
    "backing_name_outside": (_both(_u64(8, 65530), _u32(16, 100)), "backing file"),
    "extension_overflow": (_ext(0x12345678, 1 << 31), "extension"),
    "backing_format_long": (_ext(0xE2792ACA, 40), "backing format"),
    "snapshots_beyond_eof": (_both(_u32(60, 3), _u64(64, 1 << 40)), "snapshot"),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_images_are_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "h.qcow2"
    create(str(path), 4 << 20)
    patch, message = HOSTILE[case]
    data = bytearray(path.read_bytes())
    patch(data)
    path.write_bytes(bytes(data))
    for read_only in (True, False):
        with pytest.raises(ImageError, match=message):
            Image(path, read_only=read_only)


@pytest.mark.timeout(10)
def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    path = tmp_path / "h.qcow2"
    for content in (b"", b"QFI", b"QFI\xfb", b"QFI\xfb" + bytes(60), os.urandom(70000)):
        path.write_bytes(content)
        with pytest.raises(ImageError):
            Image(path, read_only=True)


@pytest.mark.timeout(10)
def test_hostile_l2_entries_fail_io_not_the_process(tmp_path: Path) -> None:
    path = tmp_path / "h.qcow2"
    create(str(path), 4 << 20, cluster_size=4096)
    with Image(path) as node:
        node.pwrite(0, b"x" * 8192)
    data = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & L2E_OFFSET_MASK
    struct.pack_into(">Q", data, l2, 4096 + 512 | OFLAG_COPIED)  # unaligned data cluster
    struct.pack_into(">Q", data, l2 + 8, l1 | OFLAG_COPIED)  # data cluster = the L1 table
    struct.pack_into(">Q", data, l2 + 16, 1 << 61 | OFLAG_COMPRESSED)  # garbage compressed
    struct.pack_into(">Q", data, l2 + 32, 1 << 50 | OFLAG_COPIED)  # far beyond the file end
    path.write_bytes(bytes(data))
    with Image(path) as node:
        with pytest.raises(OSError):
            node.pread(0, 4096)
        with pytest.raises(OSError):
            node.pwrite(4096, b"y" * 4096)  # would overwrite the L1 table
        with pytest.raises(OSError):
            node.pread(8192, 4096)
        assert node.pread(12288, 4096) == bytes(4096)
        assert node.pread(16384, 4096) == bytes(4096)  # past the end of the file: zeroes
        with pytest.raises(OSError, match="beyond"):
            node.pwrite(16384, b"w" * 100)
    assert path.stat().st_size < 1 << 30
    assert path.read_bytes()[l1 : l1 + 8] == data[l1 : l1 + 8]


def test_v2_zero_flag_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    create(str(path), 1 << 20, cluster_size=4096, version=2)
    with Image(path) as node:
        node.pwrite(0, b"x")
    data = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & L2E_OFFSET_MASK
    struct.pack_into(">Q", data, l2 + 8, OFLAG_ZERO)
    path.write_bytes(bytes(data))
    with Image(path, read_only=True) as node, pytest.raises(OSError):
        node.pread(4096, 10)




def test_zeroes_in_an_image_whose_backing_is_not_attached_stay_zero(tmp_path: Path) -> None:
    """An image whose header names a backing file, opened without it (drive-backup
    mode=existing opens its target so), writes zero clusters for zeroes: leaving them
    unallocated would read the backing's data once the image is opened with its backing."""
    from fleece.storage import Storage

    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(base, 1 << 20)
    create(top, 1 << 20, backing_file=base, backing_format="qcow2")
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                         "file": {"driver": "file", "filename": base}})
        storage.graph.get("base").pwrite(0, b"\x77" * 65536)
        storage.execute("blockdev-del", {"node-name": "base"})
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": None,
                                         "file": {"driver": "file", "filename": top}})
        storage.graph.get("top").pwrite_zeroes(0, 65536, True)
        storage.execute("blockdev-del", {"node-name": "top"})
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "again",
                                         "read-only": True,
                                         "file": {"driver": "file", "filename": top}})
        again = storage.graph.get("again")
        assert again.backing() is not None
        assert again.pread(0, 65536) == bytes(65536)


def test_a_qcow2_node_without_file_is_refused_in_qemus_words() -> None:
    from fleece.storage import Storage

    with Storage() as storage, pytest.raises(GenericError, match=r"^Parameter 'file' is missing$"):
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "x"})
