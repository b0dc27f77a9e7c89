"""The qcow2 table kernels (:mod:`fleece.block.qcow2.kernels`) against a model written here.

Both twins are tested: the pure one (:mod:`fleece._pure.qcow2meta`, numpy) always, the compiled
one (:mod:`fleece._fast.qcow2meta`, C loops) unless ``FLEECE_NO_EXTENSIONS`` disables it (when it
is wanted and does not import, its tests fail, never skip). Hypothesis draws L2 tables mixing
every kind of entry (unallocated, zero with and without a host cluster, contiguous and scattered
data, shared, compressed, unaligned), and refcount blocks of every order (1 to 64-bit counters);
each twin must give the model's runs, answers, counters and errors.
"""

from __future__ import annotations

import errno
import importlib
from array import array
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleece._impl import extensions_disabled
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
)

TWINS = ["pure"] if extensions_disabled() else ["pure", "fast"]
CS = 65536


def _twin(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"fleece._{name}.qcow2meta")
    except ImportError as exc:
        pytest.fail(f"fleece._{name}.qcow2meta did not import: {exc!r}", pytrace=False)


@pytest.fixture(scope="module", params=TWINS)
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return _twin(request.param)


# -- the model ---------------------------------------------------------------------------------
def model_runs(entries: list[int], cluster: int, v3: bool) -> list[tuple[int, int, int, int]]:
    """One entry at a time, then merged where kinds (and host clusters) follow each other."""
    if not v3 and any(e & OFLAG_ZERO and not e & OFLAG_COMPRESSED for e in entries):
        raise CorruptEntry("zero cluster flag in a version 2 image")
    runs: list[tuple[int, int, int, int]] = []
    for j, e in enumerate(entries):
        host = e & L2E_OFFSET_MASK
        if e & OFLAG_COMPRESSED:
            kind, aux = COMPRESSED, e
        elif e & OFLAG_ZERO:
            kind, aux = ZERO, 0
        elif host == 0:
            kind, aux = UNALLOC, 0
        else:
            if host % CS:
                raise CorruptEntry(f"unaligned data cluster offset {host:#x}")
            kind, aux = (NORMAL if e & OFLAG_COPIED else SHARED), host
        if runs:
            k, first, count, a = runs[-1]
            follows = kind not in (NORMAL, SHARED) or a + count * CS == aux
            if k == kind and kind != COMPRESSED and follows:
                runs[-1] = (k, first, count + 1, a)
                continue
        runs.append((kind, cluster + j, 1, aux))
    return runs


def decode(buf: bytes, order: int) -> list[int]:
    bits = 1 << order
    if order >= 3:
        w = bits // 8
        return [int.from_bytes(buf[i:i + w], "big") for i in range(0, len(buf), w)]
    return [(byte >> shift) & ((1 << bits) - 1) for byte in buf for shift in range(0, 8, bits)]


