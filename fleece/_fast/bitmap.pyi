"""Type stubs for the compiled cluster bitmap (fleece/_fast/bitmap.pyx)."""

from collections.abc import Iterator
from typing import Self

class ClusterBitmap:
    """A fixed-size bitmap of ``nbits`` clusters, all clear when made.

    Raises ``ValueError`` for a negative ``nbits``.
    """

    #: native writers that found set bits here and waited for them to clear (the data
    #: plane's writes to clusters whose copy is under way)
    waits: int
    def __init__(self, nbits: int) -> None: ...
    def __len__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __repr__(self) -> str: ...
    def get(self, i: int) -> bool:
        """Bit ``i``. ``IndexError`` unless ``0 <= i < nbits``."""
    def set_range(self, start: int, count: int) -> None:
        """Set bits ``[start, start + count)``. ``ValueError`` for a negative count,
        ``IndexError`` when the range leaves ``[0, nbits]``."""
    def clear_range(self, start: int, count: int) -> None:
        """Clear bits ``[start, start + count)``; errors as :meth:`set_range`."""
    def count(self, start: int = 0, end: int | None = None) -> int:
        """Number of set bits in ``[start, end)`` (``end`` defaults to ``nbits``).
        ``IndexError`` unless ``0 <= start <= end <= nbits``."""
    def next_set(self, start: int) -> int:
        """First set bit at or after ``start``, or -1. ``IndexError`` unless
        ``0 <= start <= nbits``."""
    def next_clear(self, start: int) -> int:
        """First clear bit at or after ``start``, or -1; errors as :meth:`next_set`."""
    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(start, length, value)`` extents, in order, that exactly cover
        ``[start, end)``; adjacent extents differ in value. Errors as :meth:`count`."""
    def merge(self, other: Self) -> None:
        """OR ``other`` into this bitmap. ``ValueError`` when the sizes differ,
        ``TypeError`` when ``other`` is not a bitmap of the same implementation."""
    def copy(self) -> Self:
        """An independent bitmap with the same bits."""
    def to_bytes(self) -> bytes:
        """``ceil(nbits / 8)`` bytes; bit i is bit ``i % 8`` of byte ``i // 8``."""
    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, nbits: int) -> Self:
        """The inverse of :meth:`to_bytes`. ``ValueError`` unless ``len(data)`` is
        ``ceil(nbits / 8)``; bits at or past ``nbits`` in the last byte must be zero
        (``ValueError`` otherwise)."""
