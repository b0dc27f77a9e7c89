"""The job state machine: QEMU's tables, the verb errors, and the job runtime behind them.

What is tested:

- **The tables** of :mod:`fleece.jobs.state` against QEMU's ``JobSTT`` (status x status) and
  ``JobVerbTable`` (verb x status) from ``job.c``, written out again here, independently, in
  QEMU's own layout (a 0/1 per status in the order U C R P Y S W D X E N). Every pair is a test
  of its own. QEMU's table is the one of QEMU >= 6.1, where ``complete`` is also accepted in
  ``standby`` (commit "job: Allow complete for jobs on standby"); QEMU's ``change`` verb (for
  ``job-change``, a command fleece does not have) is left out.
- :func:`check_verb` raises ``GenericError`` with QEMU's message, which names the job, its status
  and the verb: ``Job 'j' in state 'running' cannot accept command verb 'complete'``;
  :func:`check_transition` raises ``AssertionError`` for every edge QEMU lacks.
- **The runtime**, through :meth:`Storage.execute` with real backup jobs on qcow2 images:
  pause freezes ``offset`` and resume lets it move again; resume of a job that is not paused
  fails; ``set-speed`` with a negative speed fails; ``block-job-complete`` on a backup names the
  state and the verb; a job id in use is refused; an unknown job is ``DeviceNotActive`` for
  ``block-job-*`` and ``GenericError`` ``Job not found`` for ``job-*``; ``auto-finalize=false``
  stops in ``pending`` until ``job-finalize``; ``auto-dismiss=false`` stays ``concluded`` until
  ``job-dismiss``; the status sequence and events of a successful and a cancelled job are
  QEMU's; the speed limit holds roughly (8 MiB/s over 16 MiB of data takes >= 1.5 s).
- Regressions of bugs found here (fixed since): at a low speed a pause takes effect within 2 s
  and progress never runs more than a few MiB ahead of ``speed * elapsed`` (the job used to
  copy 16 MiB between pause points); ``BLOCK_JOB_PENDING`` is sent only with
  ``auto-finalize=false``, as QEMU does; a cancel that lands while an auto-finalizing job is
  ``pending`` ends the job exactly once (it used to send both ``BLOCK_JOB_CANCELLED`` and
  ``BLOCK_JOB_COMPLETED`` and fail ``null -> concluded`` in the job's thread).

Every test is bounded: event waits time out after a few seconds and the module has a
``pytest-timeout`` of 20 s per test.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.qcow2 import create
from fleece.errors import DeviceNotActive, GenericError, QMPError
from fleece.events import Event
from fleece.jobs.job import Job
from fleece.jobs.state import (
    TRANSITIONS,
    VERBS,
    JobStatus,
    JobVerb,
    check_transition,
    check_verb,
)
from fleece.storage import Storage
from tests.events import EventLog

pytestmark = pytest.mark.timeout(20)

MiB = 1 << 20
WAIT = 8.0  # seconds an expected event may take before the test fails

# --------------------------------------------------------------------------------------------
# QEMU's tables, written out again from job.c (QEMU >= 6.1), in QEMU's column order.
# --------------------------------------------------------------------------------------------

QEMU_ORDER = ("undefined", "created", "running", "paused", "ready", "standby", "waiting",
              "pending", "aborting", "concluded", "null")

#                                U  C  R  P  Y  S  W  D  X  E  N
QEMU_STT: dict[str, tuple[int, ...]] = {
    "undefined": (0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "created": (0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1),
    "running": (0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0),
    "paused": (0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0),
    "ready": (0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0),
    "standby": (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "waiting": (0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0),
    "pending": (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0),
    "aborting": (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0),
    "concluded": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1),
    "null": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
}

#                                U  C  R  P  Y  S  W  D  X  E  N
QEMU_VERBS: dict[str, tuple[int, ...]] = {
    "cancel": (0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    "pause": (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "resume": (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "set-speed": (0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "complete": (0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0),
    "finalize": (0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0),
    "dismiss": (0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0),
}

def _qemu_stt(old: str, new: str) -> bool:
    return bool(QEMU_STT[old][QEMU_ORDER.index(new)])


def _qemu_verb(verb: str, status: str) -> bool:
    return bool(QEMU_VERBS[verb][QEMU_ORDER.index(status)])


def _verb_params() -> list[Any]:
    return [pytest.param(verb, status, id=f"{verb}-in-{status}")
            for verb in QEMU_VERBS for status in QEMU_ORDER]


def test_status_and_verb_names_are_qemus() -> None:
    assert [status.value for status in JobStatus] == list(QEMU_ORDER)
    assert {verb.value for verb in JobVerb} == set(QEMU_VERBS)
    assert set(TRANSITIONS) == set(JobStatus)
    assert set(VERBS) == set(JobVerb)


@pytest.mark.parametrize(
    ("old", "new"),
    [pytest.param(o, n, id=f"{o}-to-{n}") for o in QEMU_ORDER for n in QEMU_ORDER],
)
def test_transition_table_matches_qemu(old: str, new: str) -> None:
    expected = _qemu_stt(old, new)
    assert (JobStatus(new) in TRANSITIONS[JobStatus(old)]) is expected
    if expected:
        check_transition(JobStatus(old), JobStatus(new))
    else:
        with pytest.raises(AssertionError, match=f"illegal job transition {old} -> {new}"):
            check_transition(JobStatus(old), JobStatus(new))


@pytest.mark.parametrize(("verb", "status"), _verb_params())
def test_verb_table_matches_qemu(verb: str, status: str) -> None:
    expected = _qemu_verb(verb, status)
    assert (JobStatus(status) in VERBS[JobVerb(verb)]) is expected
    if expected:
        check_verb("job0", JobStatus(status), JobVerb(verb))
    else:
        with pytest.raises(GenericError):
            check_verb("job0", JobStatus(status), JobVerb(verb))


def test_check_verb_message_names_job_state_and_verb() -> None:
    refused = 0
    for verb in JobVerb:
        for status in JobStatus:
            if status in VERBS[verb]:
                continue
            with pytest.raises(GenericError) as info:
                check_verb("backup-7", status, verb)
            assert str(info.value) == (
                f"Job 'backup-7' in state '{status.value}' cannot accept command verb "
                f"'{verb.value}'"
            )
            assert info.value.qmp_class == "GenericError"
            refused += 1
    assert refused > 40  # most pairs are refused; the message was checked for each


# --------------------------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------------------------


class Rig:
    """A Storage with one qcow2 disk on device ``virtio0`` and an event log."""

    def __init__(self, tmp: Path, size: int, fill: bool) -> None:
        self.tmp = tmp
        self.size = size
        self.src = str(tmp / "src.qcow2")
        create(self.src, size)
        self.storage = Storage()
        self.log = EventLog()
        self.storage.subscribe(self.log)
        self.storage.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "disk0",
            "file": {"driver": "file", "filename": self.src},
        })
        self.storage.execute("device_add",
                             {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
        if fill:
            chunk = bytes(range(256)) * (4 * MiB // 256)
            device = self.storage.device("virtio0")
            for offset in range(0, size, len(chunk)):
                device.pwrite(offset, chunk[: min(len(chunk), size - offset)])

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.storage.execute(name, arguments)

    def backup(self, job_id: str, sync: str = "full", speed: int | None = None,
               options: dict[str, Any] | None = None) -> Job:
        """Start a drive-backup of virtio0 into a new qcow2 file; returns the job."""
        arguments: dict[str, Any] = {
            "device": "virtio0", "job-id": job_id, "sync": sync, "format": "qcow2",
            "target": str(self.tmp / f"{job_id}.qcow2"), **(options or {}),
        }
        if speed is not None:
            arguments["speed"] = speed
        self.execute("drive-backup", arguments)
        return self.storage.jobs[job_id]

    def job_info(self, job_id: str) -> dict[str, Any]:
        for info in self.execute("query-block-jobs"):
            if info["device"] == job_id:
                return dict(info)
        pytest.fail(f"job {job_id!r} not in query-block-jobs")

    def jobs(self) -> dict[str, str]:
        return {info["id"]: info["status"] for info in self.execute("query-jobs")}

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(size: int = 64 * MiB, fill: bool = True) -> Rig:
        rig = Rig(tmp_path, size, fill)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_successful_job_goes_through_qemus_statuses(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=4 * MiB)
    rig.backup("j")
    done = rig.log.wait("BLOCK_JOB_COMPLETED", device="j")
    assert "error" not in done
    assert done == {"type": "backup", "device": "j", "len": 4 * MiB, "offset": 4 * MiB,
                    "speed": 0}
    rig.log.wait_status("j", "null")
    assert rig.log.statuses("j") == ["created", "running", "waiting", "pending", "concluded",
                                     "null"]
    assert rig.jobs() == {}


def test_cancelled_job_goes_through_aborting(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=4 * MiB)
    rig.backup("j", sync="none")
    assert rig.job_info("j")["status"] == "running"
    rig.execute("block-job-cancel", {"device": "j"})
    cancelled = rig.log.wait("BLOCK_JOB_CANCELLED", device="j")
    assert cancelled["type"] == "backup" and cancelled["len"] == 4 * MiB
    rig.log.wait_status("j", "null")
    assert rig.log.statuses("j") == ["created", "running", "aborting", "concluded", "null"]
    assert "BLOCK_JOB_COMPLETED" not in rig.log.names()


def test_pause_freezes_offset_and_resume_moves_it(rig_factory: Callable[..., Rig]) -> None:
    """At 16 MiB/s the job reaches a pause point at least once a second."""
    rig = rig_factory()
    job = rig.backup("j", speed=16 * MiB)
    assert wait_until(lambda: job.offset > 0, WAIT)
    rig.execute("block-job-pause", {"device": "j"})
    rig.log.wait_status("j", "paused", timeout=5)
    info = rig.job_info("j")
    assert info["paused"] is True and info["status"] == "paused" and info["busy"] is False
    first = job.offset
    time.sleep(0.3)
    second = job.offset
    assert first == second < job.len
    assert rig.job_info("j")["offset"] == first
    with pytest.raises(GenericError):
        rig.execute("block-job-pause", {"device": "j"})  # already paused
    rig.execute("block-job-resume", {"device": "j"})
    assert wait_until(lambda: job.offset > first, 5), "offset did not move after resume"
    assert rig.job_info("j")["paused"] is False
    rig.execute("block-job-cancel", {"device": "j"})
    rig.log.wait("BLOCK_JOB_CANCELLED", device="j")


def test_job_pause_and_resume_verbs(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=8 * MiB)
    rig.backup("j", sync="none")
    rig.execute("job-pause", {"id": "j"})
    rig.log.wait_status("j", "paused", timeout=5)
    assert rig.jobs() == {"j": "paused"}
    rig.execute("job-resume", {"id": "j"})
    rig.log.wait("JOB_STATUS_CHANGE", id="j", status="running")
    assert wait_until(lambda: rig.jobs() == {"j": "running"}, 5)
    rig.execute("job-cancel", {"id": "j"})
    rig.log.wait("BLOCK_JOB_CANCELLED", device="j")


def test_cancel_of_a_paused_job(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=8 * MiB)
    rig.backup("j", sync="none")
    rig.execute("block-job-pause", {"device": "j"})
    rig.log.wait_status("j", "paused", timeout=5)
    rig.execute("block-job-cancel", {"device": "j"})
    rig.log.wait("BLOCK_JOB_CANCELLED", device="j")
    rig.log.wait_status("j", "null")
    assert rig.jobs() == {}


def test_pause_takes_effect_promptly_at_low_speed(rig_factory: Callable[..., Rig]) -> None:
    """QEMU's rate-limit sleep is a pause point: a pause acts within a fraction of a second."""
    rig = rig_factory()
    job = rig.backup("j", speed=1 * MiB)
    assert wait_until(lambda: job.offset > 0, WAIT)
    rig.execute("block-job-pause", {"device": "j"})
    assert wait_until(lambda: rig.job_info("j")["status"] == "paused", 2.0), (
        f"still {rig.job_info('j')['status']!r} 2 s after block-job-pause"
    )
    frozen = job.offset
    rig.execute("block-job-resume", {"device": "j"})
    assert wait_until(lambda: job.offset > frozen, 3.0), "no progress 3 s after resume"


