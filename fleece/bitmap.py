"""The cluster bitmap: one bit per cluster, stored in numpy ``uint64`` words.

``ClusterBitmap`` is the compiled class from :mod:`fleece._fast.bitmap` unless
``FLEECE_NO_EXTENSIONS`` is set or the extension did not build, in which case it is the pure twin
from :mod:`fleece._pure.bitmap`. Both have the same names, results and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece._impl import extensions_disabled

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap as ClusterBitmap

    IMPLEMENTATION: str
else:
    if extensions_disabled():
        from fleece._pure.bitmap import ClusterBitmap

        IMPLEMENTATION = "pure"
    else:
        try:
            from fleece._fast.bitmap import ClusterBitmap

            IMPLEMENTATION = "fast"
        except ImportError:  # the extension did not build; tests/unit/test_build.py catches it
            from fleece._pure.bitmap import ClusterBitmap

            IMPLEMENTATION = "pure"

__all__ = ["IMPLEMENTATION", "ClusterBitmap"]
