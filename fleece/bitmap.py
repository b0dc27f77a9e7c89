"""The cluster bitmap: one bit per cluster, stored in ``uint64`` words.

``ClusterBitmap`` is the compiled class from :mod:`fleece._fast.bitmap` unless
``FLEECE_NO_EXTENSIONS`` is set or the extension did not build, in which case it is the pure twin
from :mod:`fleece._pure.bitmap`. Both have the same names, results and errors.

The pure twin keeps its words in numpy (about 15 MiB of a daemon's memory), the compiled one in
an ``array('Q')``. The twin is loaded when one of these names is first asked for, not when this
module is imported: a daemon that never tracks clusters never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleece._impl import load_twin

if TYPE_CHECKING:
    from fleece._pure.bitmap import ClusterBitmap as ClusterBitmap

    IMPLEMENTATION: str
else:

    def __getattr__(name: str) -> Any:
        if name not in ("ClusterBitmap", "IMPLEMENTATION"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        twin, implementation = load_twin("bitmap")
        globals().update(ClusterBitmap=twin.ClusterBitmap, IMPLEMENTATION=implementation)
        return globals()[name]


__all__ = ["IMPLEMENTATION", "ClusterBitmap"]
