"""Benchmarks of the cluster bitmap: compiled (``fast``) against pure (``pure``) on 16 Mi bits.

16 Mi bits is a 1 TiB disk at 64 KiB clusters. One pytest-benchmark group per operation, with the
implementation as a parameter (ids ``fast`` / ``pure``) so that each group's table compares them:

- ``set_range``: a whole-bitmap range with unaligned ends (word fill), and a 16-bit range (one
  1 MiB guest write; per-call overhead);
- ``count``: set bits over the whole bitmap, half of them set at random;
- ``next_set-empty-scan``: ``next_set(0)`` on an empty bitmap, the worst case (a full scan);
- ``get``: a batch of 10 000 ``get`` calls (see :func:`test_get`);
- ``runs``: iterate every extent of a bitmap of random runs (about 32 Ki extents).

Bitmaps and inputs are made outside the timed functions. The pure twin walks words in Python, so
it runs fewer, fixed rounds (``benchmark.pedantic``); the compiled class is calibrated by
pytest-benchmark. The whole file runs in well under a minute::

    python -m pytest benchmarks --benchmark-only

With ``FLEECE_NO_EXTENSIONS=1`` only ``pure`` runs; otherwise a missing extension fails ``fast``.
"""

from __future__ import annotations

import collections
import importlib
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pytest

from fleece._impl import extensions_disabled

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap

    BitmapClass = type[ClusterBitmap]

T = TypeVar("T")

NBITS = 16 * 1024 * 1024  # 1 TiB at 64 KiB clusters
GET_BATCH = 10_000
RUN_MEAN_LENGTH = 512  # mean extent length of the runs() bitmap, in bits
IMPL_NAMES = ["pure"] if extensions_disabled() else ["fast", "pure"]

# Fixed rounds for the pure twin, per operation (its scans take a good fraction of a second).
PURE_ROUNDS = {"set_range": 200, "count": 3, "next_set": 3, "get": 20, "runs": 2}


class Benchmark(Protocol):
    """The parts of pytest-benchmark's ``benchmark`` fixture used here."""

    def __call__(self, function_to_benchmark: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def pedantic(
        self,
        target: Callable[..., T],
        args: tuple[Any, ...] = ...,
        kwargs: dict[str, Any] | None = ...,
        setup: Callable[[], Any] | None = ...,
        teardown: Callable[..., Any] | None = ...,
        rounds: int = ...,
        warmup_rounds: int = ...,
        iterations: int = ...,
    ) -> T: ...


def run(benchmark: Benchmark, impl_name: str, operation: str, function: Callable[[], T]) -> T:
    """Time ``function``: calibrated for ``fast``; ``PURE_ROUNDS[operation]`` rounds for ``pure``.

    Returns what ``function`` returned, for a correctness check outside the timing.
    """
    if impl_name == "pure":
        return benchmark.pedantic(
            function, rounds=PURE_ROUNDS[operation], iterations=1, warmup_rounds=1
        )
    return benchmark(function)


@pytest.fixture(params=IMPL_NAMES)
def impl(request: pytest.FixtureRequest) -> tuple[str, BitmapClass]:
    """``(name, ClusterBitmap class)`` per implementation; fails if ``fast`` does not import."""
    name: str = request.param
    try:
        module = importlib.import_module(f"fleece._{name}.bitmap")
    except ImportError as exc:
        pytest.fail(f"fleece._{name}.bitmap did not import: {exc!r}", pytrace=False)
    return name, cast("BitmapClass", module.ClusterBitmap)


@pytest.fixture(scope="module")
def half_random_bytes() -> bytes:
    """``to_bytes()`` of a 16 Mi-bit bitmap with each bit set with probability 1/2."""
    rng = np.random.default_rng(1)
    data: npt.NDArray[np.uint8] = rng.integers(0, 256, NBITS // 8, dtype=np.uint8)
    return data.tobytes()


@pytest.fixture(scope="module")
def random_runs_bytes() -> tuple[bytes, int]:
    """``to_bytes()`` of a 16 Mi-bit bitmap of random runs, and its number of extents."""
    rng = np.random.default_rng(2)
    draws = 2 * NBITS // RUN_MEAN_LENGTH  # twice the expected number needed: enough to cover
    lengths: npt.NDArray[np.int64] = rng.geometric(1 / RUN_MEAN_LENGTH, draws)
    ends = np.cumsum(lengths)
    extents = int(np.searchsorted(ends, NBITS)) + 1  # the last extent is cut at NBITS
    values = np.arange(len(lengths), dtype=np.uint8) & 1  # clear, set, clear, ...
    bits: npt.NDArray[np.uint8] = np.repeat(values, lengths)[:NBITS]
    return np.packbits(bits, bitorder="little").tobytes(), extents


@pytest.mark.benchmark(group="set_range")
@pytest.mark.parametrize("span", ["whole", "16-bits"])
def test_set_range(benchmark: Benchmark, impl: tuple[str, BitmapClass], span: str) -> None:
    name, cls = impl
    bm = cls(NBITS)
    if span == "whole":
        start, count = 7, NBITS - 14  # unaligned ends, every word in between
    else:
        start, count = 1_000_003, 16  # one 1 MiB write at 64 KiB clusters, across a word

    def set_range() -> None:
        bm.set_range(start, count)

    run(benchmark, name, "set_range", set_range)
    assert bm.count(start, start + count) == count


@pytest.mark.benchmark(group="count")
def test_count(
    benchmark: Benchmark, impl: tuple[str, BitmapClass], half_random_bytes: bytes
) -> None:
    name, cls = impl
    bm = cls.from_bytes(half_random_bytes, NBITS)
    expected = int(np.unpackbits(np.frombuffer(half_random_bytes, dtype=np.uint8)).sum())
    assert run(benchmark, name, "count", bm.count) == expected


@pytest.mark.benchmark(group="next_set-empty-scan")
def test_next_set_empty_scan(benchmark: Benchmark, impl: tuple[str, BitmapClass]) -> None:
    name, cls = impl
    bm = cls(NBITS)

    def scan() -> int:
        return bm.next_set(0)

    assert run(benchmark, name, "next_set", scan) == -1


@pytest.mark.benchmark(group="get")
def test_get(benchmark: Benchmark, impl: tuple[str, BitmapClass], half_random_bytes: bytes) -> None:
    """A batch of ``GET_BATCH`` (10 000) ``get`` calls at precomputed random indices.

    The reported times are per batch: the time of one ``get`` is ``mean / 10_000``, an upper
    bound that includes the Python ``for`` loop around the bound method.
    """
    name, cls = impl
    bm = cls.from_bytes(half_random_bytes, NBITS)
    rng = random.Random(3)
    indices = [rng.randrange(NBITS) for _ in range(GET_BATCH)]
    get = bm.get

    def batch() -> int:
        hits = 0
        for i in indices:
            if get(i):
                hits += 1
        return hits

    hits = run(benchmark, name, "get", batch)
    assert 0 < hits < GET_BATCH


@pytest.mark.benchmark(group="runs")
def test_runs(
    benchmark: Benchmark, impl: tuple[str, BitmapClass], random_runs_bytes: tuple[bytes, int]
) -> None:
    name, cls = impl
    data, extents = random_runs_bytes
    bm = cls.from_bytes(data, NBITS)

    def all_runs() -> int:
        tail = collections.deque(enumerate(bm.runs(), 1), maxlen=1)
        return tail[0][0] if tail else 0

    assert run(benchmark, name, "runs", all_runs) == extents
