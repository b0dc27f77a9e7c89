"""The backup job: a point-in-time copy of a source into a target.

When the job is created, inside the command, it inserts a ``copy-before-write`` filter node above
the source, as QEMU's backup does: in one drained section (no request in flight on the source,
its devices and exports, or the target; none admitted) the filter goes in, the devices and
exports move onto it, and the job's initial bitmap is computed (sync=top: what the top layer
does not allocate; sync=bitmap: the frozen bitmap). That drained section is the point in time.
The job and the filter share one copied bitmap, so no cluster is copied twice. When the job ends
the filter is removed, drained again, after every write that entered it has finished. Then:

* ``sync=none`` copies only what the guest overwrites, and runs until cancelled: with a target
  whose backing is the source, the target *is* the snapshot (image fleecing).
* ``sync=full`` also copies every other cluster, skipping ranges that read as zeroes.
* ``sync=top`` copies only the clusters the source's top layer allocates; the target's own
  backing provides the rest.
* ``discard-source`` (QEMU 9) discards on the source, through the job's filter, each run of
  clusters the job copied once the target has it: a push backup from a ``snapshot-access`` node
  (or a fleecing target) empties the fleecing image as it goes. Nothing but the job may write
  such a source (checked by the command): a discard after a guest write would lose it.
* ``sync=bitmap`` (and ``incremental``, its ``on-success`` form) copies exactly the clusters a
  dirty bitmap marks. A job given a bitmap *freezes* it at its start (a successor records the
  writes from then on) and, as ``bitmap-mode`` says, ends the freeze: ``on-success`` keeps only
  the successor's bits if the job succeeded, everything otherwise; ``never`` keeps everything;
  ``always`` keeps the successor's bits plus, on failure, the clusters left uncopied.

*Parallel copy* (QEMU's ``x-perf.max-workers``): each chunk is cut into pieces of at most
``max-chunk`` bytes (and at most :data:`~fleece.block.cbw.MAX_COPY_BYTES`, one copy's I/O), which
``max-workers`` threads copy at once; pieces are disjoint and each copy takes the filter's
exclusive range lock over its piece only, so the copies run in parallel while the guest's
copy-before-write and snapshot reads wait for one piece at most. With ``discard-source`` a piece is
discarded by the worker that copied it, right after its copy. The first error wins: the other
workers stop before their next piece, and the job's thread applies the error policy as with one
worker (``stop`` pauses, then the chunk's uncopied pieces are copied again; ``ignore`` counts the
piece that failed as handled; ``report`` fails the job). Pause and cancel take effect between
two pieces.

``speed`` counts every byte the job covers, as QEMU's block-copy rate limit does: copied, written
as zeroes or skipped as reading zeroes, by the job or by the filter in a guest write's path (the
latter never wait, but use up the job's budget). What is outside the job from its start
(``sync=top``: unallocated in the top layer; ``sync=bitmap``: clean) costs nothing.
"""

from __future__ import annotations

import enum
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fleece.block.cbw import (
    COPY_AHEAD_BYTES,
    MAX_COPY_BYTES,
    CbwErrorPolicy,
    CopyBeforeWrite,
    CopyReadError,
    CopyWriteError,
)
from fleece.block.dirty_bitmap import DirtyBitmap
from fleece.block.node import BlockNode, NodeUser
from fleece.block.perm import NO_PERM, Perm
from fleece.errors import GenericError
from fleece.jobs.job import ErrorAction, Job, JobHost

log = logging.getLogger(__name__)

class SyncMode(enum.Enum):
    """What the job copies (QEMU's ``MirrorSyncMode``; ``incremental`` arrives as ``bitmap``
    with bitmap-mode on-success, see :func:`fleece.bitmaps.commands.check_backup_bitmap`)."""

    FULL = "full"
    TOP = "top"
    NONE = "none"
    BITMAP = "bitmap"


class BitmapSyncMode(enum.Enum):
    """How a job given a bitmap ends its freeze (QEMU's ``BitmapSyncMode``)."""

    ON_SUCCESS = "on-success"
    NEVER = "never"
    ALWAYS = "always"


#: how many bytes the job plans and copies between two checkpoints
CHUNK_BYTES = 16 << 20