def test_speed_limit_holds_at_every_moment(rig_factory: Callable[..., Rig]) -> None:
    """``offset`` never runs ahead of ``speed * elapsed`` by more than a few MiB."""
    rig = rig_factory()
    speed = 2 * MiB
    start = time.monotonic()
    job = rig.backup("j", speed=speed)
    worst = 0.0
    while time.monotonic() - start < 1.5:
        ahead = job.offset - speed * (time.monotonic() - start)
        worst = max(worst, ahead)
        time.sleep(0.02)
    assert worst <= 4 * MiB, f"offset ran {worst / MiB:.1f} MiB ahead of the speed limit"


def test_speed_limit_roughly_holds(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=16 * MiB)
    start = time.monotonic()
    rig.backup("j", speed=8 * MiB)
    done = rig.log.wait("BLOCK_JOB_COMPLETED", device="j", timeout=10)
    elapsed = time.monotonic() - start
    assert "error" not in done and done["offset"] == 16 * MiB and done["speed"] == 8 * MiB
    assert elapsed >= 1.5, f"16 MiB at 8 MiB/s took only {elapsed:.2f} s"


def test_set_speed(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=8 * MiB)
    rig.backup("j", sync="none")
    rig.execute("block-job-set-speed", {"device": "j", "speed": 4 * MiB})
    assert rig.job_info("j")["speed"] == 4 * MiB
    with pytest.raises(GenericError, match="Invalid parameter 'speed'"):
        rig.execute("block-job-set-speed", {"device": "j", "speed": -1})
    assert rig.job_info("j")["speed"] == 4 * MiB
    rig.execute("block-job-set-speed", {"device": "j", "speed": 0})
    assert rig.job_info("j")["speed"] == 0


