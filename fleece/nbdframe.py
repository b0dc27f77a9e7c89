"""NBD request parsing and reply framing.

The functions come from the compiled :mod:`fleece._fast.nbdframe` unless ``FLEECE_NO_EXTENSIONS``
is set or the extension did not build, in which case they are the pure twins from
:mod:`fleece._pure.nbdframe`. Both have the same names, results and errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleece._impl import extensions_disabled
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
    if extensions_disabled():
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

        IMPLEMENTATION = "pure"
    else:
        try:
            from fleece._fast.nbdframe import (
                block_status_chunk,
                data_chunk_header,
                error_chunk,
                error_offset_chunk,
                hole_chunk,
                parse_requests,
                simple_reply,
                structured_header,
            )

            IMPLEMENTATION = "fast"
        except ImportError:  # the extension did not build; tests/unit/test_nbdframe.py catches it
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

            IMPLEMENTATION = "pure"

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
