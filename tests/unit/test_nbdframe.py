"""NBD framing: the compiled module and its pure twin agree (Hypothesis), and the selector."""

from __future__ import annotations

import importlib
import struct
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fleece.nbdframe
from fleece._impl import extensions_disabled
from fleece._pure import nbdframe as pure

pytestmark = pytest.mark.timeout(20)

NAMES = ["pure"] if extensions_disabled() else ["pure", "fast"]


def load(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"fleece._{name}.nbdframe")
    except ImportError as exc:
        pytest.fail(f"fleece._{name}.nbdframe did not import: {exc!r}", pytrace=False)


@pytest.fixture(params=NAMES)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load(request.param)


def impls() -> list[ModuleType]:
    return [load(name) for name in NAMES]


def test_selected_implementation() -> None:
    if extensions_disabled():
        assert fleece.nbdframe.IMPLEMENTATION == "pure"
        return
    fast = load("fast")
    assert fast.__file__ is not None and fast.__file__.endswith(".so")
    assert fleece.nbdframe.IMPLEMENTATION == "fast"
    assert fleece.nbdframe.parse_requests is fast.parse_requests


def header(flags: int, kind: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length)


def test_parse_stops_after_write_and_at_partial(impl: ModuleType) -> None:
    data = header(0, 0, 1, 0, 512) + header(1, 1, 2, 4096, 3) + b"abc" + header(0, 3, 3, 0, 0)
    assert impl.parse_requests(data) == ([(0, 0, 1, 0, 512), (1, 1, 2, 4096, 3)], 56)
    assert impl.parse_requests(data, 59) == ([(0, 3, 3, 0, 0)], 28)
    assert impl.parse_requests(data, 59, 86) == ([], 0)
    assert impl.parse_requests(bytearray(data), 0, 27) == ([], 0)
    with pytest.raises(IndexError):
        impl.parse_requests(data, 10, 5)
    with pytest.raises(IndexError):
        impl.parse_requests(data, 0, 1000)


def test_bad_magic(impl: ModuleType) -> None:
    good = header(0, 3, 1, 0, 0)
    bad = b"\x00" * 28
    with pytest.raises(pure.BadMagic):
        impl.parse_requests(bad + good)
    assert impl.parse_requests(good + bad) == ([(0, 3, 1, 0, 0)], 28)


def test_builders_reject_out_of_range(impl: ModuleType) -> None:
    with pytest.raises(OverflowError):
        impl.simple_reply(-1, 0)
    with pytest.raises(OverflowError):
        impl.simple_reply(0, 1 << 64)
    with pytest.raises(OverflowError):
        impl.structured_header(1 << 16, 0, 0, 0)
    with pytest.raises(OverflowError):
        impl.data_chunk_header(0, 0, 0, (1 << 32) - 4)
    with pytest.raises(OverflowError):
        impl.error_chunk(0, 0, 5, b"x" * 65536)
    with pytest.raises(OverflowError):
        impl.block_status_chunk(0, 0, 1, [(1 << 32, 0)])


u16 = st.integers(0, (1 << 16) - 1)
u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(u16, st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99]), u64, u64, u32),
             max_size=8),
    st.binary(max_size=40),
    st.integers(0, 40),
)
def test_parse_agrees(
    headers: list[tuple[int, int, int, int, int]], tail: bytes, start: int
) -> None:
    data = b"".join(header(*h) for h in headers) + tail
    start = min(start, len(data))
    results = []
    for module in impls():
        try:
            results.append(module.parse_requests(data, start))
        except pure.BadMagic:
            results.append("bad magic")
    assert all(r == results[0] for r in results)


@settings(max_examples=200, deadline=None)
@given(u16, u16, u64, u32, u64, st.binary(max_size=300),
       st.lists(st.tuples(u32, u32), max_size=20))
def test_builders_agree(
    flags: int, kind: int, cookie: int, length: int, offset: int, message: bytes,
    extents: list[tuple[int, int]],
) -> None:
    modules = impls()

    def same(build: str, *args: object) -> None:
        outs = []
        for module in modules:
            try:
                outs.append(getattr(module, build)(*args))
            except OverflowError:
                outs.append("overflow")
        assert all(o == outs[0] for o in outs), build

    same("simple_reply", length, cookie)
    same("structured_header", flags, kind, cookie, length)
    same("data_chunk_header", flags, cookie, offset, length)
    same("hole_chunk", flags, cookie, offset, length)
    same("error_chunk", flags, cookie, length, message)
    same("error_offset_chunk", flags, cookie, length, message, offset)
    same("block_status_chunk", flags, cookie, length, extents)
    chunk = pure.block_status_chunk(flags, cookie, length, extents)
    assert len(chunk) == 24 + 8 * len(extents)
