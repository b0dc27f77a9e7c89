"""Choose between the compiled hot paths (``fleece._fast``) and their pure twins.

``FLEECE_NO_EXTENSIONS=1`` (any non-empty value but ``0``) selects the pure-Python twins. Without
it the compiled module is used when it imports; when it does not (say the build was skipped) the
pure twin is used silently and :func:`using_extensions` tells, so that a test can fail loudly.
"""

from __future__ import annotations

import os


def extensions_disabled() -> bool:
    """Return True when the user asked for the pure-Python twins."""
    value = os.environ.get("FLEECE_NO_EXTENSIONS", "")
    return value not in ("", "0")
