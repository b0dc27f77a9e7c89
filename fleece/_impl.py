"""Choose between the compiled hot paths (``fleece._fast``) and their pure twins.

``FLEECE_NO_EXTENSIONS=1`` (any non-empty value but ``0``) selects the pure-Python twins. Without
it the compiled module is used when it imports; when it does not (say the build was skipped) the
pure twin is used silently and :func:`using_extensions` tells, so that a test can fail loudly.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def extensions_disabled() -> bool:
    """Return True when the user asked for the pure-Python twins."""
    value = os.environ.get("FLEECE_NO_EXTENSIONS", "")
    return value not in ("", "0")


def load_twin(name: str) -> tuple[ModuleType, str]:
    """The module ``fleece._fast.<name>``, or its twin ``fleece._pure.<name>``, and which one
    (``"fast"`` or ``"pure"``): the pure twin when the user asked for it, or when the compiled
    module does not import (the build test then fails loudly)."""
    if not extensions_disabled():
        try:
            return importlib.import_module(f"fleece._fast.{name}"), "fast"
        except ImportError:
            pass
    return importlib.import_module(f"fleece._pure.{name}"), "pure"
