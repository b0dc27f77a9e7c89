"""The job commands: backups, stream, commit, and the job verbs (a command group of ``Storage``).

:class:`JobCommands` owns the job table. It is also what its jobs see of their owner (their
:class:`~fleece.jobs.job.JobHost`: events and the table), so a running job does not keep the
``Storage`` alive."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from fleece.bitmaps.commands import check_backup_bitmap
from fleece.block.cbw import COPY_AHEAD_BYTES, WRITE_BEHIND_BYTES, CbwErrorPolicy
from fleece.block.dirty_bitmap import find_bitmap
from fleece.block.drivers.file import locked_elsewhere
from fleece.block.node import BlockNode
from fleece.block.perm import Perm
from fleece.commands import Nodes, command
from fleece.errors import DeviceNotActive, DeviceNotFound, GenericError, NodeNotFound
from fleece.jobs.backup import DEFAULT_MAX_WORKERS, BackupJob, BitmapSyncMode, SyncMode
from fleece.jobs.job import ErrorPolicy, Job
from fleece.jobs.state import JobStatus

if TYPE_CHECKING:
    from fleece.events import Event, EventBus

ERROR_POLICY = tuple(policy.value for policy in ErrorPolicy)
SYNC = (*(mode.value for mode in SyncMode), "incremental")

_COMMON_JOB_ARGS: dict[str, Any] = {
    "*job-id": "str",
    "*speed": "int",
    "*auto-finalize": "bool",
    "*auto-dismiss": "bool",
    "*on-source-error": ERROR_POLICY,
    "*on-target-error": ERROR_POLICY,
}

_BACKUP_ARGS: dict[str, Any] = {
    "device": "str",
    "sync": SYNC,
    **_COMMON_JOB_ARGS,
    "*bitmap": "str",
    "*bitmap-mode": ("on-success", "never", "always"),
    "*compress": "bool",
    "*filter-node-name": "str",
    "*x-perf": "object",
    # fleece's own: how much the target may take, and what happens past it
    "*target-size-limit": "int",
    "*on-cbw-error": ("break-guest-write", "break-snapshot"),
}


class JobCommands:
    """The job commands, given the nodes they look up and the event bus; owns ``jobs``."""

    def __init__(self, nodes: Nodes, events: EventBus) -> None:
        self.graph = nodes.graph
        self.find_node = nodes.find
        self._events = events
        self.jobs: dict[str, Job] = {}
        #: the job table's lock, held by a job from its final event to its dismissal (QEMU
        #: does both in one main-loop step: a client that saw BLOCK_JOB_COMPLETED never
        #: finds an auto-dismissed job in query-block-jobs); reentrant for event listeners
        self._jobs_lock = threading.RLock()
        #: inside a transaction: jobs created and not started yet (QEMU starts them together,
        #: once every action succeeded)
        self._unstarted: list[Job] | None = None

    @contextlib.contextmanager
    def jobs_started_after(self) -> Iterator[list[Job]]:
        """Jobs created inside the block are announced (``created``) but started only by the
        caller, from the list this yields (a transaction starts them once all succeeded)."""
        unstarted: list[Job] = []
        self._unstarted = unstarted
        try:
            yield unstarted
        finally:
            self._unstarted = None

    def _start_job(self, job: Job) -> None:
        self._register_job(job)
        if self._unstarted is None:
            job.start()
        else:
            job.announce()
            self._unstarted.append(job)

    # -- bookkeeping -------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        """Send an event (for the jobs: they announce themselves through their host)."""
        return self._events.emit(name, data)

    def job_table(self) -> AbstractContextManager[object]:
        """The job table's lock: a job holds it from its final event to its dismissal."""
        return self._jobs_lock

    def forget_job(self, job: Job) -> None:
        """Drop ``job`` from the job table (its own dismissal calls this); no-op if it left."""
        with self._jobs_lock:
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]

    def _register_job(self, job: Job) -> None:
        with self._jobs_lock:
            self.jobs[job.id] = job

    def _check_job_id(self, job_id: str) -> None:
        with self._jobs_lock:
            if job_id in self.jobs:
                raise GenericError(f"Job ID '{job_id}' already in use")
        if not job_id or job_id.startswith("#"):
            raise GenericError(f"Invalid job ID '{job_id}'")

    def _check_not_backup_target(self, node: BlockNode) -> None:
        for job in list(self.jobs.values()):
            if isinstance(job, BackupJob) and job.target is node and job.users:
                raise GenericError(
                    f"Node '{node.name}' is busy: block device is in use by block job: backup"
                )

    def block_job(self, job_id: str) -> Job:
        """The job ``job_id``; ``DeviceNotActive`` (QEMU's class for block jobs) if none."""
        job = self.jobs.get(job_id)
        if job is None:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    def job(self, job_id: str) -> Job:
        """The job ``job_id``; ``GenericError`` "Job not found" (the ``job-*`` verbs) if none."""
        job = self.jobs.get(job_id)
        if job is None:
            raise GenericError("Job not found")
        return job

    def cancel_all_jobs(self, timeout: float = 30.0) -> None:
        """Cancel every job that has not concluded and wait for it (shutdown)."""
        for job in list(self.jobs.values()):
            if job.status in (JobStatus.CONCLUDED, JobStatus.NULL, JobStatus.ABORTING):
                continue
            try:
                job.cancel(force=True)
            except GenericError:
                continue
        for job in list(self.jobs.values()):
            job.join(timeout)
            if job.status is JobStatus.CONCLUDED:
                job.dismiss()

    # -- backups -----------------------------------------------------------------------------
    def _backup_job(
        self,
        source: BlockNode,
        target: BlockNode,
        *,
        job_id: str,
        sync: str,
        fresh: bool,
        options: dict[str, Any],
    ) -> BackupJob:
        checked = check_backup_bitmap(_bitmap_holder(source, options.get("bitmap")), sync,
                                      options.get("bitmap"), options.get("bitmap-mode"))
        sync = checked.sync
        if options.get("compress"):
            raise GenericError("Compression is not supported by fleece's backup target writer")
        if source is target:
            raise GenericError("Source and target cannot be the same")
        if source.size != target.size:
            raise GenericError("Source and target image have different sizes")
        self._check_not_backup_target(source)
        self._check_not_backup_target(target)
        job = BackupJob(
            self,
            job_id,
            source,
            target,
            sync=SyncMode(sync),
            target_is_fresh=fresh,
            copy_ahead=_perf_bytes(options.get("x-perf"), "copy-ahead", COPY_AHEAD_BYTES),
            write_behind=_perf_bytes(options.get("x-perf"), "write-behind", WRITE_BEHIND_BYTES),
            max_workers=_perf_int(options.get("x-perf"), "max-workers", DEFAULT_MAX_WORKERS),
            max_chunk=_perf_int(options.get("x-perf"), "max-chunk", 0),
            target_size_limit=_size_limit(options.get("target-size-limit")),
            on_cbw_error=CbwErrorPolicy(options.get("on-cbw-error") or "break-guest-write"),
            filter_node_name=options.get("filter-node-name"),
            discard_source=bool(options.get("discard-source")),
            sync_bitmap=checked.bitmap,
            bitmap_mode=BitmapSyncMode(checked.mode),
            speed=options.get("speed") or 0,
            auto_finalize=options.get("auto-finalize", True),
            auto_dismiss=options.get("auto-dismiss", True),
            on_source_error=ErrorPolicy(options.get("on-source-error", "report")),
            on_target_error=ErrorPolicy(options.get("on-target-error", "report")),
        )
        self._start_job(job)
        return job

    @command(
        "drive-backup",
        {**_BACKUP_ARGS, "target": "str", "*format": "str",
         "*mode": ("existing", "absolute-paths"), "*target-id": "str", "*target-temporary": "bool"},
        whole=True,
    )
    def drive_backup(self, args: dict[str, Any]) -> dict[str, Any]:
        """Back up ``device`` into the image file ``target`` (created unless mode=existing).

        With ``sync=none`` and a qcow2 target, the target's backing is the source node: the
        target named ``target-id`` reads as the point-in-time snapshot and can be exported.
        """
        device: str = args["device"]
        source = self.find_node(device)
        job_id = args.get("job-id") or device
        self._check_job_id(job_id)
        sync: str = args["sync"]
        path: str = args["target"]
        image = source.skip_filters()
        fmt = args.get("format") or (image.driver_name if image.driver_name in ("qcow2", "raw")
                                     else "raw")
        if fmt not in ("qcow2", "raw"):
            raise GenericError(f"Unknown target format '{fmt}': fleece creates qcow2 or raw")
        mode = args.get("mode", "absolute-paths")
        target_id = args.get("target-id")
        if target_id is not None and self.graph.find(target_id) is not None:
            raise GenericError(f"Duplicate nodes with node-name='{target_id}'")
        backing = self._backing_for(source, sync) if fmt == "qcow2" else None
        existed = os.path.exists(path)
        if mode == "absolute-paths":
            if existed:
                self._check_replaceable(path)
            _create_target(path, fmt, source.size, backing)
        elif not existed:
            raise GenericError(f"Could not open '{path}': No such file or directory")
        created = not existed  # only a file this command made may be removed on failure
        options: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
        if target_id is not None:
            options["node-name"] = target_id
        if fmt == "qcow2":
            options["backing"] = backing.name if backing is not None else None
        try:
            target = self.graph.open_node(options)
        except BaseException:
            if created:
                _unlink_quietly(path)
            raise
        if args.get("target-temporary"):
            target.on_close.append(lambda node: _unlink_quietly(path))
        try:
            self._backup_job(source, target, job_id=job_id, sync=sync, fresh=created,
                             options=args)
        except BaseException:
            target.close()
            if created:
                _unlink_quietly(path)
            raise
        return {}

    def _check_replaceable(self, path: str) -> None:
        """Refuse to overwrite an image that a node here, or another process, has open."""
        for node in self.graph.nodes():
            if node.driver_name != "file":
                continue
            with contextlib.suppress(OSError):
                if os.path.samefile(node.driver.filename(), path):
                    raise GenericError(
                        f"Could not create '{path}': the image is in use by node '{node.name}'"
                    )
        if locked_elsewhere(path):
            raise GenericError(
                f"Could not create '{path}': the image is locked by another process"
            )

    def _backing_for(self, source: BlockNode, sync: str) -> BlockNode | None:
        """The node a new target reads through to: the source itself for sync=none (fleecing),
        the source's backing for sync=top, nothing for sync=full."""
        if sync == "none":
            return source
        if sync == "top":
            return source.skip_filters().backing()
        return None

    @command(
        "blockdev-backup", {**_BACKUP_ARGS, "target": "str", "*discard-source": "bool"}, whole=True
    )
    def blockdev_backup(self, args: dict[str, Any]) -> dict[str, Any]:
        """Back up ``device`` into the existing node ``target``."""
        device: str = args["device"]
        source = self.find_node(device)
        name: str = args["target"]
        target = self.graph.find(name)
        if target is None:
            raise NodeNotFound(f"Cannot find device='{name}' nor node-name='{name}'")
        job_id = args.get("job-id") or device
        self._check_job_id(job_id)
        if args.get("discard-source"):
            _check_discardable(source)
        self._backup_job(source, target, job_id=job_id, sync=args["sync"], fresh=False,
                         options=args)
        return {}

    # -- stream and commit -------------------------------------------------------------------
    def _chain_options(self, device: str, job_id: str | None, speed: int | None,
                       on_error: str | None, auto_finalize: bool | None,
                       auto_dismiss: bool | None) -> tuple[str, dict[str, Any]]:
        job_id = job_id or device
        self._check_job_id(job_id)
        options: dict[str, Any] = {"speed": speed or 0,
                                   "on_source_error": ErrorPolicy(on_error or "report"),
                                   "on_target_error": ErrorPolicy(on_error or "report")}
        if auto_finalize is not None:
            options["auto_finalize"] = auto_finalize
        if auto_dismiss is not None:
            options["auto_dismiss"] = auto_dismiss
        return job_id, options

    @command(
        "block-stream",
        {"device": "str", "*base-node": "str", "*base": "str", "*job-id": "str", "*speed": "int",
         "*on-error": ERROR_POLICY, "*auto-finalize": "bool", "*auto-dismiss": "bool",
         "*backing-file": "str", "*filter-node-name": "str"},
    )
    def block_stream(self, device: str, base_node: str | None = None, base: str | None = None,
                     job_id: str | None = None, speed: int | None = None,
                     on_error: str | None = None, auto_finalize: bool | None = None,
                     auto_dismiss: bool | None = None, backing_file: str | None = None,
                     filter_node_name: str | None = None) -> dict[str, Any]:
        """Copy the chain's data above ``base-node`` into ``device``'s top image."""
        from fleece.jobs.stream import StreamJob

        if base is not None:
            raise GenericError("'base' by file name is not supported; use 'base-node'")
        top = self.find_node(device)
        base_bs = self.graph.get(base_node) if base_node is not None else None
        job_id, options = self._chain_options(device, job_id, speed, on_error, auto_finalize,
                                              auto_dismiss)
        job = StreamJob(self, job_id, top, base_bs, **options)
        self._register_job(job)
        job.start()
        return {}

    @command(
        "block-commit",
        {"device": "str", "*top-node": "str", "*base-node": "str", "*job-id": "str",
         "*speed": "int", "*on-error": ERROR_POLICY, "*auto-finalize": "bool",
         "*auto-dismiss": "bool", "*backing-file": "str", "*filter-node-name": "str",
         "*top": "str", "*base": "str"},
    )
    def block_commit(self, device: str, top_node: str | None = None,
                     base_node: str | None = None, job_id: str | None = None,
                     speed: int | None = None, on_error: str | None = None,
                     auto_finalize: bool | None = None, auto_dismiss: bool | None = None,
                     backing_file: str | None = None, filter_node_name: str | None = None,
                     top: str | None = None, base: str | None = None) -> dict[str, Any]:
        """Commit an intermediate layer ``top-node`` (and those below it) into ``base-node``."""
        from fleece.block.chain import backing_chain
        from fleece.jobs.stream import CommitJob

        if top is not None or base is not None:
            raise GenericError("'top'/'base' by file name are not supported; use the node names")
        try:
            active = self.find_node(device)
        except NodeNotFound:
            raise DeviceNotFound(f"Device '{device}' not found") from None  # QEMU's words
        chain = backing_chain(active)
        top_bs = self.graph.get(top_node) if top_node is not None else active
        if base_node is not None:
            base_bs = self.graph.get(base_node)
        elif len(chain) > 1:
            base_bs = chain[-1]
        else:
            raise GenericError(f"'{device}' has no backing file to commit into")
        if base_bs is top_bs:
            raise GenericError("Base and top must not be the same")
        job_id, options = self._chain_options(device, job_id, speed, on_error, auto_finalize,
                                              auto_dismiss)
        job = CommitJob(self, job_id, active, top_bs, base_bs, **options)
        self._register_job(job)
        job.start()
        return {}

    # -- queries -----------------------------------------------------------------------------
    @command("query-block-jobs", {})
    def query_block_jobs(self) -> list[dict[str, Any]]:
        """QEMU's ``BlockJobInfo`` of every job that has not been dismissed."""
        with self._jobs_lock:
            return [job.block_info() for job in self.jobs.values()]

    @command("query-jobs", {})
    def query_jobs(self) -> list[dict[str, Any]]:
        """QEMU's ``JobInfo`` of every job that has not been dismissed."""
        with self._jobs_lock:
            return [job.job_info() for job in self.jobs.values()]

    # -- block-job-* verbs (by device = job id) ----------------------------------------------
    @command("block-job-cancel", {"device": "str", "*force": "bool"})
    def block_job_cancel(self, device: str, force: bool = False) -> dict[str, Any]:
        """Cancel the job (``force`` also while paused); it ends with ``BLOCK_JOB_CANCELLED``.
        ``DeviceNotActive`` for an unknown job, ``GenericError`` when its state refuses."""
        self.block_job(device).cancel(force)
        return {}

    @command("block-job-pause", {"device": "str"})
    def block_job_pause(self, device: str) -> dict[str, Any]:
        """Pause the job at its next checkpoint. Errors as :meth:`block_job_cancel`."""
        self.block_job(device).user_pause()
        return {}

    @command("block-job-resume", {"device": "str"})
    def block_job_resume(self, device: str) -> dict[str, Any]:
        """Resume a job paused by the user. Errors as :meth:`block_job_cancel`."""
        self.block_job(device).user_resume()
        return {}

    @command("block-job-set-speed", {"device": "str", "speed": "int"})
    def block_job_set_speed(self, device: str, speed: int) -> dict[str, Any]:
        """Limit the job to ``speed`` bytes per second (0: none). ``GenericError`` for a
        negative speed; otherwise errors as :meth:`block_job_cancel`."""
        self.block_job(device).set_speed(speed)
        return {}

    @command("block-job-complete", {"device": "str"})
    def block_job_complete(self, device: str) -> dict[str, Any]:
        """Complete a job that is ready (fleece's jobs never are: ``GenericError``)."""
        self.block_job(device).complete()
        return {}

    @command("block-job-finalize", {"id": "str"})
    def block_job_finalize(self, id: str) -> dict[str, Any]:
        """Finalize a pending job (``auto-finalize: false``): commit and announce completion.
        Errors as :meth:`block_job_cancel`."""
        self.block_job(id).user_finalize()
        return {}

    @command("block-job-dismiss", {"id": "str"})
    def block_job_dismiss(self, id: str) -> dict[str, Any]:
        """Dismiss a concluded job (``auto-dismiss: false``). Errors as
        :meth:`block_job_cancel`."""
        self.block_job(id).user_dismiss()
        return {}

    # -- job-* verbs -------------------------------------------------------------------------
    @command("job-pause", {"id": "str"})
    def job_pause(self, id: str) -> dict[str, Any]:
        """:meth:`block_job_pause` of the ``job-*`` family; ``GenericError`` for an unknown job."""
        self.job(id).user_pause()
        return {}

    @command("job-resume", {"id": "str"})
    def job_resume(self, id: str) -> dict[str, Any]:
        """:meth:`block_job_resume` of the ``job-*`` family; ``GenericError`` for an unknown
        job."""
        self.job(id).user_resume()
        return {}

    @command("job-cancel", {"id": "str"})
    def job_cancel(self, id: str) -> dict[str, Any]:
        """:meth:`block_job_cancel` of the ``job-*`` family; ``GenericError`` for an unknown
        job."""
        self.job(id).cancel()
        return {}

    @command("job-complete", {"id": "str"})
    def job_complete(self, id: str) -> dict[str, Any]:
        """:meth:`block_job_complete` of the ``job-*`` family."""
        self.job(id).complete()
        return {}

    @command("job-finalize", {"id": "str"})
    def job_finalize(self, id: str) -> dict[str, Any]:
        """:meth:`block_job_finalize` of the ``job-*`` family; ``GenericError`` for an
        unknown job."""
        self.job(id).user_finalize()
        return {}

    @command("job-dismiss", {"id": "str"})
    def job_dismiss(self, id: str) -> dict[str, Any]:
        """:meth:`block_job_dismiss` of the ``job-*`` family; ``GenericError`` for an unknown
        job."""
        self.job(id).user_dismiss()
        return {}


