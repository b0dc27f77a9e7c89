"""Example-based tests of ``ClusterBitmap``, run on every available implementation.

What is tested, against a Python ``set`` of bit indices as the oracle:

- construction: the empty bitmap (``nbits == 0``), sizes that are not a multiple of 64 or 8,
  ``len``, negative sizes;
- 64-bit word boundaries: single bits and ranges around bits 63, 64, 65, 127, 128, 129 in
  bitmaps of 63 to 200 bits, ranges crossing one or several words, full and empty ranges;
- ``get``, ``set_range``, ``clear_range``, ``count``, ``next_set``, ``next_clear`` and ``runs``
  (extents in order, exactly covering the asked span, adjacent extents differing);
- every error in ``fleece/_fast/bitmap.pyi``: the exception type, the offending value named in
  the message, and a failed call leaving the bitmap unchanged;
- ``merge`` (OR, size mismatch, a bitmap of the other implementation or a non-bitmap);
- ``to_bytes`` layout (bit i is bit ``i % 8`` of byte ``i // 8``), ``from_bytes`` round trip,
  wrong lengths and stray bits past ``nbits``;
- ``copy`` independence, equality;
- a 16 Mi-bit bitmap (1 TiB at 64 KiB clusters): ranges, counts and scans over whole words.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap

    BitmapClass = type[ClusterBitmap]

# Sizes around the 64-bit word boundaries, and sizes that are not a multiple of 64 or of 8.
BOUNDARY_SIZES = [63, 64, 65, 127, 128, 129, 191, 192, 193]
ODD_SIZES = [1, 3, 7, 9, 13, 70, 100, 131, 200]
SMALL_SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000]

# Ranges (start, count) that start, end or cross 64-bit words; filtered per size.
BOUNDARY_RANGES = [
    (0, 1),
    (0, 63),
    (0, 64),
    (0, 65),
    (1, 62),
    (1, 63),
    (1, 64),
    (62, 2),
    (63, 1),
    (63, 2),
    (64, 1),
    (64, 64),
    (60, 10),
    (63, 66),
    (65, 62),
    (65, 63),
    (65, 64),
    (120, 10),
    (127, 2),
    (127, 3),
    (128, 1),
    (1, 127),
    (1, 128),
    (3, 190),
    (7, 9),
    (5, 0),
    (64, 0),
]

# Big enough that a value is unlikely to appear by chance in an error message.
BIG = 1000


def boundary_positions(nbits: int) -> list[int]:
    """Positions in ``[0, nbits]`` next to byte and word boundaries, and the two ends."""
    found = {nbits - 1, nbits}
    for base in (0, 8, 56, 64, 120, 128, 192, 256):
        found.update((base - 1, base, base + 1))
    return sorted(p for p in found if 0 <= p <= nbits)


def model_bytes(model: Iterable[int], nbits: int) -> bytes:
    """The expected ``to_bytes()``: bit i is bit ``i % 8`` of byte ``i // 8``."""
    value = 0
    for i in model:
        value |= 1 << i
    return value.to_bytes((nbits + 7) // 8, "little")


def model_runs(model: set[int], start: int, end: int) -> list[tuple[int, int, bool]]:
    """The expected ``runs(start, end)``: maximal extents of equal bits."""
    out: list[tuple[int, int, bool]] = []
    for i in range(start, end):
        value = i in model
        if out and out[-1][2] == value:
            s, n, v = out[-1]
            out[-1] = (s, n + 1, v)
        else:
            out.append((i, 1, value))
    return out


def build(cls: BitmapClass, nbits: int, model: Iterable[int]) -> ClusterBitmap:
    """A bitmap of ``nbits`` with exactly the bits of ``model`` set, made bit by bit."""
    bm = cls(nbits)
    for i in model:
        bm.set_range(i, 1)
    return bm


def random_model(rng: random.Random, nbits: int) -> set[int]:
    """A random set of bits made of a few random runs, so that runs cross words."""
    model: set[int] = set()
    for _ in range(rng.randrange(8)):
        start = rng.randrange(nbits + 1)
        model.update(range(start, min(nbits, start + rng.randrange(1, 140))))
    return model


def assert_matches(bm: ClusterBitmap, nbits: int, model: set[int]) -> None:
    """Check every query of ``bm`` against ``model`` (a small bitmap: work is O(nbits))."""
    assert len(bm) == nbits
    assert [bm.get(i) for i in range(nbits)] == [i in model for i in range(nbits)]
    assert bm.count() == len(model)
    for s in range(nbits + 1):
        expect_set = min((i for i in model if i >= s), default=-1)
        expect_clear = next((i for i in range(s, nbits) if i not in model), -1)
        assert bm.next_set(s) == expect_set, f"next_set({s})"
        assert bm.next_clear(s) == expect_clear, f"next_clear({s})"
        assert bm.count(s) == sum(1 for i in model if i >= s), f"count({s})"
        assert bm.count(0, s) == sum(1 for i in model if i < s), f"count(0, {s})"
    positions = boundary_positions(nbits)
    for s, e in itertools.combinations_with_replacement(positions, 2):
        assert bm.count(s, e) == sum(1 for i in model if s <= i < e), f"count({s}, {e})"
        assert list(bm.runs(s, e)) == model_runs(model, s, e), f"runs({s}, {e})"
    assert list(bm.runs()) == model_runs(model, 0, nbits)
    assert bm.to_bytes() == model_bytes(model, nbits)


def assert_mentions(exc: pytest.ExceptionInfo[BaseException], *values: int) -> None:
    """The error message names at least one of ``values`` (the offending value)."""
    message = str(exc.value)
    assert any(str(v) in message for v in values), (
        f"{exc.typename} message {message!r} names none of {values}"
    )


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", SMALL_SIZES + ODD_SIZES)
def test_new_bitmap_is_clear(bitmap_impl: BitmapClass, nbits: int) -> None:
    bm = bitmap_impl(nbits)
    assert len(bm) == nbits
    assert bm.count() == 0
    assert bm.next_set(0) == -1
    assert bm.next_clear(0) == (0 if nbits else -1)
    assert list(bm.runs()) == ([(0, nbits, False)] if nbits else [])
    assert bm.to_bytes() == bytes((nbits + 7) // 8)
    assert not any(bm.get(i) for i in range(nbits))


def test_a_large_clear_bitmap_costs_no_memory_until_bits_are_set(
        bitmap_impl: BitmapClass) -> None:
    """A 1 TiB disk's copied, access and pending bitmaps are 2 MiB each at 64 KiB clusters:
    their zero pages stay unmapped until a bit in them is set (calloc, or numpy's zeros).
    Measured in a fresh interpreter: in this one, memory that earlier tests freed may be
    handed out again already resident, and the set bits would grow nothing."""
    probe = f"""
from pathlib import Path
from {bitmap_impl.__module__} import {bitmap_impl.__name__} as Bitmap

def rss_mib():
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024

before = rss_mib()
bitmaps = [Bitmap(1 << 27) for _ in range(4)]  # 4 x 16 MiB of words
grown = rss_mib() - before
bitmaps[0].set_range(0, 1 << 27)  # every page of one written: 16 MiB
print(grown, rss_mib() - before, bitmaps[1].count())
"""
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout.split()
    grown, after_set, count = float(out[0]), float(out[1]), int(out[2])
    assert grown < 8 and after_set > 12, (grown, after_set)
    assert count == 0


def test_empty_bitmap(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(0)
    assert len(bm) == 0
    assert bm.count() == 0
    assert bm.count(0, 0) == 0
    assert bm.next_set(0) == -1
    assert bm.next_clear(0) == -1
    assert list(bm.runs()) == []
    assert list(bm.runs(0, 0)) == []
    assert bm.to_bytes() == b""
    bm.set_range(0, 0)
    bm.clear_range(0, 0)
    assert bm.count() == 0
    with pytest.raises(IndexError) as exc:
        bm.get(0)
    assert_mentions(exc, 0)
    with pytest.raises(IndexError):
        bm.set_range(0, 1)
    with pytest.raises(IndexError):
        bm.next_set(1)
    other = bitmap_impl(0)
    bm.merge(other)
    assert bm == other
    assert bm.copy() == bm
    assert bitmap_impl.from_bytes(b"", 0) == bm
    assert isinstance(repr(bm), str)


@pytest.mark.parametrize("nbits", [-1, -64, -BIG])
def test_negative_nbits(bitmap_impl: BitmapClass, nbits: int) -> None:
    with pytest.raises(ValueError) as exc:
        bitmap_impl(nbits)
    assert_mentions(exc, nbits)


@pytest.mark.parametrize("nbits", [0, 1, 8, 64, 65, 16 * 1024 * 1024])
def test_len(bitmap_impl: BitmapClass, nbits: int) -> None:
    assert len(bitmap_impl(nbits)) == nbits


def test_repr_is_a_string(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(129)
    bm.set_range(60, 10)
    assert isinstance(repr(bm), str)
    assert repr(bm)


def test_result_types(bitmap_impl: BitmapClass) -> None:
    """Results are plain Python objects (``bool``, ``int``, ``bytes``), not numpy scalars."""
    bm = bitmap_impl(130)
    bm.set_range(60, 10)
    assert type(bm.get(60)) is bool and type(bm.get(0)) is bool
    assert type(len(bm)) is int
    assert type(bm.count()) is int and type(bm.count(61, 65)) is int
    assert type(bm.next_set(0)) is int and type(bm.next_set(100)) is int
    assert type(bm.next_clear(60)) is int
    for extent in bm.runs():
        assert type(extent) is tuple and len(extent) == 3
        assert [type(x) for x in extent] == [int, int, bool]
    assert type(bm.to_bytes()) is bytes
    assert type(bm == bm.copy()) is bool


# -- word and byte boundaries ----------------------------------------------------------------


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_single_bits(bitmap_impl: BitmapClass, nbits: int) -> None:
    for i in boundary_positions(nbits):
        if i == nbits:
            continue
        bm = bitmap_impl(nbits)
        bm.set_range(i, 1)
        assert bm.get(i)
        assert bm.count() == 1
        assert bm.count(i, i + 1) == 1
        assert bm.count(0, i) == 0
        assert bm.count(i + 1) == 0
        assert bm.next_set(0) == i
        assert bm.next_set(i) == i
        assert bm.next_set(i + 1) == -1
        assert bm.next_clear(i) == (i + 1 if i + 1 < nbits else -1)
        assert bm.next_clear(0) == (0 if i else (1 if nbits > 1 else -1))
        assert list(bm.runs()) == model_runs({i}, 0, nbits)
        assert bm.to_bytes() == model_bytes({i}, nbits)
        bm.clear_range(i, 1)
        assert bm == bitmap_impl(nbits)


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_set_ranges_across_words(bitmap_impl: BitmapClass, nbits: int) -> None:
    for start, count in BOUNDARY_RANGES:
        if start + count > nbits:
            continue
        bm = bitmap_impl(nbits)
        bm.set_range(start, count)
        assert_matches(bm, nbits, set(range(start, start + count)))


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_clear_ranges_across_words(bitmap_impl: BitmapClass, nbits: int) -> None:
    for start, count in BOUNDARY_RANGES:
        if start + count > nbits:
            continue
        bm = bitmap_impl(nbits)
        bm.set_range(0, nbits)
        bm.clear_range(start, count)
        assert_matches(bm, nbits, set(range(nbits)) - set(range(start, start + count)))


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_full_range(bitmap_impl: BitmapClass, nbits: int) -> None:
    bm = bitmap_impl(nbits)
    bm.set_range(0, nbits)
    assert bm.count() == nbits
    assert bm.next_clear(0) == -1
    assert bm.next_set(0) == 0
    assert list(bm.runs()) == [(0, nbits, True)]
    data = bm.to_bytes()
    assert data[:-1] == b"\xff" * (len(data) - 1)
    assert data[-1] == (0xFF if nbits % 8 == 0 else (1 << (nbits % 8)) - 1)
    bm.clear_range(0, nbits)
    assert bm == bitmap_impl(nbits)
    assert bm.next_set(0) == -1


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_mixed_operations_against_set(bitmap_impl: BitmapClass, nbits: int) -> None:
    rng = random.Random(nbits)
    bm = bitmap_impl(nbits)
    model: set[int] = set()
    for _ in range(12):
        start = rng.choice(boundary_positions(nbits))
        count = rng.randrange(nbits - start + 1)
        if rng.random() < 0.6:
            bm.set_range(start, count)
            model.update(range(start, start + count))
        else:
            bm.clear_range(start, count)
            model.difference_update(range(start, start + count))
    assert_matches(bm, nbits, model)


def test_set_range_is_idempotent_and_overlapping(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(200)
    bm.set_range(10, 100)
    bm.set_range(10, 100)
    bm.set_range(50, 100)
    assert_matches(bm, 200, set(range(10, 150)))
    bm.clear_range(60, 10)
    bm.clear_range(60, 10)
    assert_matches(bm, 200, set(range(10, 150)) - set(range(60, 70)))


# -- count, next_set, next_clear, runs -------------------------------------------------------


def test_count_subranges(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(200)
    bm.set_range(60, 10)  # 60..69 across the first word boundary
    bm.set_range(127, 3)  # 127..129 across the second
    assert bm.count() == 13
    assert bm.count(0, 64) == 4
    assert bm.count(64, 128) == 7
    assert bm.count(128) == 2
    assert bm.count(64, 64) == 0
    assert bm.count(200) == 0
    assert bm.count(200, 200) == 0
    assert bm.count(start=65) == 8
    assert bm.count(end=65) == 5
    assert bm.count(61, 129) == 11


def test_next_set_and_next_clear(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(200)
    bm.set_range(64, 64)  # exactly the second word
    bm.set_range(199, 1)  # the last bit
    assert bm.next_set(0) == 64
    assert bm.next_set(64) == 64
    assert bm.next_set(100) == 100
    assert bm.next_set(128) == 199
    assert bm.next_set(199) == 199
    assert bm.next_set(200) == -1
    assert bm.next_clear(0) == 0
    assert bm.next_clear(64) == 128
    assert bm.next_clear(127) == 128
    assert bm.next_clear(199) == -1
    assert bm.next_clear(200) == -1


def test_next_clear_on_full_words(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(1000)
    bm.set_range(0, 1000)
    assert bm.next_clear(0) == -1
    bm.clear_range(777, 1)
    assert bm.next_clear(0) == 777
    assert bm.next_clear(777) == 777
    assert bm.next_clear(778) == -1
    assert bm.next_set(777) == 778


def test_runs_cover_exactly(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(200)
    bm.set_range(3, 7)  # 3..9
    bm.set_range(60, 10)  # 60..69
    bm.set_range(128, 1)
    bm.set_range(199, 1)
    assert list(bm.runs()) == [
        (0, 3, False),
        (3, 7, True),
        (10, 50, False),
        (60, 10, True),
        (70, 58, False),
        (128, 1, True),
        (129, 70, False),
        (199, 1, True),
    ]
    # A sub-span is cut at its ends, even inside an extent.
    assert list(bm.runs(5, 65)) == [(5, 5, True), (10, 50, False), (60, 5, True)]
    assert list(bm.runs(61, 62)) == [(61, 1, True)]
    assert list(bm.runs(64, 128)) == [(64, 6, True), (70, 58, False)]
    assert list(bm.runs(150)) == [(150, 49, False), (199, 1, True)]
    assert list(bm.runs(end=4)) == [(0, 3, False), (3, 1, True)]
    assert list(bm.runs(start=128, end=129)) == [(128, 1, True)]
    assert list(bm.runs(100, 100)) == []
    assert list(bm.runs(200)) == []
    assert list(bm.runs(200, 200)) == []


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_runs_properties(bitmap_impl: BitmapClass, nbits: int) -> None:
    rng = random.Random(1000 + nbits)
    for _ in range(5):
        model = random_model(rng, nbits)
        bm = build(bitmap_impl, nbits, model)
        for s, e in itertools.combinations_with_replacement(boundary_positions(nbits), 2):
            extents = list(bm.runs(s, e))
            position = s
            for index, (start, length, value) in enumerate(extents):
                assert start == position and length > 0
                assert all((i in model) == value for i in range(start, start + length))
                if index:
                    assert value != extents[index - 1][2]
                position += length
            assert position == e


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", [1, 64, 65, BIG])
def test_get_out_of_range(bitmap_impl: BitmapClass, nbits: int) -> None:
    bm = bitmap_impl(nbits)
    for i in (-1, -BIG - 7, nbits, nbits + 1, nbits + BIG + 3):
        with pytest.raises(IndexError) as exc:
            bm.get(i)
        assert_mentions(exc, i)


@pytest.mark.parametrize("method", ["set_range", "clear_range"])
def test_negative_count(bitmap_impl: BitmapClass, method: str) -> None:
    bm = bitmap_impl(BIG)
    bm.set_range(0, 10)
    before = bm.to_bytes()
    for start, count in ((5, -1), (500, -7), (BIG, -13)):
        with pytest.raises(ValueError) as exc:
            getattr(bm, method)(start, count)
        assert_mentions(exc, count)
        assert bm.to_bytes() == before


@pytest.mark.parametrize("method", ["set_range", "clear_range"])
@pytest.mark.parametrize(
    ("start", "count", "offending"),
    [
        (-3, 5, (-3,)),
        (-1, 0, (-1,)),
        (-BIG - 7, BIG + 17, (-BIG - 7,)),
        (BIG - 5, 17, (BIG + 12, 17)),  # the end (or the count) overshoots
        (0, BIG + 1, (BIG + 1,)),
        (BIG + 1, 0, (BIG + 1,)),
        (BIG + 23, 5, (BIG + 23, BIG + 28)),
    ],
)
def test_range_out_of_bounds(
    bitmap_impl: BitmapClass, method: str, start: int, count: int, offending: tuple[int, ...]
) -> None:
    bm = bitmap_impl(BIG)
    if method == "clear_range":
        bm.set_range(0, BIG)
    before = bm.to_bytes()
    with pytest.raises(IndexError) as exc:
        getattr(bm, method)(start, count)
    assert_mentions(exc, *offending)
    assert bm.to_bytes() == before, "a failed call changed the bitmap"


def test_range_up_to_the_end_is_allowed(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(BIG)
    bm.set_range(BIG - 5, 5)
    bm.set_range(BIG, 0)
    assert bm.count() == 5
    bm.clear_range(BIG - 1, 1)
    bm.clear_range(BIG, 0)
    assert bm.count() == 4


@pytest.mark.parametrize("method", ["count", "runs"])
@pytest.mark.parametrize(
    ("start", "end", "offending"),
    [
        (-1, None, (-1,)),
        (-7, 10, (-7,)),
        (0, BIG + 1, (BIG + 1,)),
        (17, BIG + 9, (BIG + 9,)),
        (BIG + 3, None, (BIG + 3,)),
        (BIG + 3, BIG + 3, (BIG + 3,)),
        (503, 501, (503, 501)),  # start after end
        (10, -1, (-1, 10)),
    ],
)
def test_span_out_of_bounds(
    bitmap_impl: BitmapClass, method: str, start: int, end: int | None, offending: tuple[int, ...]
) -> None:
    bm = bitmap_impl(BIG)
    bm.set_range(100, 600)
    with pytest.raises(IndexError) as exc:
        if method == "count":
            bm.count(start, end)
        else:
            list(bm.runs(start, end))
    assert_mentions(exc, *offending)


@pytest.mark.parametrize("method", ["next_set", "next_clear"])
def test_next_out_of_range(bitmap_impl: BitmapClass, method: str) -> None:
    bm = bitmap_impl(BIG)
    for start in (-1, -BIG - 11, BIG + 1, BIG + 37):
        with pytest.raises(IndexError) as exc:
            getattr(bm, method)(start)
        assert_mentions(exc, start)
    assert getattr(bm, method)(BIG) == -1


@pytest.mark.parametrize("huge", [2**63, 2**64 + 5, -(2**63) - 1, -(2**64) - 5])
def test_huge_values_out_of_range(bitmap_impl: BitmapClass, huge: int) -> None:
    """Values past the machine word are out of range like any other (not ``OverflowError``)."""
    bm = bitmap_impl(BIG)
    calls: list[Callable[[], object]] = [
        lambda: bm.get(huge),
        lambda: bm.next_set(huge),
        lambda: bm.next_clear(huge),
        lambda: bm.count(huge),
        lambda: bm.count(0, huge),
        lambda: list(bm.runs(huge)),
        lambda: list(bm.runs(0, huge)),
        lambda: bm.set_range(huge, 1),
        lambda: bm.clear_range(huge, 0),
    ]
    for call in calls:
        with pytest.raises(IndexError) as exc:
            call()
        assert_mentions(exc, huge)
    # A huge count overshoots the end; a huge negative count is negative.
    with pytest.raises(IndexError if huge > 0 else ValueError) as count_exc:
        bm.set_range(0, huge)
    assert_mentions(count_exc, huge)
    assert bm.count() == 0


def test_numpy_integers_accepted(bitmap_impl: BitmapClass) -> None:
    """Any integer with ``__index__`` works as an index, as numpy's do."""

    def np_int(value: int, dtype: type[np.integer[Any]] = np.int64) -> Any:
        return dtype(value)

    bm = bitmap_impl(np_int(130))
    bm.set_range(np_int(60), np_int(10, np.uint64))
    assert bm.get(np_int(60, np.int32)) and not bm.get(np_int(70))
    assert bm.count(np_int(0), np_int(65)) == 5
    assert bm.next_set(np_int(0, np.uint8)) == 60
    assert bm.next_clear(np_int(60)) == 70
    assert list(bm.runs(np_int(59), np_int(61))) == [(59, 1, False), (60, 1, True)]


@pytest.mark.parametrize("bad", [1.0, 1.5, "3", b"3", None])
def test_non_integer_arguments_rejected(bitmap_impl: BitmapClass, bad: Any) -> None:
    """Floats, strings and ``None`` are not indices: ``TypeError``, as for a Python list."""
    bm = bitmap_impl(130)
    calls: list[Callable[[], object]] = [
        lambda: bm.get(bad),
        lambda: bm.set_range(bad, 1),
        lambda: bm.set_range(0, bad),
        lambda: bm.clear_range(bad, 1),
        lambda: bm.next_set(bad),
        lambda: bm.next_clear(bad),
        lambda: bitmap_impl(bad),
    ]
    if bad is not None:  # None is the documented default of ``end``
        calls += [
            lambda: bm.count(bad),
            lambda: bm.count(0, bad),
            lambda: list(bm.runs(bad)),
            lambda: list(bm.runs(0, bad)),
        ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    assert bm.count() == 0


# -- merge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", BOUNDARY_SIZES + ODD_SIZES)
def test_merge_is_or(bitmap_impl: BitmapClass, nbits: int) -> None:
    rng = random.Random(2000 + nbits)
    for _ in range(4):
        a_model = random_model(rng, nbits)
        b_model = random_model(rng, nbits)
        a = build(bitmap_impl, nbits, a_model)
        b = build(bitmap_impl, nbits, b_model)
        a.merge(b)
        assert_matches(a, nbits, a_model | b_model)
        assert b.to_bytes() == model_bytes(b_model, nbits), "merge changed its argument"


def test_merge_self(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(130)
    bm.set_range(60, 10)
    bm.merge(bm)
    assert_matches(bm, 130, set(range(60, 70)))


@pytest.mark.parametrize(("ours", "theirs"), [(100, 129), (64, 65), (0, 1), (BIG, 0)])
def test_merge_size_mismatch(bitmap_impl: BitmapClass, ours: int, theirs: int) -> None:
    bm = bitmap_impl(ours)
    other = bitmap_impl(theirs)
    other.set_range(0, theirs)
    with pytest.raises(ValueError) as exc:
        bm.merge(other)
    assert_mentions(exc, ours, theirs)
    assert bm.count() == 0


class _LooksLikeABitmap:
    """Has the bitmap's methods and size but is not a ``ClusterBitmap``."""

    def __len__(self) -> int:
        return 64

    def to_bytes(self) -> bytes:
        return b"\xff" * 8


@pytest.mark.parametrize("other", [None, 5, b"\xff" * 8, bytearray(8), _LooksLikeABitmap()])
def test_merge_non_bitmap(bitmap_impl: BitmapClass, other: object) -> None:
    bm = bitmap_impl(64)
    with pytest.raises(TypeError):
        bm.merge(other)  # type: ignore[arg-type]
    assert bm.count() == 0


def test_merge_other_implementation() -> None:
    """Both twins, whichever this run selects: the compiled one is built for every run."""
    from fleece._fast.bitmap import ClusterBitmap as Fast
    from fleece._pure.bitmap import ClusterBitmap as Pure

    impls: list[Any] = [Fast, Pure]
    for ours, theirs in itertools.permutations(impls, 2):
        bm = ours(64)
        other = theirs(64)
        other.set_range(0, 64)
        with pytest.raises(TypeError):
            bm.merge(other)
        assert bm.count() == 0


# -- to_bytes / from_bytes -------------------------------------------------------------------


def test_to_bytes_layout(bitmap_impl: BitmapClass) -> None:
    bm = bitmap_impl(20)
    bm.set_range(0, 1)
    bm.set_range(9, 1)
    bm.set_range(19, 1)
    assert bm.to_bytes() == bytes([0b0000_0001, 0b0000_0010, 0b0000_1000])
    bm = bitmap_impl(130)
    bm.set_range(63, 2)  # bit 63 -> byte 7 bit 7, bit 64 -> byte 8 bit 0
    bm.set_range(129, 1)  # byte 16 bit 1
    expected = bytearray(17)
    expected[7] = 0x80
    expected[8] = 0x01
    expected[16] = 0x02
    assert bm.to_bytes() == bytes(expected)
    assert isinstance(bm.to_bytes(), bytes)


def test_to_bytes_length(bitmap_impl: BitmapClass) -> None:
    for nbits in range(0, 140):
        assert len(bitmap_impl(nbits).to_bytes()) == (nbits + 7) // 8


@pytest.mark.parametrize("nbits", SMALL_SIZES + ODD_SIZES + BOUNDARY_SIZES)
def test_bytes_round_trip(bitmap_impl: BitmapClass, nbits: int) -> None:
    rng = random.Random(3000 + nbits)
    for _ in range(5):
        model = random_model(rng, nbits) if nbits else set()
        bm = build(bitmap_impl, nbits, model)
        data = bm.to_bytes()
        assert data == model_bytes(model, nbits)
        for buffer in (data, bytearray(data), memoryview(data)):
            back = bitmap_impl.from_bytes(buffer, nbits)
            assert type(back) is bitmap_impl
            assert back == bm
            assert len(back) == nbits
            assert back.to_bytes() == data
        assert_matches(bitmap_impl.from_bytes(data, nbits), nbits, model)


def test_from_bytes_all_valid_bits(bitmap_impl: BitmapClass) -> None:
    assert bitmap_impl.from_bytes(b"\xff\xff\x0f", 20).count() == 20
    assert bitmap_impl.from_bytes(b"\xff" * 8, 64).count() == 64
    assert bitmap_impl.from_bytes(b"\xff" * 8 + b"\x01", 65).count() == 65
    assert bitmap_impl.from_bytes(b"\x01", 1).get(0)


def test_from_bytes_owns_its_bits(bitmap_impl: BitmapClass) -> None:
    """The result is writable and does not share memory with the caller's buffer."""
    from_bytes = bitmap_impl.from_bytes(bytes(16), 128)
    from_bytes.set_range(0, 128)
    assert from_bytes.count() == 128
    buffer = bytearray(16)
    bm = bitmap_impl.from_bytes(buffer, 128)
    buffer[:] = b"\xff" * 16
    assert bm.count() == 0
    bm.set_range(0, 8)
    assert buffer == b"\xff" * 16
    view = memoryview(bytearray(b"\x0f" * 16))
    bm = bitmap_impl.from_bytes(view, 128)
    view[0] = 0
    assert bm.count() == 64


@pytest.mark.parametrize(
    ("nbits", "length"),
    [(20, 2), (20, 4), (0, 1), (1, 0), (1, 2), (64, 7), (64, 9), (65, 8), (BIG, 126), (BIG, 124)],
)
def test_from_bytes_wrong_length(bitmap_impl: BitmapClass, nbits: int, length: int) -> None:
    with pytest.raises(ValueError) as exc:
        bitmap_impl.from_bytes(bytes(length), nbits)
    assert_mentions(exc, length)


@pytest.mark.parametrize(
    ("nbits", "data"),
    [
        (1, b"\x02"),
        (1, b"\x80"),
        (7, b"\x80"),
        (20, b"\x00\x00\x10"),  # bit 20
        (20, b"\xff\xff\x1f"),
        (20, b"\x00\x00\x80"),  # bit 23
        (65, b"\x00" * 8 + b"\x02"),  # bit 65
        (129, b"\xff" * 16 + b"\xff"),
    ],
)
def test_from_bytes_stray_bits(bitmap_impl: BitmapClass, nbits: int, data: bytes) -> None:
    with pytest.raises(ValueError):
        bitmap_impl.from_bytes(data, nbits)


@pytest.mark.parametrize("data", [5, 0, None, "abc", [0, 0, 0, 0, 0]])
def test_from_bytes_rejects_non_buffers(bitmap_impl: BitmapClass, data: object) -> None:
    """``data`` must be a bytes-like buffer; an int is not a length, a list is not bytes."""
    with pytest.raises(TypeError):
        bitmap_impl.from_bytes(data, 40)  # type: ignore[arg-type]


def test_from_bytes_negative_nbits(bitmap_impl: BitmapClass) -> None:
    with pytest.raises(ValueError):
        bitmap_impl.from_bytes(b"", -8)


# -- copy, equality --------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", [0, 1, 64, 65, 129, 200])
def test_copy_is_independent(bitmap_impl: BitmapClass, nbits: int) -> None:
    original = bitmap_impl(nbits)
    if nbits:
        original.set_range(0, nbits // 2)
    model = set(range(nbits // 2))
    duplicate = original.copy()
    assert type(duplicate) is bitmap_impl
    assert duplicate == original
    assert duplicate is not original
    if nbits:
        duplicate.set_range(nbits - 1, 1)
        duplicate.clear_range(0, 1)
        assert original.to_bytes() == model_bytes(model, nbits)
        original.clear_range(0, nbits)
        assert duplicate.to_bytes() == model_bytes((model | {nbits - 1}) - {0}, nbits)
        assert original.count() == 0


def test_equality(bitmap_impl: BitmapClass) -> None:
    a = bitmap_impl(130)
    b = bitmap_impl(130)
    assert a == b
    # Spelled with != on purpose: it exercises __ne__.
    assert not a != b  # noqa: SIM202
    a.set_range(64, 1)
    assert a != b
    b.set_range(64, 1)
    assert a == b
    a.set_range(129, 1)
    assert a != b
    a.clear_range(129, 1)
    assert a == b
    assert a == a
    # Same bits (none), different sizes.
    assert bitmap_impl(64) != bitmap_impl(65)
    assert bitmap_impl(0) != bitmap_impl(1)
    assert bitmap_impl(8) != bitmap_impl(16)
    assert bitmap_impl(0) == bitmap_impl(0)


@pytest.mark.parametrize("other", [None, 0, b"", b"\x00" * 8, "bitmap", [False] * 64])
def test_equality_with_non_bitmap(bitmap_impl: BitmapClass, other: object) -> None:
    bm = bitmap_impl(64)
    assert (bm == other) is False
    assert (bm != other) is True


# -- a 16 Mi-bit bitmap (1 TiB of 64 KiB clusters) -------------------------------------------


def test_large_bitmap(bitmap_impl: BitmapClass) -> None:
    nbits = 16 * 1024 * 1024
    start, end = 4097, nbits - 33
    bm = bitmap_impl(nbits)
    assert bm.next_set(0) == -1
    assert bm.count() == 0
    bm.set_range(start, end - start)
    assert bm.count() == end - start
    assert bm.count(0, start) == 0
    assert bm.count(start, start + 64) == 64
    assert bm.count(end) == 0
    assert bm.count(start - 1, end + 1) == end - start
    assert bm.next_set(0) == start
    assert bm.next_set(end) == -1
    assert bm.next_clear(0) == 0
    assert bm.next_clear(start) == end
    assert not bm.get(start - 1) and bm.get(start) and bm.get(end - 1) and not bm.get(end)
    assert list(bm.runs()) == [
        (0, start, False),
        (start, end - start, True),
        (end, nbits - end, False),
    ]

    middle = nbits // 2 + 5
    bm.clear_range(middle, 1)
    bm.set_range(nbits - 1, 1)
    assert bm.count() == end - start
    assert bm.next_clear(start) == middle
    assert bm.next_set(end) == nbits - 1
    assert bm.next_clear(end) == end
    assert len(list(bm.runs())) == 6

    data = bm.to_bytes()
    assert len(data) == nbits // 8
    assert bitmap_impl.from_bytes(data, nbits) == bm

    bm.clear_range(0, nbits)
    assert bm.count() == 0
    assert bm.next_set(0) == -1
    assert bm.next_clear(0) == 0
