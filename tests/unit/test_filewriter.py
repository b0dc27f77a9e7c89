"""The background file writer: :mod:`fleece._fast.filewriter` and its twin in ``fleece._pure``.

What is tested, on each twin: writes land at their offsets in submission order (a later write
over an earlier one wins), outcomes are reaped once each, in ticket order, with the errno of a
failed write (a read-only descriptor: ``EBADF``) while later writes still succeed; ``depth``
outstanding writes refuse one more until reaped; ``wait`` returns once its write finished (and
at once for a ticket never submitted); ``close`` finishes the queue and refuses later submits;
the writer keeps a submitted buffer alive after the caller dropped it. A Hypothesis property
drives random overlapping writes, reaps and waits on both twins against a ``bytearray`` model.
The selector picks the compiled twin unless ``FLEECE_NO_EXTENSIONS`` is set.
"""

from __future__ import annotations

import errno
import gc
import importlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fleece.filewriter
from fleece._impl import extensions_disabled

pytestmark = pytest.mark.timeout(20)

IMPLS = ["pure"] if extensions_disabled() else ["fast", "pure"]


def writer_class(impl: str) -> Any:
    return importlib.import_module(f"fleece._{impl}.filewriter").FileWriter


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    yield fd, path
    os.close(fd)


def test_selector_picks_the_compiled_twin_unless_disabled() -> None:
    want = "pure" if extensions_disabled() else "fast"
    assert want == fleece.filewriter.IMPLEMENTATION
    assert fleece.filewriter.FileWriter is writer_class(want)


def test_writes_land_in_order_and_are_reaped_once(impl: str, target: tuple[int, Path]) -> None:
    fd, path = target
    writer = writer_class(impl)(8)
    try:
        tickets = [writer.submit(fd, 4 * i, bytes([65 + i]) * 4) for i in range(4)]
        tickets.append(writer.submit(fd, 2, b"zz"))  # over the first two: submitted last, wins
        assert tickets == list(range(5))
        writer.wait(tickets[-1])
        assert writer.written() == 5
        assert writer.reap() == [(t, 0) for t in tickets]
        assert writer.reap() == []
        assert writer.outstanding() == 0
    finally:
        writer.close()
    assert path.read_bytes() == b"AAzzBBBBCCCCDDDD"


def test_a_failed_write_reports_its_errno_and_the_next_still_lands(
    impl: str, target: tuple[int, Path]
) -> None:
    fd, path = target
    read_only = os.open(path, os.O_RDONLY)
    writer = writer_class(impl)()
    try:
        bad = writer.submit(read_only, 0, b"nope")
        good = writer.submit(fd, 0, b"fine")
        writer.wait(good)
        assert writer.reap() == [(bad, errno.EBADF), (good, 0)]
    finally:
        writer.close()
        os.close(read_only)
    assert path.read_bytes() == b"fine"


def test_a_full_writer_refuses_until_reaped(impl: str, target: tuple[int, Path]) -> None:
    fd, _ = target
    writer = writer_class(impl)(2)
    try:
        assert writer.depth == 2
        writer.submit(fd, 0, b"a")
        last = writer.submit(fd, 1, b"b")
        writer.wait(last)  # written, but not reaped: the slots are still taken
        with pytest.raises(RuntimeError, match="full"):
            writer.submit(fd, 2, b"c")
        assert len(writer.reap()) == 2
        writer.wait(writer.submit(fd, 2, b"c"))
    finally:
        writer.close()


def test_bad_arguments(impl: str, target: tuple[int, Path]) -> None:
    fd, _ = target
    with pytest.raises(ValueError, match="positive depth"):
        writer_class(impl)(0)
    writer = writer_class(impl)()
    try:
        with pytest.raises(ValueError, match="negative offset"):
            writer.submit(fd, -1, b"x")
        writer.wait(10**6)  # a ticket never submitted: nothing to wait for
    finally:
        writer.close()


def test_close_finishes_the_queue_and_refuses_more(impl: str, target: tuple[int, Path]) -> None:
    fd, path = target
    writer = writer_class(impl)(64)
    for i in range(64):
        writer.submit(fd, i * 1024, bytes([i]) * 1024)
    writer.close()
    assert writer.written() == 64
    assert [error for _, error in writer.reap()] == [0] * 64
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(fd, 0, b"late")
    writer.close()  # twice is harmless
    assert path.read_bytes() == b"".join(bytes([i]) * 1024 for i in range(64))


def test_the_writer_keeps_a_submitted_buffer_alive(impl: str, target: tuple[int, Path]) -> None:
    fd, path = target
    writer = writer_class(impl)()
    try:
        buf = bytearray(b"kept" * 4096)
        ticket = writer.submit(fd, 0, memoryview(buf)[4:])
        del buf
        gc.collect()
        writer.wait(ticket)
        assert writer.reap() == [(ticket, 0)]
    finally:
        writer.close()
    assert path.read_bytes() == (b"kept" * 4096)[4:]


_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 4096), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("reap"), st.just(0), st.just(b"")),
    st.tuples(st.just("wait"), st.just(0), st.just(b"")),
)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=60))
def test_random_writes_match_a_model_on_both_twins(ops: list[tuple[str, int, bytes]]) -> None:
    results = []
    for impl in IMPLS:
        model = bytearray()
        read_fd: int | None = None
        path = Path(tempfile.gettempdir()) / f"fleece-fw-{os.getpid()}-{impl}"
        write_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        writer = writer_class(impl)(16)
        reaped: list[tuple[int, int]] = []
        last = -1
        try:
            for kind, offset, data in ops:
                if kind == "write":
                    if writer.outstanding() == 16:
                        writer.wait(last)
                        reaped += writer.reap()
                    last = writer.submit(write_fd, offset, data)
                    end = offset + len(data)
                    model.extend(bytes(max(0, end - len(model))))
                    model[offset:end] = data
                elif kind == "reap":
                    reaped += writer.reap()
                elif last >= 0:
                    writer.wait(last)
            writer.close()
            reaped += writer.reap()
            assert reaped == [(t, 0) for t in range(last + 1)]
            read_fd = os.open(path, os.O_RDONLY)
            assert os.pread(read_fd, len(model) + 1, 0) == bytes(model)
            results.append(bytes(model))
        finally:
            writer.close()
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)
            path.unlink()
    assert len(set(results)) == 1
