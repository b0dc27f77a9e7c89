"""The job runtime: a thread per job, driven through QEMU's status and verb tables.

A job's ``run()`` does the work and calls :meth:`Job.checkpoint` between pieces (where pause and
cancel take effect) and :meth:`Job.throttle` after each (the speed limit). When ``run()`` returns
the job goes ``waiting -> pending``, is finalized (its ``commit()`` runs and the completion event
goes out) automatically or by ``job-finalize``, and is dismissed automatically or by
``job-dismiss``. Cancel or a failure goes through ``aborting`` instead, calling ``abort()``.

Jobs are threads rather than asyncio tasks because a job's work is blocking block I/O and because
``Storage`` is used without an event loop by embedders; nothing in a job touches the loop.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fleece.block.node import BlockNode, NodeUser, UserKind
from fleece.block.perm import Perm
from fleece.errors import GenericError
from fleece.jobs.state import JobStatus, JobVerb, check_transition, check_verb

if TYPE_CHECKING:
    from fleece.events import Event


class JobHost(Protocol):
    """What a job needs of its owner (``Storage``): to announce events and to forget it."""

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event: ...

    def forget_job(self, job: Job) -> None: ...

    def job_table(self) -> AbstractContextManager[object]:
        """Held while a job announces its end and leaves: a query sees it before or after."""
        ...

log = logging.getLogger(__name__)


class ErrorPolicy(enum.Enum):
    """What a job does when its I/O fails (QEMU's ``BlockdevOnError``)."""

    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"
    ENOSPC = "enospc"  # stop on ENOSPC, report anything else

    @classmethod
    def parse(cls, name: str, value: str | ErrorPolicy) -> ErrorPolicy:
        """The policy argument ``name`` spelled ``value``; ``GenericError`` when unknown."""
        if isinstance(value, ErrorPolicy):
            return value
        try:
            return cls(value)
        except ValueError:
            raise GenericError(f"Parameter '{name}' does not accept value '{value}'") from None


class ErrorAction(enum.Enum):
    """What the policy decided for one error (QEMU's ``BlockErrorAction``, as
    ``BLOCK_JOB_ERROR`` reports it): ``STOP`` returns once the job was resumed, to retry."""

    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"


class JobCancelled(Exception):
    """Raised by :meth:`Job.checkpoint` in the job's thread once it was cancelled."""


class Job:
    """One block job. Subclasses set ``kind`` and implement ``run`` (and maybe ``commit``)."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        storage: JobHost,
        job_id: str,
        *,
        speed: int = 0,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        on_source_error: str | ErrorPolicy = ErrorPolicy.REPORT,
        on_target_error: str | ErrorPolicy = ErrorPolicy.REPORT,
    ) -> None:
        if speed < 0:
            raise GenericError("Invalid parameter 'speed'")
        self.on_source_error = ErrorPolicy.parse("on-source-error", on_source_error)
        self.on_target_error = ErrorPolicy.parse("on-target-error", on_target_error)
        self.storage = storage
        self.id = job_id
        self.speed = speed
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = JobStatus.UNDEFINED
        self.offset = 0
        self.len = 0
        self.error: str | None = None
        self.io_status = "ok"
        self.busy = False
        self.users: list[NodeUser] = []
        self._cond = threading.Condition()
        self._pause_count = 0
        self._cancelled = False
        self._woken = False  # wake() was called: sleep() returns early once
        self._ended = False  # finalize or abort has begun: only one of them ever runs
        self._thread: threading.Thread | None = None
        self._throttle_start = time.monotonic()
        self._throttle_bytes = 0

    # -- what subclasses provide -------------------------------------------------------------
    def run(self) -> None:
        """Do the work; raise to fail, return to succeed. Runs in the job's thread."""
        raise NotImplementedError

    def commit(self) -> None:
        """Make the result permanent (success only), before the completion event."""

    def abort(self) -> None:
        """Undo what can be undone (cancel or failure), before the cancel/completion event."""

    def clean(self) -> None:
        """Release what the job holds, whichever way it ended."""

    # -- node references ---------------------------------------------------------------------
    def use_node(self, node: BlockNode, perm: Perm, shared: Perm) -> NodeUser:
        """Hold ``node`` for the job's lifetime ("in use by block job: <kind>")."""
        user = node.add_user(
            UserKind.JOB, f"block device is in use by block job: {self.kind}", perm, shared,
            holder=(f"{self.kind} job '{self.id}'", "main node")
        )
        self.users.append(user)
        return user

    def guarded_setup(self) -> _SetupGuard:
        """``with job.guarded_setup():`` releases the nodes taken so far if setup fails."""
        return _SetupGuard(self)

    def release_nodes(self) -> None:
        users, self.users = self.users, []
        for user in reversed(users):
            user.release()

    # -- state -------------------------------------------------------------------------------
    def _transition(self, new: JobStatus) -> None:
        with self._cond:
            old = self.status
            if old is new:
                return
            check_transition(old, new)
            self.status = new
            self._cond.notify_all()
        log.debug("job %r: %s -> %s", self.id, old.value, new.value)
        self.storage.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def paused(self) -> bool:
        return self._pause_count > 0

    def block_info(self) -> dict[str, Any]:
        """QEMU's ``BlockJobInfo``."""
        info: dict[str, Any] = {
            "type": self.kind,
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "busy": self.busy,
            "paused": self.paused,
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.status in (JobStatus.READY, JobStatus.STANDBY),
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def job_info(self) -> dict[str, Any]:
        """QEMU's ``JobInfo``."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.kind,
            "status": self.status.value,
            "current-progress": self.offset,
            "total-progress": self.len,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def _event_data(self) -> dict[str, Any]:
        return {"type": self.kind, "device": self.id, "len": self.len, "offset": self.offset,
                "speed": self.speed}

    # -- the job's thread --------------------------------------------------------------------
    def start(self) -> None:
        """Announce the job (``created``) and run it in its own thread."""
        self.announce()
        self.launch()

    def announce(self) -> None:
        """``created``: the job exists; a transaction creates all its jobs before any runs."""
        self._transition(JobStatus.CREATED)

    def launch(self) -> None:
        """``running``, in the job's own thread."""
        self._transition(JobStatus.RUNNING)
        self.busy = True
        self._thread = threading.Thread(target=self._main, name=f"job-{self.id}", daemon=True)
        self._thread.start()

    def discard(self) -> None:
        """End a job that was announced and never launched (its transaction failed): it is
        cancelled, cleaned up and concluded here, in the caller's thread."""
        with self._cond:
            self._cancelled = True
        self._abort_path()

    def _main(self) -> None:
        failure: str | None = None
        try:
            self.checkpoint()
            self.run()
            if self._cancelled:
                raise JobCancelled
        except JobCancelled:
            pass
        except Exception as exc:  # the job failed: report it in the events, never crash
            failure = str(exc) or type(exc).__name__
        self.busy = False
        if self._cancelled or failure is not None:
            self.error = failure if failure is not None else None
            self._abort_path()
        else:
            self._transition(JobStatus.WAITING)
            self._transition(JobStatus.PENDING)
            if self.auto_finalize:
                self.finalize()
            else:  # QEMU announces PENDING only when someone has to finalize by hand
                self.storage.emit("BLOCK_JOB_PENDING", {"type": self.kind, "id": self.id})

    def _claim_end(self) -> bool:
        """True for the first caller of finalize or abort; a cancel racing an auto-finalize
        must not end the job twice."""
        with self._cond:
            if self._ended:
                return False
            self._ended = True
            return True

    def _abort_path(self, claimed: bool = False) -> None:
        if not claimed and not self._claim_end():
            return
        self._transition(JobStatus.ABORTING)
        try:
            self.abort()
        finally:
            self._clean()
        with self.storage.job_table():  # no query between the event and the dismissal
            if self._cancelled and self.error is None:
                self.storage.emit("BLOCK_JOB_CANCELLED", self._event_data())
            else:
                self.storage.emit("BLOCK_JOB_COMPLETED", {**self._event_data(),
                                                          "error": self.error or "Job failed"})
            self._conclude()

    def finalize(self) -> None:
        """Commit and announce completion (``job-finalize``, or automatically)."""
        if not self._claim_end():
            return
        if self._cancelled:  # a cancel landed while the job was pending
            self._abort_path(claimed=True)
            return
        try:
            self.commit()
        except Exception as exc:
            self.error = str(exc)
            self._abort_path(claimed=True)
            return
        self._clean()
        with self.storage.job_table():  # no query between the event and the dismissal
            self.storage.emit("BLOCK_JOB_COMPLETED", self._event_data())
            self._conclude()

    def _clean(self) -> None:
        try:
            self.clean()
        finally:
            self.release_nodes()

    def _conclude(self) -> None:
        self._transition(JobStatus.CONCLUDED)
        if self.auto_dismiss:
            self.dismiss()

    def dismiss(self) -> None:
        self._transition(JobStatus.NULL)
        self.storage.forget_job(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job concluded (or went away); True if it did within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.status in (JobStatus.CONCLUDED, JobStatus.NULL), timeout
            )

    # -- called from run() -------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Where pause and cancel take effect. Raises :class:`JobCancelled`."""
        with self._cond:
            if self._cancelled:
                raise JobCancelled
            if self._pause_count == 0:
                return
        paused_from = self.status
        self._transition(
            JobStatus.STANDBY if paused_from is JobStatus.READY else JobStatus.PAUSED
        )
        self.busy = False
        with self._cond:
            self._cond.wait_for(lambda: self._pause_count == 0 or self._cancelled)
        self.busy = True
        self._transition(JobStatus.READY if paused_from is JobStatus.READY else JobStatus.RUNNING)
        if self._cancelled:
            raise JobCancelled

    def chunk_bytes(self, largest: int, granularity: int) -> int:
        """How much to copy between two checkpoints: ``largest``, or less under a speed limit
        so that the job is never more than a quarter second ahead of it, and a pause takes
        effect promptly."""
        if self.speed <= 0:
            return largest
        return max(granularity, min(largest, self.speed // 4 // granularity * granularity))

    def progress(self, done: int) -> None:
        with self._cond:
            self.offset += done

    def charge(self, covered: int) -> None:
        """Count ``covered`` bytes against the speed limit without waiting: work done outside
        the job's own loop (a copy-before-write in a guest write's path) uses up the job's
        budget as in QEMU, where the filter's copies pass the job's rate limit too."""
        with self._cond:
            self._charge(covered)

    def _charge(self, covered: int) -> float:
        """Count ``covered`` bytes (``_cond`` held); returns when the limit lets the job go on.
        Time the job fell behind the limit (paused, idle, slow) is not saved up for a burst:
        as QEMU's rate limit, the accounting starts again from now."""
        now = time.monotonic()
        if self.speed <= 0:
            self._throttle_start, self._throttle_bytes = now, 0
            return now
        if self._throttle_start + self._throttle_bytes / self.speed < now:
            self._throttle_start, self._throttle_bytes = now, 0
        self._throttle_bytes += covered
        return self._throttle_start + self._throttle_bytes / self.speed

    def throttle(self, covered: int) -> None:
        """Count ``covered`` more bytes against the speed limit (every byte the job's step
        covered: copied, written as zeroes, skipped as reading zeroes), then sleep as long as
        the limit asks (wakes on cancel, pause or a speed change)."""
        with self._cond:
            due = self._charge(covered)
            self._cond.wait_for(
                lambda: self._cancelled or self._pause_count > 0 or time.monotonic() >= due
                or self.speed <= 0,
                max(0.0, due - time.monotonic()),
            )

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until cancelled, paused or woken."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._cancelled or self._pause_count > 0 or self._woken, seconds
            )
            self._woken = False

    def wake(self) -> None:
        """End the job thread's current (or next) :meth:`sleep` early: something needs it."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def handle_error(self, exc: OSError, operation: str) -> ErrorAction:
        """Apply the error policy for a failed ``read`` (source) or ``write`` (target).

        Returns ``STOP`` (once stopped and resumed: retry) or ``IGNORE``; re-raises ``exc``
        for ``REPORT``.
        """
        policy = self.on_source_error if operation == "read" else self.on_target_error
        if policy is ErrorPolicy.ENOSPC:
            action = ErrorAction.STOP if exc.errno == errno.ENOSPC else ErrorAction.REPORT
        else:
            action = ErrorAction(policy.value)
        self.io_status = "nospace" if exc.errno == errno.ENOSPC else "failed"
        log.debug("job %r: %s error %s, action %s", self.id, operation, exc, action.value)
        self.storage.emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": operation,
                                              "action": action.value})
        if action is ErrorAction.REPORT:
            raise exc
        if action is ErrorAction.IGNORE:
            self.io_status = "ok"
            return action
        with self._cond:
            self._pause_count += 1
        self.checkpoint()
        self.io_status = "ok"
        return action

    # -- verbs -------------------------------------------------------------------------------
    def verb(self, verb: JobVerb) -> None:
        check_verb(self.id, self.status, verb)

    def user_pause(self) -> None:
        self.verb(JobVerb.PAUSE)
        with self._cond:
            if self._pause_count:
                raise GenericError(f"The block job '{self.id}' is already paused")
            self._pause_count += 1
            self._cond.notify_all()

    def user_resume(self) -> None:
        self.verb(JobVerb.RESUME)
        with self._cond:
            if not self._pause_count:
                raise GenericError("Can't resume a job that was not paused")
            self._pause_count = 0
            self._cond.notify_all()

    def cancel(self, force: bool = False) -> None:
        self.verb(JobVerb.CANCEL)
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        if self.status is JobStatus.CREATED or self.status is JobStatus.PENDING:
            self._abort_path()

    def set_speed(self, speed: int) -> None:
        self.verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise GenericError("Invalid parameter 'speed'")
        with self._cond:
            self.speed = speed
            self._throttle_start, self._throttle_bytes = time.monotonic(), 0
            self._cond.notify_all()

    def complete(self) -> None:
        self.verb(JobVerb.COMPLETE)

    def user_finalize(self) -> None:
        self.verb(JobVerb.FINALIZE)
        self.finalize()

    def user_dismiss(self) -> None:
        self.verb(JobVerb.DISMISS)
        self.dismiss()

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class _SetupGuard:
    def __init__(self, job: Job) -> None:
        self.job = job

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            self.job.release_nodes()

