"""``snapshot-access``: reads the point-in-time snapshot a ``copy-before-write`` filter keeps.

Its ``file`` is the filter. Reads route cluster by cluster: copied clusters come from the
filter's target, the others from the live disk while held against guest writes. A discard
(NBD TRIM on a writable export of this node) drops clusters from the snapshot: the target's
copy goes, copy-before-write stops there, and later reads of them fail with ``EACCES``, as do
all reads once the filter broke the snapshot (on-cbw-error=break-snapshot).
"""

from __future__ import annotations

import errno
from typing import ClassVar

from fleece.block.cbw import CopyBeforeWrite
from fleece.block.driver import BlockStatus, Driver, HostMap, Options, Status
from fleece.block.node import BlockNode
from fleece.block.perm import ChildRole, Perm
from fleece.errors import GenericError


class SnapshotAccessDriver(Driver):
    name: ClassVar[str] = "snapshot-access"

    file: BlockNode
    cbw: CopyBeforeWrite

    def open(self, options: Options) -> None:
        self.file = self.node.graph.open_child(self.node, "file", options.raw("file"),
                                               ChildRole.FILTERED)
        cbw = self.file.driver.copy_before_write()
        if cbw is None:
            raise GenericError(
                f"snapshot-access: '{self.file.name}' is not a copy-before-write filter"
            )
        self.cbw = cbw
        self.node.discard_unmap = True  # a discard is how a reader gives clusters back

    def snapshot_of(self) -> CopyBeforeWrite | None:
        return self.cbw

    def host_map(self, offset: int, length: int) -> HostMap | None:
        """Copied clusters are settled in the target (nothing writes them again, and a
        discard or a broken snapshot drops the routes through the target); the others are
        the source's, for as long as they stay uncopied."""
        return self.cbw.snapshot_map(offset, length)

    def size(self) -> int:
        return self.cbw.size

    def filename(self) -> str:
        return self.file.driver.filename()

    def preadv(self, offset: int, buf: memoryview) -> None:
        self.cbw.read_snapshot(offset, buf)

    def pwritev(self, offset: int, data: memoryview) -> None:
        raise OSError(errno.EPERM, "a snapshot cannot be written")

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        raise OSError(errno.EPERM, "a snapshot cannot be written")

    def pdiscard(self, offset: int, length: int) -> None:
        self.cbw.discard_snapshot(offset, length)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        cbw = self.cbw
        # One kind of cluster per answer (copied: the target says; not: the source), and the
        # hold spans the look at ``done`` and the query below it, so a guest write cannot
        # copy a cluster and change the source between the two.
        length = cbw.uniform_length(offset, length)
        with cbw.read_guard(offset, length):
            first, end = cbw.clusters(offset, length)
            run_first, count, done = next(cbw.done.runs(first, end))
            stop = min(offset + length, (run_first + count) * cbw.cluster_size)
            node = cbw.target if done else cbw.source
            status = node.block_status_above(offset, stop - offset)
        flags = (status.flags & (Status.DATA | Status.ZERO)) | Status.ALLOCATED
        if not flags & (Status.DATA | Status.ZERO):
            flags |= Status.DATA
        return BlockStatus(offset, status.length, Status(flags), 1, None)

    def child_perm(self, role: ChildRole, read_only: bool) -> tuple[Perm, Perm]:
        return Perm.CONSISTENT_READ, Perm.all()  # it never writes the filter