def _size_limit(value: Any) -> int:
    if value is None:
        return 0
    if value < 0:
        raise GenericError("Parameter 'target-size-limit' expects a non-negative value")
    return int(value)


def _perf_bytes(perf: Any, member: str, default: int) -> int:
    """A byte count among fleece's own members of QEMU's experimental ``x-perf`` options (whose
    others it ignores): ``copy-ahead`` (0: copy exactly the clusters the guest overwrites) and
    ``write-behind`` (0: every copy lands in the target before its guest write goes on)."""
    if perf is None:
        return default
    value = perf.get(member, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GenericError(f"Parameter 'x-perf.{member}' expects a non-negative integer")
    return value


def _perf_int(perf: Any, member: str, default: int) -> int:
    """An integer member of QEMU's ``x-perf`` (``max-workers``, ``max-chunk``), type-checked as
    QAPI does; its range is checked by the job, with QEMU's messages."""
    if perf is None:
        return default
    value = perf.get(member, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenericError(f"Invalid parameter type for 'x-perf.{member}', expected: integer")
    return value


def _create_target(path: str, fmt: str, size: int, backing: BlockNode | None) -> None:
    """Create the backup target image (QEMU's mode=absolute-paths). The image names the
    backing's image, below any filter (a backup's copy-before-write) sitting on it."""
    if backing is not None:
        backing = backing.skip_filters()
    try:
        if fmt == "qcow2":
            from fleece.block.qcow2 import create

            create(
                path,
                size,
                backing_file=backing.driver.filename() if backing is not None else None,
                backing_format=backing.driver_name if backing is not None else None,
            )
        else:
            with open(path, "wb") as f:
                f.truncate(size)
    except (OSError, ValueError) as exc:
        raise GenericError(f"Could not create '{path}': {exc}") from exc


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _check_discardable(source: BlockNode) -> None:
    """discard-source drops what the job copied from ``source``: nothing else may write it (a
    guest write after the copy would be discarded). ``GenericError`` naming the writer."""
    for root in source.roots():
        if root.user.perm & Perm.WRITE:
            raise GenericError(
                f"discard-source needs a source nothing else writes (a snapshot-access node or "
                f"a fleecing target); '{source.name}' is written: {root.user.description}"
            )


def _bitmap_holder(source: BlockNode, name: str | None) -> BlockNode:
    """Where a backup of ``source`` finds its bitmap: ``source`` itself, or, for a snapshot
    (``snapshot-access`` over a copy-before-write filter) without such a bitmap, the live disk
    the snapshot is of, whose bitmap tracks the guest's writes (a push backup's
    ``sync=incremental``)."""
    if name is None or find_bitmap(source, name) is not None:
        return source
    below = source.file_child()
    cbw = below.driver.copy_before_write() if below is not None else None
    if cbw is not None and find_bitmap(cbw.source, name) is not None:
        return cbw.source
    return source
