"""Sizes as qemu-img writes them: ``512``, ``64k``, ``64M``, ``1G``, ``1.5T`` (powers of 1024)."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``; ``ValueError`` naming the text when it is not a size."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional suffix "
                         "k, M, G, T, P or E")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[suffix.lower()]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """``1.5 GiB`` style, for reports."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
