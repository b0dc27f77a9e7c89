"""Direct writes: a range of a node reserved for data its caller puts into a host file itself.

Copy-before-write uses them to hand the fleecing target's data write to a native thread
(:mod:`fleece.filewriter`): the node layers do their bookkeeping (a qcow2 image allocates its
clusters) when the write is reserved, in the caller's thread, and the data goes straight from
the buffer into one contiguous run of the host file.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(eq=False)
class DirectWrite:
    """A reserved write: its ``length`` bytes belong at offset ``host`` of file descriptor
    ``fd``.

    The caller writes them there (from any thread), then calls :meth:`finish` exactly once,
    saying whether the data was written. Until then the range is the caller's alone: nothing
    else may write it, and readers must wait (a qcow2 image maps its new clusters only in
    ``finish``, after their data is in place, as its crash safety asks). The node counts the
    write in flight, so it cannot close under it.

    Power loss: like any write not flushed yet, the data is not synced before ``finish`` maps
    it, so after a power loss a mapped cluster may read zeroes instead (or what the host
    cluster held before: data this image had freed); the image's metadata stays consistent
    (the refcounts and the file size the mapping depends on are synced first, see
    :mod:`fleece.block.qcow2.order`). A flush of the node after ``finish`` makes both durable.
    """

    fd: int
    host: int
    length: int
    #: the layers' completions, innermost (the file) first
    finishers: list[Callable[[bool], None]] = field(default_factory=list)

    def finish(self, written: bool) -> None:
        """Complete the write (``written``) or give it up: every layer runs its completion,
        even after one raised; the first error is raised at the end."""
        error: BaseException | None = None
        for finisher in self.finishers:
            try:
                finisher(written)
            except BaseException as exc:  # the outer layers must still let go
                error = error or exc
        self.finishers.clear()
        if error is not None:
            raise error


class Reaper(Protocol):
    """Who owns direct writes and finishes them once their data is written."""

    def reap(self) -> None:
        """Finish the direct writes whose data is written (never waits for one)."""


#: owners of direct writes in flight; a node waiting for its requests asks them to finish the
#: ones already written, since their data write is done but nobody may come by to finish them
_reapers: weakref.WeakSet[Reaper] = weakref.WeakSet()


def register_reaper(reaper: Reaper) -> None:
    _reapers.add(reaper)


def unregister_reaper(reaper: Reaper) -> None:
    _reapers.discard(reaper)


def reapers_exist() -> bool:
    return bool(_reapers)


def reap_all() -> None:
    """Let every owner finish what is written (see :meth:`fleece.block.node.BlockNode.drain`)."""
    for reaper in list(_reapers):
        reaper.reap()
