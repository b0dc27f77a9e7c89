"""Pure-Python twin of :mod:`fleece._fast.bitmap`.

It is the oracle the compiled class is tested against and the fallback when
``FLEECE_NO_EXTENSIONS=1``: same names, same results, same errors. It favours obvious code over
speed: scans walk the words one by one in Python.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Self

import numpy as np
import numpy.typing as npt

_ALL = (1 << 64) - 1


def _check_nbits(nbits: int) -> int:
    nbits = operator.index(nbits)
    if nbits < 0:
        raise ValueError(f"bitmap size must not be negative, got {nbits}")
    return nbits


class ClusterBitmap:
    """A fixed-size bitmap of ``nbits`` clusters, all clear when made."""

    __slots__ = ("_nbits", "_words")

    #: native writers that waited for set bits here to clear; none without the data plane
    waits = 0

    def __init__(self, nbits: int) -> None:
        self._nbits = _check_nbits(nbits)
        self._words: npt.NDArray[np.uint64] = np.zeros((self._nbits + 63) // 64, dtype=np.uint64)

    # -- argument checks, shared by every method -------------------------------------------
    def _check_index(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < self._nbits:
            raise IndexError(f"bit {i} out of range for a bitmap of {self._nbits} bits")
        return i

    def _check_start(self, start: int) -> int:
        start = operator.index(start)
        if not 0 <= start <= self._nbits:
            raise IndexError(f"start {start} out of range for a bitmap of {self._nbits} bits")
        return start

    def _check_span(self, start: int, end: int | None) -> tuple[int, int]:
        start = self._check_start(start)
        end = self._nbits if end is None else operator.index(end)
        if not start <= end <= self._nbits:
            raise IndexError(
                f"end {end} out of range [{start}, {self._nbits}] for a bitmap of "
                f"{self._nbits} bits"
            )
        return start, end

    def _check_range(self, start: int, count: int) -> tuple[int, int]:
        count = operator.index(count)
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        start = self._check_start(start)
        if start + count > self._nbits:
            raise IndexError(
                f"range [{start}, {start + count}) out of range for a bitmap of "
                f"{self._nbits} bits"
            )
        return start, start + count

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._nbits

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterBitmap):
            return NotImplemented
        return self._nbits == other._nbits and bool(np.array_equal(self._words, other._words))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ClusterBitmap(nbits={self._nbits}, set={self.count()})"

    def get(self, i: int) -> bool:
        i = self._check_index(i)
        return bool((int(self._words[i >> 6]) >> (i & 63)) & 1)

    def count(self, start: int = 0, end: int | None = None) -> int:
        start, end = self._check_span(start, end)
        total = 0
        for word_index, mask in _word_masks(start, end):
            total += (int(self._words[word_index]) & mask).bit_count()
        return total

    def next_set(self, start: int) -> int:
        return self._next(self._check_start(start), invert=False)

    def next_clear(self, start: int) -> int:
        return self._next(self._check_start(start), invert=True)

    def _next(self, start: int, invert: bool) -> int:
        for word_index, mask in _word_masks(start, self._nbits):
            word = int(self._words[word_index])
            if invert:
                word = ~word & _ALL
            word &= mask
            if word:
                return word_index * 64 + (word & -word).bit_length() - 1
        return -1

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        start, end = self._check_span(start, end)
        return self._runs(start, end)

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        pos = start
        while pos < end:
            value = self.get(pos)
            nxt = self._next(pos, invert=value)
            stop = end if nxt == -1 or nxt > end else nxt
            yield pos, stop - pos, value
            pos = stop

    # -- updates -----------------------------------------------------------------------------
    def set_range(self, start: int, count: int) -> None:
        self._assign(*self._check_range(start, count), value=True)

    def clear_range(self, start: int, count: int) -> None:
        self._assign(*self._check_range(start, count), value=False)

    def _assign(self, start: int, end: int, value: bool) -> None:
        # Whole words in the middle by one slice; the partial words at either end by mask.
        first_whole = (start + 63) // 64
        last_whole = end // 64
        if first_whole < last_whole:
            self._words[first_whole:last_whole] = _ALL if value else 0
            edges = [(start, first_whole * 64), (last_whole * 64, end)]
        else:
            edges = [(start, end)]
        for lo, hi in edges:
            for word_index, mask in _word_masks(lo, hi):
                word = int(self._words[word_index])
                word = word | mask if value else word & ~mask & _ALL
                self._words[word_index] = np.uint64(word)

    def merge(self, other: Self) -> None:
        if not isinstance(other, ClusterBitmap):
            raise TypeError(f"cannot merge {type(other).__name__} into a pure ClusterBitmap")
        if other._nbits != self._nbits:
            raise ValueError(
                f"cannot merge a bitmap of {other._nbits} bits into one of {self._nbits} bits"
            )
        np.bitwise_or(self._words, other._words, out=self._words)

    def copy(self) -> Self:
        clone = type(self)(self._nbits)
        clone._words[:] = self._words
        return clone

    # -- serialisation -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return self._words.astype("<u8").tobytes()[: (self._nbits + 7) // 8]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, nbits: int) -> Self:
        nbits = _check_nbits(nbits)
        raw = memoryview(data).tobytes()
        expected = (nbits + 7) // 8
        if len(raw) != expected:
            raise ValueError(f"{len(raw)} bytes given, {expected} needed for {nbits} bits")
        if nbits % 8 and raw[-1] >> (nbits % 8):
            raise ValueError(f"bits set at or past bit {nbits} in the last byte")
        bitmap = cls(nbits)
        padded = raw + bytes(len(bitmap._words) * 8 - len(raw))
        bitmap._words[:] = np.frombuffer(padded, dtype="<u8")
        return bitmap


def _word_masks(start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield ``(word_index, mask)`` for the bits ``[start, end)``, word by word."""
    pos = start
    while pos < end:
        word_index = pos >> 6
        lo = pos & 63
        hi = min(end - word_index * 64, 64)
        yield word_index, ((1 << hi) - 1) ^ ((1 << lo) - 1)
        pos = word_index * 64 + hi
