"""The backup job: a point-in-time copy of a source into a target.

The copy-before-write hook is attached when the job is created, inside the command, so the point
in time is the moment ``drive-backup`` / ``blockdev-backup`` returns. From then on:

* ``sync=none`` copies only what the guest overwrites, and runs until cancelled: with a target
  whose backing is the source, the target *is* the snapshot (image fleecing).
* ``sync=full`` also copies every other cluster, skipping ranges that read as zeroes.
* ``sync=top`` copies only the clusters the source's top layer allocates; the target's own
  backing provides the rest.
"""

from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING, Any, ClassVar

from fleece.block.cbw import COPY_AHEAD_BYTES, CopyBeforeWrite, CopyReadError
from fleece.block.node import BlockNode
from fleece.block.perm import Perm
from fleece.jobs.job import Job

if TYPE_CHECKING:
    from fleece.storage import Storage

#: how many bytes the job plans and copies between two checkpoints
CHUNK_BYTES = 16 << 20


class BackupJob(Job):
    kind: ClassVar[str] = "backup"

    def __init__(
        self,
        storage: Storage,
        job_id: str,
        source: BlockNode,
        target: BlockNode,
        *,
        sync: str,
        cluster_size: int,
        target_is_fresh: bool,
        copy_ahead: int = COPY_AHEAD_BYTES,
        **options: Any,
    ) -> None:
        super().__init__(storage, job_id, **options)
        self.source = source
        self.target = target
        self.sync = sync
        self.target_is_fresh = target_is_fresh
        with self.guarded_setup():
            self.use_node(source, Perm.CONSISTENT_READ, Perm.all())
            self.use_node(target, Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
            self.cbw = CopyBeforeWrite(source, target, cluster_size, copy_ahead=copy_ahead)
            self.cbw.on_copy.append(self.progress)
            self.len = source.size
            if sync == "top":
                self._skip_unallocated_in_top()
            self.cbw.attach()

    def _skip_unallocated_in_top(self) -> None:
        """For sync=top, clusters the top layer does not allocate are not the job's to copy."""
        cluster = self.cbw.cluster_size
        for status in self.source.extents(0, self.source.size, above=False):
            if status.allocated:
                continue
            first = -(-status.offset // cluster)
            end = (status.offset + status.length) // cluster
            if status.offset + status.length == self.source.size:
                end = self.cbw.nclusters
            if first < end:
                self.cbw.done.set_range(first, end - first)
        skipped = self.cbw.done.count() * cluster
        self.offset = min(self.len, skipped)

    @property
    def copied_clusters(self) -> int:
        return self.cbw.copied_clusters

    def run(self) -> None:
        if self.sync == "none":
            while True:  # the hook does the work until someone cancels
                self.checkpoint()
                self.sleep(3600)
        cluster = self.cbw.cluster_size
        first = 0
        while first < self.cbw.nclusters:
            chunk = self.chunk_bytes(CHUNK_BYTES, cluster) // cluster
            end = min(self.cbw.nclusters, first + chunk)
            self.checkpoint()
            copied = self._copy_chunk(first, end)
            self.throttle(copied)
            first = end

    def _copy_chunk(self, first: int, end: int) -> int:
        """Copy the clusters of ``[first, end)`` not done yet, skipping those reading as zero."""
        # A fresh target without backing already reads zeroes where nothing was written.
        reads_zero = self.target_is_fresh and self.target.backing() is None
        self.progress(self.cbw.skip_zeroes(first, end, target_reads_zero=reads_zero))
        if self.cbw.all_done(first, end):
            return 0
        return self._copy_with_policy(first, end)

    def _copy_with_policy(self, first: int, end: int) -> int:
        while True:
            try:
                return self.cbw.copy_clusters(first, end)
            except OSError as exc:
                operation = "read" if isinstance(exc, CopyReadError) else "write"
                if self.handle_error(exc, operation) == "ignore":
                    # QEMU's "ignore": count the range as handled and go on
                    skipped = self.cbw.done.count(first, end)
                    self.cbw.mark_done(first, end - first)
                    self.progress((end - first - skipped) * self.cbw.cluster_size)
                    return 0

    def clean(self) -> None:
        self.cbw.detach()
        with suppress(OSError):  # the target's errors were reported while copying
            self.target.flush()
