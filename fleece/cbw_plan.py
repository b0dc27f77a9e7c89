"""Copy-before-write planning and range locks: compiled unless ``FLEECE_NO_EXTENSIONS`` is set.

Both implementations take the bitmap of the same implementation as :mod:`fleece.bitmap` selects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece.bitmap import IMPLEMENTATION

if TYPE_CHECKING:
    from fleece._pure.cbw import RangeLockTable as RangeLockTable
    from fleece._pure.cbw import plan_runs as plan_runs
elif IMPLEMENTATION == "fast":
    from fleece._fast.cbw import RangeLockTable, plan_runs
else:
    from fleece._pure.cbw import RangeLockTable, plan_runs

__all__ = ["RangeLockTable", "plan_runs"]
