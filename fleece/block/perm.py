"""Permissions and roles of the links between a node and its users.

Invariant: for every node, each user's ``perm`` is a subset of every other user's ``shared``.
A link or a user that would break it is refused when it is made, naming the user it conflicts
with. The bit values are QEMU's (``BLK_PERM_*``), because the file driver turns them into
QEMU-compatible byte-range locks at ``100 + bit`` and ``200 + bit``.
"""

from __future__ import annotations

import enum


class Perm(enum.IntFlag):
    """What a user does with a node (``perm``) or lets others do (``shared``)."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08

    @classmethod
    def all(cls) -> Perm:
        return cls.CONSISTENT_READ | cls.WRITE | cls.WRITE_UNCHANGED | cls.RESIZE

    def describe(self) -> str:
        """QEMU's spelling: ``consistent read, write``."""
        names = {
            Perm.CONSISTENT_READ: "consistent read",
            Perm.WRITE: "write",
            Perm.WRITE_UNCHANGED: "write unchanged",
            Perm.RESIZE: "resize",
        }
        return ", ".join(text for bit, text in names.items() if bit & self) or "none"


#: No permission at all (the monitor's reference, a parent that only keeps a node alive)
NO_PERM = Perm(0)



class ChildRole(enum.IntFlag):
    """Why a node is a child of another. A child has exactly one primary role."""

    FILE = 0x01  # the protocol layer under a format (qcow2 -> file)
    BACKING = 0x02  # the lower layer of a copy-on-write chain
    TARGET = 0x04  # where a copy-before-write filter puts old data
    FILTERED = 0x08  # the node a filter passes I/O to (blkdebug image, cbw file)

    def describe(self) -> str:
        return (self.name or "child").lower()
