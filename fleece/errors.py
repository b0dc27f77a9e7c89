"""The error tree. Every error a command can raise knows its QMP error class.

QEMU answers almost everything with ``GenericError``; ``CommandNotFound`` and ``DeviceNotFound``
are the two other classes its clients still look at.
"""

from __future__ import annotations

import re


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


class NodeNotFound(DeviceNotFound, GenericError):
    """A device-or-node lookup that failed ("Cannot find device='x' nor node-name='x'").

    QEMU answers these ``GenericError`` (only ``block-commit``'s ``device`` answers
    ``DeviceNotFound``); to Python callers it is both.
    """

    qmp_class = "GenericError"


class DeviceNotActive(QMPError):
    """A block job named in the arguments does not exist (QEMU's class for block-job-*)."""

    qmp_class = "DeviceNotActive"


class ImageError(GenericError):
    """An image fleece will not open: corrupt, hostile, or using a feature it lacks."""


#: QEMU's QAPI input visitor names a nested member by its path ("file.filename"); these are the
#: messages where it does (an enum's "does not accept value" names the member alone)
_PATH_MESSAGES = re.compile(
    r"^(Parameter '|Invalid parameter type for '|Parameters ')([^']*)('.*)$", re.DOTALL)


def in_member(exc: QMPError, member: str) -> QMPError:
    """``exc`` as raised for options nested under ``member``: the parameter it names gets
    ``member.`` in front, as QEMU's visitor spells the path. Other errors come back as they
    are."""
    match = _PATH_MESSAGES.match(exc.desc)
    if match is None or match.group(3).startswith("' does not accept value"):
        return exc
    nested = type(exc)(f"{match.group(1)}{member}.{match.group(2)}{match.group(3)}")
    nested.__cause__ = exc.__cause__
    return nested