def test_negative_speed_at_start_is_refused_and_leaves_nothing(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    target = tmp_path / "neg.qcow2"
    with pytest.raises(GenericError, match="speed"):
        rig.execute("drive-backup", {"device": "virtio0", "job-id": "j", "sync": "none",
                                     "target": str(target), "format": "qcow2",
                                     "target-id": "pit0", "speed": -1})
    assert rig.jobs() == {}
    assert rig.storage.graph.find("pit0") is None
    assert not target.exists()


def test_resume_of_a_job_that_is_not_paused_fails(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    rig.backup("j", sync="none")
    for command, args in (("block-job-resume", {"device": "j"}), ("job-resume", {"id": "j"})):
        with pytest.raises(GenericError, match="Can't resume a job that was not paused"):
            rig.execute(command, args)
    assert rig.job_info("j")["status"] == "running"


@pytest.mark.parametrize(
    ("command", "args"),
    [("block-job-complete", {"device": "j"}), ("job-complete", {"id": "j"})],
)
def test_complete_on_a_backup_names_state_and_verb(
    rig_factory: Callable[..., Rig], command: str, args: dict[str, Any]
) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    rig.backup("j", sync="none")
    with pytest.raises(GenericError) as info:
        rig.execute(command, args)
    assert str(info.value) == "Job 'j' in state 'running' cannot accept command verb 'complete'"
    assert rig.job_info("j")["status"] == "running"


def test_finalize_and_dismiss_of_a_running_job_name_state_and_verb(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    rig.backup("j", sync="none")
    for command, verb in (("job-finalize", "finalize"), ("job-dismiss", "dismiss"),
                          ("block-job-finalize", "finalize"), ("block-job-dismiss", "dismiss")):
        with pytest.raises(GenericError) as info:
            rig.execute(command, {"id": "j"})
        assert str(info.value) == (
            f"Job 'j' in state 'running' cannot accept command verb '{verb}'"
        )


def test_job_id_in_use_is_refused(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    rig.backup("j", sync="none")
    second = tmp_path / "second.qcow2"
    with pytest.raises(GenericError, match="Job ID 'j' already in use"):
        rig.execute("drive-backup", {"device": "virtio0", "job-id": "j", "sync": "none",
                                     "target": str(second), "format": "qcow2"})
    assert not second.exists()
    with pytest.raises(GenericError, match="Job ID 'j' already in use"):
        rig.execute("block-stream", {"device": "disk0", "job-id": "j"})
    assert list(rig.jobs()) == ["j"]


def test_default_job_id_is_the_device(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    rig.execute("drive-backup", {"device": "virtio0", "sync": "none", "format": "qcow2",
                                 "target": str(tmp_path / "t.qcow2")})
    assert rig.jobs() == {"virtio0": "running"}
    with pytest.raises(GenericError, match="Job ID 'virtio0' already in use"):
        rig.execute("drive-backup", {"device": "virtio0", "sync": "none", "format": "qcow2",
                                     "target": str(tmp_path / "u.qcow2")})


def test_invalid_job_id_is_refused(rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory(size=4 * MiB, fill=False)
    with pytest.raises(GenericError, match="Invalid job ID '#j'"):
        rig.execute("drive-backup", {"device": "virtio0", "job-id": "#j", "sync": "none",
                                     "target": str(tmp_path / "t.qcow2"), "format": "qcow2"})
    assert rig.jobs() == {}


BLOCK_JOB_VERBS: list[tuple[str, dict[str, Any]]] = [
    ("block-job-cancel", {"device": "nope"}),
    ("block-job-pause", {"device": "nope"}),
    ("block-job-resume", {"device": "nope"}),
    ("block-job-set-speed", {"device": "nope", "speed": 1}),
    ("block-job-complete", {"device": "nope"}),
    ("block-job-finalize", {"id": "nope"}),
    ("block-job-dismiss", {"id": "nope"}),
]
JOB_VERBS = ["job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize",
             "job-dismiss"]


@pytest.mark.parametrize(("command", "args"), BLOCK_JOB_VERBS, ids=[c for c, _ in BLOCK_JOB_VERBS])
def test_block_job_not_found_is_device_not_active(command: str, args: dict[str, Any]) -> None:
    with Storage() as storage, pytest.raises(DeviceNotActive) as info:
        storage.execute(command, args)
    assert str(info.value) == "Block job 'nope' not found"
    assert info.value.qmp_class == "DeviceNotActive"


@pytest.mark.parametrize("command", JOB_VERBS)
def test_job_not_found_is_generic_error(command: str) -> None:
    with Storage() as storage, pytest.raises(QMPError) as info:
        storage.execute(command, {"id": "nope"})
    assert type(info.value) is GenericError
    assert info.value.qmp_class == "GenericError"
    assert str(info.value) == "Job not found"


@pytest.mark.parametrize("finalize", ["job-finalize", "block-job-finalize"])
def test_manual_finalize_waits_in_pending(rig_factory: Callable[..., Rig], finalize: str) -> None:
    rig = rig_factory(size=4 * MiB)
    job = rig.backup("j", options={"auto-finalize": False})
    rig.log.wait("BLOCK_JOB_PENDING", id="j")
    assert rig.log.data("BLOCK_JOB_PENDING") == [{"type": "backup", "id": "j"}]
    time.sleep(0.3)
    assert job.status is JobStatus.PENDING
    assert rig.jobs() == {"j": "pending"}
    assert rig.job_info("j")["auto-finalize"] is False
    assert "BLOCK_JOB_COMPLETED" not in rig.log.names()
    with pytest.raises(GenericError, match="in state 'pending' cannot accept command verb "
                                           "'dismiss'"):
        rig.execute("job-dismiss", {"id": "j"})
    rig.execute(finalize, {"id": "j"})
    done = rig.log.wait("BLOCK_JOB_COMPLETED", device="j")
    assert "error" not in done
    rig.log.wait_status("j", "null")
    assert rig.log.statuses("j") == ["created", "running", "waiting", "pending", "concluded",
                                     "null"]
    assert rig.jobs() == {}


def test_cancel_in_pending_aborts(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=4 * MiB)
    rig.backup("j", options={"auto-finalize": False})
    rig.log.wait_status("j", "pending")
    rig.execute("block-job-cancel", {"device": "j"})
    rig.log.wait("BLOCK_JOB_CANCELLED", device="j")
    rig.log.wait_status("j", "null")
    assert rig.log.statuses("j")[-4:] == ["pending", "aborting", "concluded", "null"]
    assert "BLOCK_JOB_COMPLETED" not in rig.log.names()


@pytest.mark.parametrize("dismiss", ["job-dismiss", "block-job-dismiss"])
def test_manual_dismiss_stays_concluded(rig_factory: Callable[..., Rig], dismiss: str) -> None:
    rig = rig_factory(size=4 * MiB)
    rig.backup("j", options={"auto-dismiss": False})
    rig.log.wait("BLOCK_JOB_COMPLETED", device="j")
    rig.log.wait_status("j", "concluded")
    time.sleep(0.2)
    assert rig.jobs() == {"j": "concluded"}
    info = rig.job_info("j")
    assert info["status"] == "concluded" and info["auto-dismiss"] is False
    assert info["offset"] == info["len"] == 4 * MiB
    for verb, command in (("cancel", "job-cancel"), ("pause", "job-pause"),
                          ("finalize", "job-finalize")):
        with pytest.raises(GenericError,
                           match=f"in state 'concluded' cannot accept command verb '{verb}'"):
            rig.execute(command, {"id": "j"})
    with pytest.raises(GenericError, match="Job ID 'j' already in use"):
        rig.backup("j")
    rig.execute(dismiss, {"id": "j"})
    rig.log.wait_status("j", "null")
    assert rig.jobs() == {}
    rig.backup("j", sync="none")  # the id is free again
    assert rig.jobs() == {"j": "running"}


def _add_failing_target(rig: Rig, tmp_path: Path, rule: dict[str, Any]) -> None:
    """A raw target ``tgt`` under blkdebug that fails writes as ``rule`` says."""
    raw = tmp_path / "tgt.raw"
    with open(raw, "wb") as f:
        f.truncate(rig.size)
    rig.execute("blockdev-add", {
        "driver": "raw", "node-name": "tgt",
        "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": str(raw)},
                 "inject-error": [{"event": "write_aio", **rule}]},
    })


def test_target_error_with_report_fails_the_job(rig_factory: Callable[..., Rig],
                                                tmp_path: Path) -> None:
    """on-target-error=report: BLOCK_JOB_ERROR, then BLOCK_JOB_COMPLETED with the error."""
    rig = rig_factory(size=4 * MiB)
    _add_failing_target(rig, tmp_path, {"errno": 5})
    rig.execute("blockdev-backup", {"device": "virtio0", "target": "tgt", "sync": "full",
                                    "job-id": "j", "auto-dismiss": False})
    error = rig.log.wait("BLOCK_JOB_ERROR", device="j")
    assert error == {"device": "j", "operation": "write", "action": "report"}
    done = rig.log.wait("BLOCK_JOB_COMPLETED", device="j")
    assert done["error"]
    rig.log.wait_status("j", "concluded")
    assert rig.log.statuses("j") == ["created", "running", "aborting", "concluded"]
    (job,) = rig.execute("query-jobs")
    assert job["status"] == "concluded" and job["error"] == done["error"]
    assert rig.job_info("j")["io-status"] == "failed"
    rig.execute("job-dismiss", {"id": "j"})
    rig.execute("blockdev-del", {"node-name": "tgt"})  # the job let go of it


def test_target_error_with_stop_pauses_until_resume(rig_factory: Callable[..., Rig],
                                                    tmp_path: Path) -> None:
    """on-target-error=stop: the job pauses with io-status failed; resume retries the copy."""
    rig = rig_factory(size=4 * MiB)
    _add_failing_target(rig, tmp_path, {"errno": 5, "once": True})
    rig.execute("blockdev-backup", {"device": "virtio0", "target": "tgt", "sync": "full",
                                    "job-id": "j", "on-target-error": "stop"})
    error = rig.log.wait("BLOCK_JOB_ERROR", device="j")
    assert error == {"device": "j", "operation": "write", "action": "stop"}
    rig.log.wait_status("j", "paused")
    info = rig.job_info("j")
    assert info["io-status"] == "failed" and info["paused"] is True
    rig.execute("block-job-resume", {"device": "j"})
    done = rig.log.wait("BLOCK_JOB_COMPLETED", device="j")
    assert "error" not in done and done["offset"] == 4 * MiB
    device = rig.storage.device("virtio0")
    assert rig.storage.graph.get("tgt").pread(0, 4 * MiB) == device.pread(0, 4 * MiB)


def test_no_pending_event_with_auto_finalize(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=4 * MiB)
    rig.backup("j")
    rig.log.wait_status("j", "null")
    assert "pending" in rig.log.statuses("j")
    assert "BLOCK_JOB_PENDING" not in rig.log.names()


def test_cancel_racing_auto_finalize_ends_the_job_once(
    rig_factory: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QMP cancel may arrive in the short window where an auto-finalizing job is pending.

    A subscriber holds the job's thread in that window (as a slow event consumer, or the
    scheduler, may) until the cancel returned: the job must then end exactly once.
    """
    crashes: list[BaseException] = []

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            crashes.append(args.exc_value)

    monkeypatch.setattr(threading, "excepthook", hook)
    rig = rig_factory(size=1 * MiB)
    in_pending = threading.Event()
    cancel_returned = threading.Event()

    def hold_in_pending(event: Event) -> None:
        data = event.get("data") or {}
        if event["event"] == "JOB_STATUS_CHANGE" and data.get("status") == "pending":
            in_pending.set()
            cancel_returned.wait(2.0)

    rig.storage.subscribe(hold_in_pending)
    job = rig.backup("j")
    assert in_pending.wait(WAIT)
    try:
        rig.execute("block-job-cancel", {"device": "j"})
    except GenericError:
        pass  # refusing the cancel would be fine too
    finally:
        cancel_returned.set()
    job.join(WAIT)
    time.sleep(0.1)
    terminal = [n for n in rig.log.names() if n in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")]
    assert crashes == []
    assert len(terminal) == 1, f"terminal events: {terminal}"


def test_storage_close_cancels_jobs_and_waits(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(size=8 * MiB)
    job = rig.backup("j", sync="none")
    paused = rig.backup("k", sync="full", speed=1)
    rig.execute("block-job-pause", {"device": "k"})
    start = time.monotonic()
    rig.close()
    assert time.monotonic() - start < 5
    assert {d["device"] for d in rig.log.data("BLOCK_JOB_CANCELLED")} == {"j", "k"}
    assert job.status is JobStatus.NULL and paused.status is JobStatus.NULL
    assert rig.storage.jobs == {}
    assert os.path.exists(rig.src)
