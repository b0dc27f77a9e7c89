"""Copy-before-write planning and range locks: compiled unless ``FLEECE_NO_EXTENSIONS`` is set.

Both implementations take the bitmap of the same implementation as :mod:`fleece.bitmap` selects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fleece.bitmap import IMPLEMENTATION

if TYPE_CHECKING:
    from fleece._pure.cbw import RangeLockTable as RangeLockTable
    from fleece._pure.cbw import plan_runs as plan_runs
else:
    # The same twin as the bitmap's: the compiled planner takes compiled bitmaps only.
    _twin = importlib.import_module(f"fleece._{IMPLEMENTATION}.cbw")
    RangeLockTable = _twin.RangeLockTable
    plan_runs = _twin.plan_runs

__all__ = ["RangeLockTable", "plan_runs"]
