"""qcow2 table kernels in numpy: the pure twin of :mod:`fleece._fast.qcow2meta`.

The tables are ``array('Q')`` in the host's byte order (L1, L2 and refcount tables, as
:mod:`fleece.block.qcow2.format` decodes them); refcount blocks are the cluster's ``bytearray``,
big-endian counters of ``1 << order`` bits (sub-byte ones least significant first). numpy views
them without a copy. Only this twin imports numpy: a daemon running the compiled one never does.
"""

from __future__ import annotations

import errno
from array import array

import numpy as np
import numpy.typing as npt

from fleece.block.qcow2.format import (
    COMPRESSED,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SHARED,
    UNALLOC,
    ZERO,
    CorruptEntry,
    classify_entry,
)

U64 = npt.NDArray[np.uint64]
_DTYPES = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}
_SMALL_SLICE = 16  # up to this many entries, a Python loop beats numpy


def l2_runs(table: array[int], i0: int, i1: int, cluster: int, cluster_size: int,
            v3: bool) -> list[tuple[int, int, int, int]]:
    """Runs ``(kind, first cluster, count, aux)`` of entries ``[i0, i1)``, whose first is
    guest cluster ``cluster``; ``aux`` is a data run's host offset, a compressed run's entry,
    else 0. One run per compressed entry; data runs only where the host clusters follow each
    other. ``CorruptEntry`` names a bad entry: a zero flag in a version 2 image before any
    other, then the first unaligned data cluster."""
    n = i1 - i0
    runs: list[tuple[int, int, int, int]] = []
    if n <= _SMALL_SLICE:
        entries_list = table[i0:i1].tolist()
        if not v3 and any(e & OFLAG_ZERO and not e & OFLAG_COMPRESSED for e in entries_list):
            raise CorruptEntry("zero cluster flag in a version 2 image")  # before any other
        for j, entry in enumerate(entries_list):
            kind, aux = classify_entry(entry, cluster_size, v3)
            if runs:
                k, first, count, a = runs[-1]
                if k == kind and kind != COMPRESSED and (
                    kind not in (NORMAL, SHARED) or a + count * cluster_size == aux
                ):
                    runs[-1] = (k, first, count + 1, a)
                    continue
            runs.append((kind, cluster + j, 1, aux))
        return runs
    entries: U64 = np.frombuffer(table, dtype=np.uint64)[i0:i1]
    comp = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    zero = ((entries & np.uint64(OFLAG_ZERO)) != 0) & ~comp
    host = entries & np.uint64(L2E_OFFSET_MASK)
    kinds = np.full(n, UNALLOC, dtype=np.int8)
    copied = (entries & np.uint64(OFLAG_COPIED)) != 0
    data = (host != 0) & ~comp & ~zero
    kinds[data & copied] = NORMAL
    kinds[data & ~copied] = SHARED
    kinds[zero] = ZERO
    kinds[comp] = COMPRESSED
    if zero.any() and not v3:
        raise CorruptEntry("zero cluster flag in a version 2 image")
    bad = data & ((host & np.uint64(cluster_size - 1)) != 0)
    if bad.any():
        raise CorruptEntry(f"unaligned data cluster offset {int(host[bad][0]):#x}")
    brk = np.ones(n, dtype=bool)
    brk[1:] = (kinds[1:] != kinds[:-1]) | comp[1:] | (
        data[1:] & (host[1:] != host[:-1] + np.uint64(cluster_size))
    )
    starts = np.flatnonzero(brk).tolist()
    ends = [*starts[1:], n]
    kind_list = kinds[starts].tolist()
    aux = np.where(comp, entries, host)[starts].tolist()
    for s, e, k, a in zip(starts, ends, kind_list, aux, strict=True):
        runs.append((k, cluster + s, e - s, a if k in (NORMAL, SHARED, COMPRESSED) else 0))
    return runs


def any_but_zero_flag(table: array[int], i0: int, i1: int) -> bool:
    """Whether some entry of ``[i0, i1)`` has a bit set other than ``OFLAG_ZERO``."""
    return bool(np.count_nonzero(np.frombuffer(table, dtype=np.uint64)[i0:i1] >> np.uint64(1)))


def _counters(buf: bytearray, order: int) -> npt.NDArray[np.unsignedinteger]:
    """Every counter of a refcount block, as native integers (a view where it can be)."""
    if order >= 3:
        return np.frombuffer(buf, dtype=_DTYPES[order])
    raw = np.frombuffer(buf, dtype=np.uint8)
    bits = 1 << order
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    out = (raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return out.reshape(-1)


def refblock_add(buf: bytearray, order: int, first: int, end: int, delta: int) -> None:
    """Add ``delta`` to counters ``[first, end)``, or to none of them: ``OSError`` ``ERANGE``
    if one would overflow, ``EIO`` if one would go below zero (a corrupt image)."""
    maximum = (1 << (1 << order)) - 1
    values = _counters(buf, order)[first:end].astype(np.uint64)
    if delta > 0 and (delta > maximum or bool((values > np.uint64(maximum - delta)).any())):
        raise OSError(errno.ERANGE, "qcow2 refcount overflow")
    if delta < 0 and (-delta > maximum or bool((values < np.uint64(-delta)).any())):
        raise OSError(errno.EIO, "qcow2 refcount underflow: the image is corrupt")
    if order >= 3:
        part = np.frombuffer(buf, dtype=_DTYPES[order])[first:end]
        scalar = part.dtype.type(abs(delta))
        if delta > 0:
            part += scalar
        else:
            part -= scalar
        return
    bits = 1 << order
    per = 8 >> order
    mask = (1 << bits) - 1
    for i in range(first, end):
        shift = bits * (i % per)
        value = (buf[i // per] >> shift & mask) + delta
        buf[i // per] = (buf[i // per] & ~(mask << shift)) | (value << shift)


def refblock_zero_runs(buf: bytearray, order: int, first: int, end: int
                       ) -> list[tuple[int, int]]:
    """Runs ``(index, count)`` of counters equal to zero within ``[first, end)``."""
    zero = np.flatnonzero(_counters(buf, order)[first:end] == 0)
    if zero.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(zero) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [zero.size]))
    return [(first + int(zero[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def refblock_next(buf: bytearray, order: int, pos: int, end: int, zero: bool) -> int:
    """The first counter of ``[pos, end)`` that is zero (``zero``) or not; ``end`` if none."""
    part = _counters(buf, order)[pos:end]
    hits = np.flatnonzero(part == 0) if zero else np.flatnonzero(part)
    return pos + int(hits[0]) if hits.size else end


def refblock_last_used(buf: bytearray, order: int) -> int:
    """The index of the last nonzero counter, or -1."""
    used = np.flatnonzero(_counters(buf, order))
    return int(used[-1]) if used.size else -1
