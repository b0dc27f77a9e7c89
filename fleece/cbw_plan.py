"""Copy-before-write planning and range locks: compiled unless ``FLEECE_NO_EXTENSIONS`` is set.

Both implementations take the bitmap of the same implementation as :mod:`fleece.bitmap` selects,
and, like it, are loaded when one of their names is first asked for (the compiled twin imports
the bitmap's).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fleece import bitmap

if TYPE_CHECKING:
    from fleece._pure.cbw import RangeLockTable as RangeLockTable
    from fleece._pure.cbw import plan_runs as plan_runs
else:

    def __getattr__(name: str) -> Any:
        if name not in ("RangeLockTable", "plan_runs"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        # The same twin as the bitmap's: the compiled planner takes compiled bitmaps only.
        twin = importlib.import_module(f"fleece._{bitmap.IMPLEMENTATION}.cbw")
        globals().update(RangeLockTable=twin.RangeLockTable, plan_runs=twin.plan_runs)
        return globals()[name]


__all__ = ["RangeLockTable", "plan_runs"]