#: copy threads of a job when ``x-perf.max-workers`` is not given. QEMU's default is 64
#: coroutines, which cost nothing while they wait; fleece's workers are threads sharing the GIL.
#: Measured on 2 cores (1 GiB, guest writing, interleaved with qemu-storage-daemon, best and
#: median of 3): 4 is best or within noise of the best for a push to an ``nbd`` node with
#: ``multi-conn: 4`` (one piece in flight per connection), for a single-connection push and
#: for a local target; 1 leaves the target idle while the source is read, 8 or more only add
#: GIL hand-offs and take CPU from the guest's writes.
DEFAULT_MAX_WORKERS = 4

#: the largest ``x-perf.max-workers`` (QEMU's bound: INT_MAX)
MAX_WORKERS_LIMIT = 2**31 - 1


class _CopyFailed(Exception):
    """A piece's copy failed with ``error``: the job's error policy decides (a failure to
    skip zeroes or discard is not the policy's, as with one worker)."""

    def __init__(self, error: OSError, first: int, end: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.first = first
        self.end = end


@dataclass
class _Pass:
    """One pass of the workers over a chunk's pieces: the next one to take, those done, and
    the first failure (which stops the others before their next piece)."""

    pieces: list[tuple[int, int]]
    next: int = 0
    done: set[int] = field(default_factory=set)
    failure: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class BackupJob(Job):
    kind: ClassVar[str] = "backup"

    def __init__(
        self,
        storage: JobHost,
        job_id: str,
        source: BlockNode,
        target: BlockNode,
        *,
        sync: SyncMode,
        target_is_fresh: bool,
        copy_ahead: int = COPY_AHEAD_BYTES,
        write_behind: int = 0,
        sync_bitmap: DirtyBitmap | None = None,
        bitmap_mode: BitmapSyncMode = BitmapSyncMode.ON_SUCCESS,
        target_size_limit: int = 0,
        on_cbw_error: CbwErrorPolicy = CbwErrorPolicy.BREAK_GUEST_WRITE,
        filter_node_name: str | None = None,
        discard_source: bool = False,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_chunk: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(storage, job_id, **options)
        if not 1 <= max_workers <= MAX_WORKERS_LIMIT:
            raise GenericError(f"max-workers must be between 1 and {MAX_WORKERS_LIMIT}")
        if max_chunk < 0:
            raise GenericError("max-chunk must be zero (which means no limit) or positive")
        #: QEMU's x-perf.max-workers: pieces of a chunk copied at once
        self.max_workers = max_workers
        #: QEMU's x-perf.max-chunk: the most bytes one copy covers (0: no limit of the job's)
        self.max_chunk = max_chunk
        self.source = source
        self.target = target
        self.sync = sync
        self.target_is_fresh = target_is_fresh
        self.sync_bitmap = sync_bitmap
        self.bitmap_mode = bitmap_mode
        #: QEMU 9's discard-source: clusters the job copied are discarded on the source
        self.discard_source = discard_source
        self._hook_failure: OSError | None = None
        self.len = source.size
        graph = source.graph
        with self.guarded_setup():
            self.use_node(source, Perm.CONSISTENT_READ, Perm.all())
            # The filter's target link writes the target and keeps other writers off it.
            self.use_node(target, NO_PERM, Perm.all())
            filter_options: dict[str, Any] = {
                "driver": "copy-before-write",
                "file": source.name,
                "target": target.name,
                "on-cbw-error": on_cbw_error.value,
                "target-size-limit": target_size_limit,
                "x-copy-ahead": copy_ahead,
                "x-write-behind": write_behind,
            }
            if filter_node_name is not None:
                filter_options["node-name"] = filter_node_name
            with graph.drained([source, target]):
                self.filter = graph.open_node(filter_options)
                self._filter_user: NodeUser = self.use_node(self.filter, NO_PERM, Perm.all())
                try:
                    self._setup_in_drained_section()
                except BaseException:
                    graph.remove_filter(self.filter, self._filter_user)
                    raise
        log.debug("backup job %r: sync=%s, filter %r above %r, target %r", job_id, sync.value,
                  self.filter.name, source.name, target.name)

    def _setup_in_drained_section(self) -> None:
        """The job's start, at its point in time: nothing writes the source meanwhile, so the
        initial bitmap is exact and every later write passes through the filter."""
        cbw = self.filter.driver.copy_before_write()
        assert cbw is not None  # the node was opened as a copy-before-write filter
        if self.max_chunk and self.max_chunk < cbw.cluster_size:
            raise GenericError(f"Required max-chunk ({self.max_chunk}) is less than backup "
                               f"cluster size ({cbw.cluster_size})")
        self.cbw: CopyBeforeWrite = cbw
        self.cbw.on_copy.append(self._covered)
        # sync=bitmap: an incremental image holds its dirty zero clusters as data (see
        # _copy_chunk); the others keep zeroes zeroes, as QEMU's block-copy does.
        self.cbw.sparse = self.sync is not SyncMode.BITMAP
        self.cbw.on_late_failure.append(self._hook_broke)
        self.target.extra_info["fleecing"] = self.fleecing_info
        bitmap = self.sync_bitmap
        if bitmap is not None:
            bitmap.freeze()
        try:
            if self.sync is SyncMode.TOP:
                self._skip_unallocated_in_top()
            elif self.sync is SyncMode.BITMAP:
                assert bitmap is not None
                self._skip_clean(bitmap)
        except BaseException:
            if bitmap is not None:
                bitmap.reclaim()
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
        snapshot = self.source.driver.snapshot_of()
        if snapshot is not None:  # a push from a snapshot: what its fleecing image holds now
            image = snapshot.target
            info["snapshot"] = {
                "fleecing-image": image.name,
                "copied-bytes": snapshot.copied_bytes,
                "actual-size": image.info()["image"].get("actual-size", 0),
            }
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
        if self.sync is SyncMode.NONE:
            while True:  # the hook does the work until someone cancels
                self.checkpoint()
                self._check_hook()
                self.sleep(3600)
        pool = (ThreadPoolExecutor(self.max_workers, thread_name_prefix=f"job-{self.id}-copy")
                if self.max_workers > 1 else None)
        try:
            cluster = self.cbw.cluster_size
            first = 0
            while first < self.cbw.nclusters:
                chunk = self.chunk_bytes(CHUNK_BYTES, cluster) // cluster
                end = min(self.cbw.nclusters, first + chunk)
                self.checkpoint()
                self._check_hook()
                self._copy_chunk(first, end, pool)
                self.throttle(0)  # the chunk's bytes were counted as it covered them
                first = end
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # no copy of the job's outlives it
        self.cbw.drain()  # the hook's last copies are part of the backup
        self._check_hook()

    def _covered(self, length: int) -> None:
        """``length`` more bytes of the job's range are handled, by the job or by the filter
        in a guest write's path: progress, and bytes against the speed limit. QEMU counts
        every byte its block-copy covers, copied or written as zeroes, whoever asked."""
        self.progress(length)
        self.charge(length)

    def _pieces(self, first: int, end: int) -> list[tuple[int, int]]:
        """``[first, end)`` cut into the pieces one copy covers: at most ``max-chunk`` and
        :data:`MAX_COPY_BYTES`, as many as a multiple of the workers (so that none of them
        idles at the chunk's end while another copies two pieces), and of equal sizes."""
        cluster = self.cbw.cluster_size
        largest = MAX_COPY_BYTES // cluster
        if self.max_chunk:
            largest = max(1, min(largest, self.max_chunk // cluster))
        count = end - first
        if count <= 0:
            return []
        workers = min(self.max_workers, count)
        pieces = -(-count // largest)
        pieces = min(count, -(-pieces // workers) * workers)
        step = -(-count // pieces)
        return [(at, min(end, at + step)) for at in range(first, end, step)]

    def _copy_chunk(self, first: int, end: int, pool: ThreadPoolExecutor | None = None) -> None:
        """Copy the clusters of ``[first, end)`` not done yet, piece by piece on the workers
        (in this thread with one), skipping those reading as zero; each byte is counted by
        :meth:`_covered` as it is handled. A failed copy gets the error policy here, after
        every worker stopped; then what is left of the chunk is copied again."""
        pieces = self._pieces(first, end)
        while pieces:
            state = _Pass(pieces)
            if pool is None:
                self._work(state)
            else:
                workers = min(self.max_workers, len(pieces))
                for future in [pool.submit(self._work, state) for _ in range(workers)]:
                    future.result()
            pieces = [piece for i, piece in enumerate(pieces) if i not in state.done]
            failure = state.failure
            if failure is None:
                if pieces:  # the workers stopped for a pause or a cancel
                    self.checkpoint()
                continue
            if not isinstance(failure, _CopyFailed):
                raise failure
            self._apply_policy(failure)

    def _apply_policy(self, failure: _CopyFailed) -> None:
        """The error policy for a piece's failed copy, in the job's thread: ``report``
        raises, ``stop`` returns once resumed (the piece is copied again), ``ignore`` counts
        the piece as handled."""
        exc, first, end = failure.error, failure.first, failure.end
        operation = "read" if isinstance(exc, CopyReadError) else "write"
        if self.handle_error(exc, operation) is ErrorAction.IGNORE:
            # QEMU's "ignore": count the range as handled and go on
            skipped = self.cbw.done.count(first, end)
            self.cbw.mark_done(first, end - first)
            self._covered((end - first - skipped) * self.cbw.cluster_size)

    def _work(self, state: _Pass) -> None:
        """One worker: copy the pass's next piece until none is left, one failed, or the job
        was paused or cancelled."""
        while True:
            with state.lock:
                if state.failure is not None or state.next >= len(state.pieces):
                    return
                index = state.next
                state.next += 1
            if self.cancelled or self.paused:
                return
            first, end = state.pieces[index]
            try:
                self._copy_piece(first, end)
            except BaseException as exc:
                with state.lock:
                    if state.failure is None:
                        state.failure = exc
                return
            with state.lock:
                state.done.add(index)

    def _copy_piece(self, first: int, end: int) -> None:
        """Copy one piece; with ``discard-source``, then discard on the source what was
        copied (only once the target has it)."""
        todo = ([(run, count) for run, count, done in self.cbw.done.runs(first, end) if not done]
                if self.discard_source else [])
        self._copy_todo(first, end)
        for run, count in todo:
            self._discard_copied(run, run + count)

    def _discard_copied(self, first: int, end: int) -> None:
        """discard-source: drop from the source the clusters of ``[first, end)`` the target
        has now. The discard passes through the job's filter to the source; a
        ``snapshot-access`` source drops them from the fleecing image, whose filter stops
        copying them. A failed discard is only logged: it is a hint, the backup is whole."""
        cluster = self.cbw.cluster_size
        for run, count, done in self.cbw.done.runs(first, end):
            if not done:
                continue
            offset = run * cluster
            length = min((run + count) * cluster, self.len) - offset
            try:
                self.filter.pdiscard(offset, length)
            except OSError as exc:
                log.warning("backup job %r: discard-source of %d bytes at %d failed: %s",
                            self.id, length, offset, exc)

    def _copy_todo(self, first: int, end: int) -> None:
        if self.sync is SyncMode.BITMAP:
            # An incremental image must hold every dirty cluster, zeroes included: copied as
            # data, they are exactly its allocated clusters and hide the older backup's data.
            if not self.cbw.all_done(first, end):
                self._copy_clusters(first, end)
            return
        # A fresh target without backing already reads zeroes where nothing was written.
        reads_zero = self.target_is_fresh and self.target.backing() is None
        self._covered(self.cbw.skip_zeroes(first, end, target_reads_zero=reads_zero))
        if not self.cbw.all_done(first, end):
            self._copy_clusters(first, end)

    def _copy_clusters(self, first: int, end: int) -> None:
        """Copy; a failure is the error policy's (raised as :class:`_CopyFailed`)."""
        try:
            self.cbw.copy_clusters(first, end)
        except OSError as exc:
            raise _CopyFailed(exc, first, end) from exc

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
        if (success or mode is BitmapSyncMode.ALWAYS) and mode is not BitmapSyncMode.NEVER:
            bitmap.abdicate()
        else:
            bitmap.reclaim()
        if not success and mode is BitmapSyncMode.ALWAYS:
            cluster = self.cbw.cluster_size
            for first, count, done in self.cbw.done.runs():
                if not done:
                    bitmap.mark(first * cluster, count * cluster)

    def clean(self) -> None:
        self._end_bitmap_freeze(success=False)  # a job that ended without commit or abort
        self.target.extra_info.pop("fleecing", None)
        # Drained: the writes that entered the filter finish, its pending copies land, and
        # the devices and exports go back to the source. The target is flushed when it
        # closes, as in QEMU: the job's end does not wait for it.
        self.source.graph.remove_filter(self.filter, self._filter_user)
