"""Hypothesis state machine for ``ClusterBitmap``: every implementation against a Python ``set``.

One machine drives, in lock step, a ``set`` of bit indices (the model) and one bitmap of EACH
implementation available in this run (pure always, compiled unless ``FLEECE_NO_EXTENSIONS``). The
size is chosen once per run, from 0 to 300 bits with a bias toward word boundaries (63, 64, 65,
127, 128, 129, ...). Rules:

- ``set_range`` / ``clear_range`` over ranges biased to start and end near word boundaries;
- out-of-range and negative-count calls raise (``IndexError`` / ``ValueError``) and change nothing;
- ``merge`` with another bitmap built (per implementation) from a second random set; the argument
  is left unchanged;
- ``copy`` then modify the copy: the original is unchanged; sometimes the copy replaces it;
- ``from_bytes(to_bytes())``: the round trip is equal and replaces the bitmap.

After every step an invariant checks, for each implementation: ``len``, ``get`` of every bit,
``count`` over the whole bitmap and over random sub-spans, ``next_set`` / ``next_clear`` from every
start, ``runs()`` over the whole bitmap (and a random sub-span) rebuilding the model exactly, and
``to_bytes()`` equal to the model's bytes, hence equal across implementations.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap

    BitmapClass = type[ClusterBitmap]

MAX_NBITS = 300
FAVOURITE_SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def model_bytes(model: set[int], nbits: int) -> bytes:
    """The expected ``to_bytes()``: bit i is bit ``i % 8`` of byte ``i // 8``."""
    value = 0
    for i in model:
        value |= 1 << i
    return value.to_bytes((nbits + 7) // 8, "little")


def near_boundaries(nbits: int) -> list[int]:
    """Positions in ``[0, nbits]`` next to 64-bit word and byte boundaries."""
    found = {0, 1, nbits - 1, nbits}
    for word in range(0, nbits + 65, 64):
        found.update((word - 1, word, word + 1, word + 7, word + 8))
    return sorted(p for p in found if 0 <= p <= nbits)


@st.composite
def spans(draw: st.DrawFn, nbits: int) -> tuple[int, int]:
    """A valid ``(start, count)`` with ``start + count <= nbits``, ends biased to boundaries."""
    near = st.sampled_from(near_boundaries(nbits))
    anywhere = st.integers(0, nbits)
    a = draw(st.one_of(near, near, anywhere))  # two thirds of the ends near a boundary
    b = draw(st.one_of(near, near, anywhere))
    start, end = min(a, b), max(a, b)
    return start, end - start


@st.composite
def bad_spans(draw: st.DrawFn, nbits: int) -> tuple[int, int, type[Exception]]:
    """An invalid ``(start, count)`` and the exception it must raise."""
    kind = draw(st.sampled_from(["negative-start", "past-end", "start-past-end", "neg-count"]))
    if kind == "negative-start":
        return draw(st.integers(-200, -1)), draw(st.integers(0, nbits + 5)), IndexError
    if kind == "past-end":
        start = draw(st.integers(0, nbits))
        return start, draw(st.integers(nbits - start + 1, nbits - start + 200)), IndexError
    if kind == "start-past-end":
        return draw(st.integers(nbits + 1, nbits + 200)), draw(st.integers(0, 5)), IndexError
    return draw(st.integers(0, nbits)), draw(st.integers(-200, -1)), ValueError


class BitmapMachine(RuleBasedStateMachine):
    """All implementations and a ``set`` model, driven by the same steps."""

    def __init__(self, impls: list[BitmapClass]) -> None:
        super().__init__()
        self.impls = impls
        self.nbits = 0
        self.model: set[int] = set()
        self.bitmaps: list[ClusterBitmap] = []
        self.rng = random.Random(0)

    # -- setup -------------------------------------------------------------------------------

    @initialize(
        nbits=st.one_of(st.sampled_from(FAVOURITE_SIZES), st.integers(0, MAX_NBITS)),
        rng=st.randoms(use_true_random=False),
    )
    def make(self, nbits: int, rng: random.Random) -> None:
        self.nbits = nbits
        self.model = set()
        self.bitmaps = [impl(nbits) for impl in self.impls]
        self.rng = rng

    # -- helpers -----------------------------------------------------------------------------

    def build_all(self, model: set[int]) -> list[ClusterBitmap]:
        """One bitmap per implementation holding exactly ``model``, made from its runs."""
        out = []
        for impl in self.impls:
            bm = impl(self.nbits)
            for i in sorted(model):
                bm.set_range(i, 1)
            out.append(bm)
        return out

    def apply(self, model: set[int], start: int, count: int, value: bool) -> None:
        bits = range(start, start + count)
        if value:
            model.update(bits)
        else:
            model.difference_update(bits)

    def span_on_all(self, data: st.DataObject, value: bool) -> None:
        """Set (``value``) or clear a random span on every bitmap and on the model."""
        start, count = data.draw(spans(self.nbits), label="span")
        for bm in self.bitmaps:
            if value:
                bm.set_range(start, count)
            else:
                bm.clear_range(start, count)
        self.apply(self.model, start, count, value)

    # -- rules -------------------------------------------------------------------------------

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        self.span_on_all(data, True)

    @rule(data=st.data())
    def clear_range(self, data: st.DataObject) -> None:
        self.span_on_all(data, False)

    @rule(data=st.data(), value=st.booleans())
    def bad_range_changes_nothing(self, data: st.DataObject, value: bool) -> None:
        start, count, error = data.draw(bad_spans(self.nbits), label="bad span")
        expected = model_bytes(self.model, self.nbits)
        for bm in self.bitmaps:
            method = bm.set_range if value else bm.clear_range
            with pytest.raises(error):
                method(start, count)
            assert bm.to_bytes() == expected

    @precondition(lambda self: self.nbits > 0)
    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        other_model = set(
            data.draw(st.lists(st.integers(0, self.nbits - 1), max_size=40), label="other bits")
        )
        for _ in range(data.draw(st.integers(0, 2), label="other runs")):
            start, count = data.draw(spans(self.nbits), label="other run")
            other_model.update(range(start, start + count))
        others = self.build_all(other_model)
        for bm, other in zip(self.bitmaps, others, strict=True):
            bm.merge(other)
            assert other.to_bytes() == model_bytes(other_model, self.nbits)
        self.model |= other_model

    @rule(data=st.data(), value=st.booleans(), adopt=st.booleans())
    def copy_then_modify(self, data: st.DataObject, value: bool, adopt: bool) -> None:
        start, count = data.draw(spans(self.nbits), label="span on copy")
        copy_model = set(self.model)
        self.apply(copy_model, start, count, value)
        before = model_bytes(self.model, self.nbits)
        after = model_bytes(copy_model, self.nbits)
        copies = []
        for impl, bm in zip(self.impls, self.bitmaps, strict=True):
            duplicate = bm.copy()
            assert type(duplicate) is impl
            assert duplicate == bm
            if value:
                duplicate.set_range(start, count)
            else:
                duplicate.clear_range(start, count)
            assert bm.to_bytes() == before, "modifying a copy changed the original"
            assert duplicate.to_bytes() == after
            assert (duplicate == bm) == (before == after)
            copies.append(duplicate)
        if adopt:
            self.bitmaps = copies
            self.model = copy_model

    @rule(kind=st.sampled_from([bytes, bytearray, memoryview]))
    def bytes_round_trip(self, kind: type[bytes | bytearray | memoryview]) -> None:
        rebuilt = []
        for impl, bm in zip(self.impls, self.bitmaps, strict=True):
            data = bm.to_bytes()
            back = impl.from_bytes(kind(data), self.nbits)
            assert type(back) is impl
            assert back == bm
            rebuilt.append(back)
        self.bitmaps = rebuilt

    # -- invariant ---------------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        nbits, model, rng = self.nbits, self.model, self.rng
        expected_get = [i in model for i in range(nbits)]
        expected_next_set = [-1] * (nbits + 1)
        expected_next_clear = [-1] * (nbits + 1)
        for i in range(nbits - 1, -1, -1):
            expected_next_set[i] = i if i in model else expected_next_set[i + 1]
            expected_next_clear[i] = expected_next_clear[i + 1] if i in model else i
        spans_to_count = [(0, nbits), (0, 0), (nbits, nbits)]
        for _ in range(8):
            a, b = rng.randint(0, nbits), rng.randint(0, nbits)
            spans_to_count.append((min(a, b), max(a, b)))
        run_span = spans_to_count[-1]
        expected_bytes = model_bytes(model, nbits)

        for bm in self.bitmaps:
            name = type(bm).__module__
            assert len(bm) == nbits, name
            assert [bm.get(i) for i in range(nbits)] == expected_get, name
            assert bm.count() == len(model), name
            for s, e in spans_to_count:
                assert bm.count(s, e) == sum(1 for i in model if s <= i < e), (name, s, e)
            for s in range(nbits + 1):
                assert bm.next_set(s) == expected_next_set[s], (name, "next_set", s)
                assert bm.next_clear(s) == expected_next_clear[s], (name, "next_clear", s)

            rebuilt: set[int] = set()
            position, previous = 0, None
            for extent in bm.runs():
                start, length, value = extent
                assert type(start) is int and type(length) is int, (name, extent)
                assert type(value) is bool, (name, extent)
                assert start == position and length > 0 and value is not previous, name
                if value:
                    rebuilt.update(range(start, start + length))
                position, previous = start + length, value
            assert position == nbits and rebuilt == model, name

            s, e = run_span
            position = s
            for start, length, value in bm.runs(s, e):
                assert start == position and length > 0, (name, s, e)
                assert all((i in model) == value for i in range(start, start + length))
                position = start + length
            assert position == e, (name, s, e)

            assert bm.to_bytes() == expected_bytes, name


# Hypothesis does not annotate this function; give it a type for mypy --strict.
_run_machine: Callable[..., None] = run_state_machine_as_test


def test_bitmap_state_machine(bitmap_impls: list[BitmapClass]) -> None:
    _run_machine(lambda: BitmapMachine(bitmap_impls), settings=SETTINGS)
