"""Every public method and property of ``Storage`` and ``Device`` defined in
``fleece/storage.py`` and ``fleece/block/device.py`` has a docstring (what it promises and
raises); the command mixins' methods are checked where they are defined."""

from __future__ import annotations

import inspect

import pytest

from fleece.block.device import Device
from fleece.storage import Storage


@pytest.mark.parametrize("cls", [Storage, Device], ids=lambda cls: cls.__name__)
def test_public_methods_have_docstrings(cls: type) -> None:
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__enter__", "__del__"):
            continue
        function = member.fget if isinstance(member, property) else member
        if not inspect.isfunction(function):
            continue
        if not (function.__doc__ or "").strip():
            missing.append(name)
    assert missing == []


def test_every_public_method_of_storage_has_a_docstring_whichever_group_defines_it() -> None:
    """The command groups mixed into ``Storage`` (jobs, exports, bitmaps, transactions) are
    part of its public API too."""
    missing = [name for name, function in inspect.getmembers(Storage, inspect.isfunction)
               if not name.startswith("_") and not (function.__doc__ or "").strip()]
    assert missing == []
