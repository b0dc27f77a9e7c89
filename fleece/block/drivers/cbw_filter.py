"""``copy-before-write``: the filter node that keeps a point-in-time snapshot of its ``file``.

The node sits above ``file`` (the live disk) and has a ``target`` child. Every write that passes
through it first copies the old clusters of ``file`` into ``target``
(:class:`fleece.block.cbw.CopyBeforeWrite`); nothing else may write ``file`` meanwhile, so what
a write does is visible from the nodes it passes through. Opening the node inserts it: in one
drained section it computes which clusters belong to the snapshot, guards the target's reads
when the target reads through to ``file`` (the backing scheme), and moves the devices and
exports of ``file`` onto itself. Closing it (the backup job's end, or ``blockdev-del``) happens
drained too, after :meth:`fleece.block.graph.BlockGraph.remove_filter` moved them back.

Two users: ``blockdev-add`` (QEMU 6.2's fleecing scheme, read through a ``snapshot-access``
node) and the backup job, which inserts one as QEMU's backup does and shares its copied bitmap.

Options are QEMU's: ``file``, ``target``, ``bitmap`` ({node, name}: only its dirty clusters
are in the snapshot), ``on-cbw-error`` (break-guest-write | break-snapshot), ``cbw-timeout``
(seconds, with break-snapshot), ``min-cluster-size``; and fleece's ``target-size-limit`` (bytes
the target may receive, the same two policies past it), ``x-copy-ahead`` (bytes, 2 MiB by
default as for a backup job's filter: a sequential writer's copy covers that much ahead, and
more while it goes on, instead of one synchronous copy per write; 0 copies exactly the
clusters written, as QEMU does) and ``x-write-behind`` (bytes; 0 by default here).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fleece.block.cbw import COPY_AHEAD_BYTES, CbwErrorPolicy, CopyBeforeWrite
from fleece.block.dirty_bitmap import find_bitmap
from fleece.block.driver import BlockStatus, Driver, HostMap, Options
from fleece.block.node import BlockNode
from fleece.block.perm import ChildRole, Perm
from fleece.errors import GenericError

log = logging.getLogger(__name__)

MIN_CLUSTER = 64 * 1024


class CopyBeforeWriteDriver(Driver):
    name: ClassVar[str] = "copy-before-write"

    file: BlockNode
    target: BlockNode
    cbw: CopyBeforeWrite

    #: False while the users of ``file`` still sit on it (being inserted) or are going back to
    #: it (being removed): the filter then asks no write permission on ``file``
    _writes_file = False

    def open(self, options: Options) -> None:
        graph = self.node.graph
        self.file = graph.open_child(self.node, "file", options.raw("file"), ChildRole.FILTERED)
        self.target = graph.open_child(self.node, "target", options.raw("target"),
                                       ChildRole.TARGET)
        on_error = CbwErrorPolicy(options.enum(
            "on-cbw-error", tuple(policy.value for policy in CbwErrorPolicy),
            CbwErrorPolicy.BREAK_GUEST_WRITE.value))
        timeout = options.int("cbw-timeout", 0, minimum=0) or 0
        if timeout and on_error is not CbwErrorPolicy.BREAK_SNAPSHOT:
            raise GenericError("cbw-timeout works only with on-cbw-error=break-snapshot")
        min_cluster = options.int("min-cluster-size", 0, minimum=0) or 0
        if min_cluster and min_cluster & (min_cluster - 1):
            raise GenericError("min-cluster-size must be a power of two")
        limit = options.int("target-size-limit", 0, minimum=0) or 0
        copy_ahead = options.int("x-copy-ahead", COPY_AHEAD_BYTES, minimum=0) or 0
        write_behind = options.int("x-write-behind", 0, minimum=0) or 0
        bitmap = options.raw("bitmap")
        self.node.discard_unmap = True  # passed on: ``file`` decides whether it drops data
        if self.target.size < self.file.size:
            raise GenericError(
                f"Target '{self.target.name}' is smaller ({self.target.size} bytes) than the "
                f"source '{self.file.name}' ({self.file.size} bytes)"
            )
        target_cluster = self.target.driver.image_info().get("cluster-size", 0)
        cluster = max(MIN_CLUSTER, min_cluster,
                      target_cluster if isinstance(target_cluster, int) else 0)
        # Before the drained section, not in it: the copies to come should not pay for the
        # target's first allocation (a sync) in the guest's write path.
        self.target.driver.prepare_writes()
        self.cbw = CopyBeforeWrite(self.file, self.target, cluster, copy_ahead=copy_ahead,
                                   write_behind=write_behind, on_error=on_error,
                                   timeout=float(timeout), size_limit=limit)
        with graph.drained([self.file, self.target]):
            if bitmap is not None:
                self._limit_to_bitmap(bitmap)
            if self.target.backing() is self.file:
                self.cbw.guard_target()  # the target reads through to the live disk
            # Inserted above a disk in use: its guest and its exports go through the filter
            # now; then the filter takes the permissions it needs on the disk (write).
            self.file.move_roots_to(self.node)
            self._writes_file = True
            link = self.node.children["file"]
            self.file.update_user(link.user,
                                  *self.child_perm(ChildRole.FILTERED, self.node.read_only))
        log.debug("copy-before-write %r inserted above %r (target %r, cluster %d)",
                  self.node.name, self.file.name, self.target.name, cluster)

    def filtered_child(self) -> BlockNode | None:
        return self.file

    def copy_before_write(self) -> CopyBeforeWrite | None:
        return self.cbw

    def host_map(self, offset: int, length: int) -> HostMap | None:
        """Reads pass through to the source; so do writes of copied clusters (a cluster,
        once copied, stays so), which need nothing of the filter. The copied bitmap guards
        the writes, so a cluster copied after the mapping was learned takes its next write
        without Python; one being copied ahead may be waited for."""
        return HostMap(length, self.file, offset, writable=True, write_guard=self.cbw.done,
                       write_pending=self.cbw.pending, cluster=self.cbw.cluster_size)

    def stop_writing_child(self) -> None:
        """Drop the write permission on ``file`` (the filter is being removed: the users that
        moved onto it go back to ``file`` and write there themselves)."""
        self._writes_file = False
        link = self.node.children.get("file")
        if link is not None:
            link.node.update_user(link.user,
                                  *self.child_perm(ChildRole.FILTERED, self.node.read_only))

    def _limit_to_bitmap(self, ref: Any) -> None:
        """Only the bitmap's dirty clusters belong to the snapshot (QEMU's ``bitmap``)."""
        if not isinstance(ref, dict) or "name" not in ref:
            raise GenericError("Parameter 'bitmap' expects {\"node\": ..., \"name\": ...}")
        holder = self.node.graph.find(str(ref.get("node", self.file.name)))
        dirty = find_bitmap(holder, str(ref["name"])) if holder is not None else None
        if dirty is None:
            raise GenericError(f"Dirty bitmap '{ref['name']}' not found")
        cluster = self.cbw.cluster_size
        keep = self.cbw.access
        keep.clear_range(0, len(keep))
        for offset, length in dirty.dirty_runs():
            first = offset // cluster
            end = min(len(keep), -(-(offset + length) // cluster))
            keep.set_range(first, end - first)
        # What is outside the snapshot never needs a copy: done is the complement of keep.
        self.cbw.done.set_range(0, len(keep))
        for first, count, inside in keep.runs():
            if inside:
                self.cbw.done.clear_range(first, count)

    def size(self) -> int:
        return self.file.size

    def filename(self) -> str:
        return self.file.driver.filename()

    def preadv(self, offset: int, buf: memoryview) -> None:
        self.file.pread_into(offset, buf)

    # The write path: copy what the write destroys, then write.
    def pwritev(self, offset: int, data: memoryview) -> None:
        self.cbw.before_write(offset, len(data))
        self.file.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.cbw.before_write(offset, length)
        self.file.pwrite_zeroes(offset, length, may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        if self.file.discard_unmap:  # a discard the disk ignores destroys nothing
            self.cbw.before_write(offset, length)
        self.file.pdiscard(offset, length)

    def flush(self) -> None:
        """Nothing of its own: its copies are in the target, which a flush of this node makes
        durable with its other children (:meth:`BlockNode.flush`). Closing the filter leaves
        the target's flush to the target's own close, as QEMU does: a backup's end does not
        wait for everything it sent to reach the target's disk."""

    def block_status(self, offset: int, length: int) -> BlockStatus:
        status = self.file.block_status_above(offset, length)
        return BlockStatus(offset, status.length, status.flags, 1, None)

    def child_perm(self, role: ChildRole, read_only: bool) -> tuple[Perm, Perm]:
        if role & ChildRole.TARGET:
            return Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if not self._writes_file:
            return Perm.CONSISTENT_READ, Perm.all()
        # Every write to the disk must pass through the filter (as in QEMU): nobody else
        # may write or resize it while the filter is in.
        perm = Perm.CONSISTENT_READ if read_only else Perm.CONSISTENT_READ | Perm.WRITE
        return perm, Perm.all() & ~(Perm.WRITE | Perm.RESIZE)

    def image_info(self) -> dict[str, Any]:
        return {"fleecing": self.fleecing_info()}

    def fleecing_info(self) -> dict[str, Any]:
        """Fleece's report of the snapshot's cost (QEMU has none)."""
        cbw = self.cbw
        info: dict[str, Any] = {
            "target": self.target.name,
            "copied-bytes": cbw.copied_bytes,
            "cluster-size": cbw.cluster_size,
            "size-limit": cbw.size_limit,
            "broken": cbw.broken is not None,
        }
        if cbw.broken is not None:
            info["broken-reason"] = cbw.broken
        return info

    def close(self) -> None:
        if hasattr(self, "cbw"):
            self.cbw.detach()
