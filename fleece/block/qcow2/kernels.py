"""The scans over qcow2 tables that must be fast: compiled unless ``FLEECE_NO_EXTENSIONS`` is set.

The compiled twin (:mod:`fleece._fast.qcow2meta`) loops in C; the pure one
(:mod:`fleece._pure.qcow2meta`) uses numpy, which only it imports: numpy costs a daemon about
15 MiB, the difference between issue 14's memory target held and missed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece._impl import load_twin

if TYPE_CHECKING:
    from fleece._pure.qcow2meta import (
        any_but_zero_flag,
        l2_runs,
        refblock_add,
        refblock_last_used,
        refblock_next,
        refblock_zero_runs,
    )

    IMPLEMENTATION: str
else:
    _twin, IMPLEMENTATION = load_twin("qcow2meta")
    any_but_zero_flag = _twin.any_but_zero_flag
    l2_runs = _twin.l2_runs
    refblock_add = _twin.refblock_add
    refblock_last_used = _twin.refblock_last_used
    refblock_next = _twin.refblock_next
    refblock_zero_runs = _twin.refblock_zero_runs

__all__ = ["IMPLEMENTATION", "any_but_zero_flag", "l2_runs", "refblock_add",
           "refblock_last_used", "refblock_next", "refblock_zero_runs"]
