"""The backup job: a point-in-time copy of a source into a target.

The copy-before-write hook is attached when the job is created, inside the command, so the point
in time is the moment ``drive-backup`` / ``blockdev-backup`` returns. From then on:

* ``sync=none`` copies only what the guest overwrites, and runs until cancelled: with a target
  whose backing is the source, the target *is* the snapshot (image fleecing).
* ``sync=full`` also copies every other cluster, skipping ranges that read as zeroes.
* ``sync=top`` copies only the clusters the source's top layer allocates; the target's own
  backing provides the rest.
* ``sync=bitmap`` (and ``incremental``, its ``on-success`` form) copies exactly the clusters a
  dirty bitmap marks. A job given a bitmap *freezes* it at its start (a successor records the
  writes from then on) and, as ``bitmap-mode`` says, ends the freeze: ``on-success`` keeps only
  the successor's bits if the job succeeded, everything otherwise; ``never`` keeps everything;
  ``always`` keeps the successor's bits plus, on failure, the clusters left uncopied.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, ClassVar

from fleece.block.cbw import COPY_AHEAD_BYTES, CopyBeforeWrite, CopyReadError, CopyWriteError
from fleece.block.dirty_bitmap import DirtyBitmap
from fleece.block.node import BlockNode
from fleece.block.perm import Perm
from fleece.jobs.job import Job, JobHost

#: how many bytes the job plans and copies between two checkpoints
CHUNK_BYTES = 16 << 20


class BackupJob(Job):
    kind: ClassVar[str] = "backup"

    def __init__(
        self,
        storage: JobHost,
        job_id: str,
        source: BlockNode,
        target: BlockNode,
        *,
        sync: str,
        cluster_size: int,
        target_is_fresh: bool,
        copy_ahead: int = COPY_AHEAD_BYTES,
        write_behind: int = 0,
        sync_bitmap: DirtyBitmap | None = None,
        bitmap_mode: str = "on-success",
        target_size_limit: int = 0,
        on_cbw_error: str = "break-guest-write",
        **options: Any,
    ) -> None:
        super().__init__(storage, job_id, **options)
        self.source = source
        self.target = target
        self.sync = sync
        self.target_is_fresh = target_is_fresh
        self.sync_bitmap = sync_bitmap
        self.bitmap_mode = bitmap_mode
        with self.guarded_setup():
            self.use_node(source, Perm.CONSISTENT_READ, Perm.all())
            self.use_node(target, Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
            self.cbw = CopyBeforeWrite(source, target, cluster_size, copy_ahead=copy_ahead,
                                       write_behind=write_behind, size_limit=target_size_limit,
                                       on_error=on_cbw_error)
            self.cbw.on_copy.append(self.progress)
            self.cbw.on_late_failure.append(self._hook_broke)
            self._hook_failure: OSError | None = None
            target.extra_info["fleecing"] = self.fleecing_info
            self.len = source.size
            if sync_bitmap is not None:
                sync_bitmap.freeze()
            try:
                if sync == "top":
                    self._skip_unallocated_in_top()
                elif sync == "bitmap":
                    assert sync_bitmap is not None
                    self._skip_clean(sync_bitmap)
                self.cbw.attach()
            except BaseException:
                if sync_bitmap is not None:
                    sync_bitmap.reclaim()
                raise

    def _skip_clean(self, bitmap: DirtyBitmap) -> None:
        """For sync=bitmap, the clusters the (frozen) bitmap does not mark are not the job's."""
        cluster = self.cbw.cluster_size
        done = self.cbw.done
        done.set_range(0, len(done))
        for offset, length in bitmap.dirty_runs():
            first, end = self.cbw.clusters(offset, length)
            done.clear_range(first, end - first)
        self.offset = min(self.len, done.count() * cluster)

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

    def fleecing_info(self) -> dict[str, Any]:
        """The bytes copied into the target so far, and its limit (a fleece extension)."""
        info: dict[str, Any] = {
            "source": self.source.name,
            "copied-bytes": self.cbw.copied_bytes,
            "size-limit": self.cbw.size_limit,
            "broken": self.cbw.broken is not None,
        }
        if self.cbw.broken is not None:
            info["broken-reason"] = self.cbw.broken
        return info

    def block_info(self) -> dict[str, Any]:
        info = super().block_info()
        info["fleecing"] = self.fleecing_info()
        return info

    @property
    def copied_clusters(self) -> int:
        return self.cbw.copied_clusters

    def _hook_broke(self, exc: OSError) -> None:
        """A write-behind copy failed after its guest write went on: the snapshot broke. The
        job learns of it as a target write error, in its own thread (see :meth:`run`)."""
        self._hook_failure = exc
        self.wake()

    def _check_hook(self) -> None:
        """Apply ``on-target-error`` to a hook failure: ``report`` fails the job (the target
        misses data); ``ignore`` and ``stop`` go on with the snapshot broken, as it says."""
        exc, self._hook_failure = self._hook_failure, None
        if exc is not None:
            self.handle_error(CopyWriteError(exc.errno, str(exc)), "write")

    def run(self) -> None:
        if self.sync == "none":
            while True:  # the hook does the work until someone cancels
                self.checkpoint()
                self._check_hook()
                self.sleep(3600)
        cluster = self.cbw.cluster_size
        first = 0
        while first < self.cbw.nclusters:
            chunk = self.chunk_bytes(CHUNK_BYTES, cluster) // cluster
            end = min(self.cbw.nclusters, first + chunk)
            self.checkpoint()
            self._check_hook()
            copied = self._copy_chunk(first, end)
            self.throttle(copied)
            first = end
        self.cbw.drain()  # the hook's last copies are part of the backup
        self._check_hook()

    def _copy_chunk(self, first: int, end: int) -> int:
        """Copy the clusters of ``[first, end)`` not done yet, skipping those reading as zero."""
        if self.sync == "bitmap":
            # An incremental image must hold every dirty cluster, zeroes included: copied as
            # data, they are exactly its allocated clusters and hide the older backup's data.
            return 0 if self.cbw.all_done(first, end) else self._copy_with_policy(first, end)
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

    def commit(self) -> None:
        self._end_bitmap_freeze(success=True)

    def abort(self) -> None:
        self._end_bitmap_freeze(success=False)

    def _end_bitmap_freeze(self, success: bool) -> None:
        """QEMU's backup_cleanup_sync_bitmap: settle the sync bitmap as ``bitmap-mode`` says."""
        bitmap = self.sync_bitmap
        if bitmap is None or bitmap.successor is None:
            return
        mode = self.bitmap_mode
        if (success or mode == "always") and mode != "never":
            bitmap.abdicate()
        else:
            bitmap.reclaim()
        if not success and mode == "always":
            cluster = self.cbw.cluster_size
            for first, count, done in self.cbw.done.runs():
                if not done:
                    bitmap.mark(first * cluster, count * cluster)

    def clean(self) -> None:
        self._end_bitmap_freeze(success=False)  # a job that ended without commit or abort
        self.target.extra_info.pop("fleecing", None)
        self.cbw.detach()
        with suppress(OSError):  # the target's errors were reported while copying
            self.target.flush()