def encode(values: list[int], order: int) -> bytearray:
    bits = 1 << order
    if order >= 3:
        return bytearray(b"".join(v.to_bytes(bits // 8, "big") for v in values))
    per = 8 // bits
    out = bytearray(len(values) // per)
    for i, v in enumerate(values):
        out[i // per] |= v << (bits * (i % per))
    return out


# -- strategies --------------------------------------------------------------------------------
@st.composite
def l2_tables(draw: st.DrawFn) -> list[int]:
    """A table of runs of like entries, so that merging has something to merge."""
    entries: list[int] = []
    host = CS * draw(st.integers(1, 1000))
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["unalloc", "zero", "zero_host", "normal", "shared",
                                     "compressed", "jump", "unaligned"]))
        for _ in range(draw(st.integers(1, 9))):
            if kind == "unalloc":
                entries.append(0)
            elif kind == "zero":
                entries.append(OFLAG_ZERO)
            elif kind == "zero_host":
                entries.append(host | OFLAG_COPIED | OFLAG_ZERO)
                host += CS
            elif kind in ("normal", "shared", "jump"):
                if kind == "jump":
                    host += CS * draw(st.integers(1, 5))
                entries.append(host | (OFLAG_COPIED if kind != "shared" else 0))
                host += CS
            elif kind == "compressed":
                entries.append(OFLAG_COMPRESSED | draw(st.integers(0, (1 << 62) - 1)))
            else:
                entries.append(host + 512 * draw(st.integers(1, 127)) | OFLAG_COPIED)
    return entries


@st.composite
def refblocks(draw: st.DrawFn) -> tuple[int, list[int]]:
    order = draw(st.integers(0, 6))
    top = (1 << (1 << order)) - 1
    per = max(1, 8 >> order)
    count = per * draw(st.integers(1, 40))
    values = draw(st.lists(st.one_of(st.just(0), st.just(top), st.integers(0, top)),
                           min_size=count, max_size=count))
    return order, values


def _span(data: st.DataObject, n: int) -> tuple[int, int]:
    first = data.draw(st.integers(0, n))
    return first, data.draw(st.integers(first, n))


# -- L2 tables ---------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(entries=l2_tables(), v3=st.booleans(), data=st.data())
def test_l2_runs_match_the_model(twin: ModuleType, entries: list[int], v3: bool,
                                 data: st.DataObject) -> None:
    i0, i1 = _span(data, len(entries))
    cluster = data.draw(st.integers(0, 1 << 40))
    table = array("Q", entries)
    try:
        want: object = model_runs(entries[i0:i1], cluster, v3)
    except CorruptEntry as exc:
        want = str(exc)
    try:
        got: object = twin.l2_runs(table, i0, i1, cluster, CS, v3)
    except CorruptEntry as exc:
        got = str(exc)
    assert got == want
    assert twin.any_but_zero_flag(table, i0, i1) == any(e > 1 for e in entries[i0:i1])


def test_l2_runs_merge_contiguous_data_and_keep_compressed_apart(twin: ModuleType) -> None:
    a, b = 5 * CS, 9 * CS
    table = array("Q", [a | OFLAG_COPIED, a + CS | OFLAG_COPIED, b | OFLAG_COPIED, 0, 0,
                        OFLAG_COMPRESSED | 7, OFLAG_COMPRESSED | 7, OFLAG_ZERO, OFLAG_ZERO])
    assert twin.l2_runs(table, 0, len(table), 100, CS, True) == [
        (NORMAL, 100, 2, a), (NORMAL, 102, 1, b), (UNALLOC, 103, 2, 0),
        (COMPRESSED, 105, 1, OFLAG_COMPRESSED | 7), (COMPRESSED, 106, 1, OFLAG_COMPRESSED | 7),
        (ZERO, 107, 2, 0)]
    with pytest.raises(CorruptEntry, match="version 2"):
        twin.l2_runs(table, 0, len(table), 100, CS, False)
    assert twin.l2_runs(table, 3, 5, 0, CS, False) == [(UNALLOC, 0, 2, 0)]


# -- refcount blocks ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(block=refblocks(), delta=st.integers(-3, 3).filter(bool), data=st.data())
def test_refblock_add_is_all_or_nothing(twin: ModuleType, block: tuple[int, list[int]],
                                        delta: int, data: st.DataObject) -> None:
    order, values = block
    first, end = _span(data, len(values))
    top = (1 << (1 << order)) - 1
    buf = encode(values, order)
    before = bytes(buf)
    part = values[first:end]
    if any(v + delta > top for v in part) or abs(delta) > top:
        with pytest.raises(OSError) as caught:
            twin.refblock_add(buf, order, first, end, delta)
        assert caught.value.errno == (errno.ERANGE if delta > 0 else errno.EIO)
        assert bytes(buf) == before
    elif any(v + delta < 0 for v in part):
        with pytest.raises(OSError) as caught:
            twin.refblock_add(buf, order, first, end, delta)
        assert caught.value.errno == errno.EIO
        assert bytes(buf) == before
    else:
        twin.refblock_add(buf, order, first, end, delta)
        want = values[:first] + [v + delta for v in part] + values[end:]
        assert decode(bytes(buf), order) == want


@settings(max_examples=300, deadline=None)
@given(block=refblocks(), zero=st.booleans(), data=st.data())
def test_refblock_scans_match_the_model(twin: ModuleType, block: tuple[int, list[int]],
                                        zero: bool, data: st.DataObject) -> None:
    order, values = block
    buf = encode(values, order)
    first, end = _span(data, len(values))
    runs: list[tuple[int, int]] = []
    for i in range(first, end):
        if values[i] == 0:
            if runs and sum(runs[-1]) == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    assert twin.refblock_zero_runs(buf, order, first, end) == runs
    hits = [i for i in range(first, end) if (values[i] == 0) == zero]
    assert twin.refblock_next(buf, order, first, end, zero) == (hits[0] if hits else end)
    used = [i for i, v in enumerate(values) if v]
    assert twin.refblock_last_used(buf, order) == (used[-1] if used else -1)
