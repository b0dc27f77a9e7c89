"""The cluster bitmap: one bit per cluster, stored in numpy ``uint64`` words.

``ClusterBitmap`` is the compiled class from :mod:`fleece._fast.bitmap` unless
``FLEECE_NO_EXTENSIONS`` is set or the extension did not build, in which case it is the pure twin
from :mod:`fleece._pure.bitmap`. Both have the same names, results and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece._impl import load_twin

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap as ClusterBitmap

    IMPLEMENTATION: str
else:
    _twin, IMPLEMENTATION = load_twin("bitmap")
    ClusterBitmap = _twin.ClusterBitmap

__all__ = ["IMPLEMENTATION", "ClusterBitmap"]
