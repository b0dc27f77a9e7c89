"""A background writer of buffers into files: compiled unless ``FLEECE_NO_EXTENSIONS`` is set.

Copy-before-write hands it the old data bound for the fleecing target (see
:mod:`fleece.block.cbw`). Both twins have the same names, results and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece._impl import load_twin

if TYPE_CHECKING:
    from fleece._pure.filewriter import FileWriter as FileWriter

    IMPLEMENTATION: str
else:
    _twin, IMPLEMENTATION = load_twin("filewriter")
    FileWriter = _twin.FileWriter

__all__ = ["IMPLEMENTATION", "FileWriter"]
