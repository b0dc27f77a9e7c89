"""Block drivers, one module each, looked up by QEMU's driver name."""

from __future__ import annotations

import importlib

from fleece.block.driver import Driver

#: QEMU driver name -> (module under fleece.block.drivers, class in it)
DRIVER_MODULES = {
    "file": ("file", "FileDriver"),
    "raw": ("raw", "RawDriver"),
    "qcow2": ("qcow2", "Qcow2Driver"),
    "null-co": ("null", "NullDriver"),
    "blkdebug": ("blkdebug", "BlkdebugDriver"),
    "copy-before-write": ("cbw_filter", "CopyBeforeWriteDriver"),
    "snapshot-access": ("snapshot_access", "SnapshotAccessDriver"),
    "nbd": ("nbd", "NBDDriver"),
}


def driver_class(name: str) -> type[Driver] | None:
    """The driver class for ``name``, or None when there is no such driver."""
    entry = DRIVER_MODULES.get(name)
    if entry is None:
        return None
    module, cls = entry
    driver: type[Driver] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    return driver
