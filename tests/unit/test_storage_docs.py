"""Every public method and property of ``Storage`` and ``Device`` defined in
``fleece/storage.py`` and ``fleece/block/device.py`` has a docstring (what it promises and
raises); the command mixins' methods are checked where they are defined."""

from __future__ import annotations

import inspect

import pytest

from fleece.bitmaps.commands import BitmapCommands
from fleece.block.device import Device
from fleece.jobs.commands import JobCommands
from fleece.nbd.commands import ExportCommands
from fleece.storage import Storage
from fleece.transaction import TransactionCommands


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


@pytest.mark.parametrize(
    "group", [JobCommands, ExportCommands, BitmapCommands, TransactionCommands],
    ids=lambda cls: cls.__name__)
def test_every_public_method_of_the_command_groups_has_a_docstring(group: type) -> None:
    """The command groups ``Storage`` owns (jobs, exports, bitmaps, transactions) are part of
    its public API too."""
    missing = [name for name, function in inspect.getmembers(group, inspect.isfunction)
               if not name.startswith("_") and not (function.__doc__ or "").strip()]
    assert missing == []
