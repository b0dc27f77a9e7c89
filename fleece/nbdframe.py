"""NBD request parsing and reply framing.

The functions come from the compiled :mod:`fleece._fast.nbdframe` unless ``FLEECE_NO_EXTENSIONS``
is set or the extension did not build, in which case they are the pure twins from
:mod:`fleece._pure.nbdframe`. Both have the same names, results and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece._impl import load_twin
from fleece._pure.nbdframe import BadMagic, RequestTuple

if TYPE_CHECKING:
    from fleece._pure.nbdframe import (
        block_status_chunk,
        data_chunk_header,
        error_chunk,
        error_offset_chunk,
        hole_chunk,
        parse_requests,
        simple_reply,
        structured_header,
    )

    IMPLEMENTATION: str
else:
    _twin, IMPLEMENTATION = load_twin("nbdframe")
    block_status_chunk = _twin.block_status_chunk
    data_chunk_header = _twin.data_chunk_header
    error_chunk = _twin.error_chunk
    error_offset_chunk = _twin.error_offset_chunk
    hole_chunk = _twin.hole_chunk
    parse_requests = _twin.parse_requests
    simple_reply = _twin.simple_reply
    structured_header = _twin.structured_header

__all__ = [
    "IMPLEMENTATION",
    "BadMagic",
    "RequestTuple",
    "block_status_chunk",
    "data_chunk_header",
    "error_chunk",
    "error_offset_chunk",
    "hole_chunk",
    "parse_requests",
    "simple_reply",
    "structured_header",
]
