"""The compiled extension was built and is the one in use; ``FLEECE_NO_EXTENSIONS`` selects pure.

:mod:`fleece.bitmap` silently falls back to the pure twin when :mod:`fleece._fast.bitmap` does not
import. These tests turn that silence into a failure: unless ``FLEECE_NO_EXTENSIONS`` disables the
extensions, the selector must report ``"fast"`` and ``fleece._fast.bitmap`` must import as a
compiled extension module (a ``.so``), not as Python source. With the variable set, the selector
must report ``"pure"``. Also tested: how the variable is read, and that setting it in a fresh
interpreter selects the pure twin even where the extension is built.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fleece.bitmap
from fleece._impl import extensions_disabled


def test_selected_implementation() -> None:
    if extensions_disabled():
        pure = importlib.import_module("fleece._pure.bitmap")
        assert fleece.bitmap.IMPLEMENTATION == "pure"
        assert fleece.bitmap.ClusterBitmap is pure.ClusterBitmap
        return
    module = importlib.import_module("fleece._fast.bitmap")  # an ImportError fails the test
    path = module.__file__
    assert path is not None
    assert path.endswith(".so"), f"fleece._fast.bitmap is {path}, not a compiled extension"
    assert path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert fleece.bitmap.IMPLEMENTATION == "fast", (
        "fleece.bitmap fell back to the pure twin: the extension did not build or import"
    )
    assert fleece.bitmap.ClusterBitmap is module.ClusterBitmap


@pytest.mark.parametrize(
    ("value", "disabled"),
    [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)],
)
def test_extensions_disabled_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, disabled: bool
) -> None:
    if value is None:
        monkeypatch.delenv("FLEECE_NO_EXTENSIONS", raising=False)
    else:
        monkeypatch.setenv("FLEECE_NO_EXTENSIONS", value)
    assert extensions_disabled() is disabled


def test_environment_variable_selects_pure_in_a_fresh_interpreter() -> None:
    code = "import fleece.bitmap as b; print(b.IMPLEMENTATION, b.ClusterBitmap.__module__)"
    env = {**os.environ, "FLEECE_NO_EXTENSIONS": "1"}
    root = Path(fleece.__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["pure", "fleece._pure.bitmap"]
