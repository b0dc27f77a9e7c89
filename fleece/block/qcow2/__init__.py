"""The qcow2 image format: header parsing and validation, refcounts, and image creation.

The block driver itself is :mod:`fleece.block.drivers.qcow2`; :func:`create` makes new images.
"""

from __future__ import annotations

from fleece.block.qcow2.create import create

__all__ = ["create"]
