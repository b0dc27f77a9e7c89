"""The error tree. Every error a command can raise knows its QMP error class.

QEMU answers almost everything with ``GenericError``; ``CommandNotFound`` and ``DeviceNotFound``
are the two other classes its clients still look at.
"""

from __future__ import annotations


class FleeceError(Exception):
    """Base of every error fleece raises on purpose."""


class QMPError(FleeceError):
    """An error a QMP command reports: ``{"error": {"class": qmp_class, "desc": str(self)}}``."""

    qmp_class = "GenericError"

    @property
    def desc(self) -> str:
        return str(self)


class GenericError(QMPError):
    """Bad arguments, a busy node, an illegal job verb, an I/O failure in a command."""

    qmp_class = "GenericError"


class CommandNotFound(QMPError):
    """The command does not exist (or is not allowed before capabilities negotiation)."""

    qmp_class = "CommandNotFound"


class DeviceNotFound(QMPError):
    """A device, node, job or export named in the arguments does not exist."""

    qmp_class = "DeviceNotFound"


class DeviceNotActive(QMPError):
    """A block job named in the arguments does not exist (QEMU's class for block-job-*)."""

    qmp_class = "DeviceNotActive"


class ImageError(GenericError):
    """An image fleece will not open: corrupt, hostile, or using a feature it lacks."""
