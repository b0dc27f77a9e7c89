"""QEMU's job state machine as two tables: status x status, and verb x status.

A transition not in :data:`TRANSITIONS` is a bug in fleece (``AssertionError``); a verb not in
:data:`VERBS` for the job's status is the user's mistake and raises ``GenericError`` naming the
job, its status and the verb, in QEMU's words.
"""

from __future__ import annotations

import enum

from fleece.errors import GenericError


class JobStatus(enum.Enum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(enum.Enum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus
V = JobVerb
_ORDER = (S.UNDEFINED, S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING,
          S.ABORTING, S.CONCLUDED, S.NULL)


def _row(bits: str) -> frozenset[JobStatus]:
    """One row of a table, written as QEMU writes it: a 0/1 per status in ``_ORDER``."""
    flags = bits.split()
    assert len(flags) == len(_ORDER)
    return frozenset(status for status, flag in zip(_ORDER, flags, strict=True) if flag == "1")


#: from status -> the statuses it may move to          U C R P Y S W D X E N
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: _row("                                   0 1 0 0 0 0 0 0 0 0 0"),
    S.CREATED: _row("                                     0 0 1 0 0 0 0 0 1 0 1"),
    S.RUNNING: _row("                                     0 0 0 1 1 0 1 0 1 0 0"),
    S.PAUSED: _row("                                      0 0 1 0 0 0 0 0 0 0 0"),
    S.READY: _row("                                       0 0 0 0 0 1 1 0 1 0 0"),
    S.STANDBY: _row("                                     0 0 0 0 1 0 0 0 0 0 0"),
    S.WAITING: _row("                                     0 0 0 0 0 0 0 1 1 0 0"),
    S.PENDING: _row("                                     0 0 0 0 0 0 0 0 1 1 0"),
    S.ABORTING: _row("                                    0 0 0 0 0 0 0 0 1 1 0"),
    S.CONCLUDED: _row("                                   0 0 0 0 0 0 0 0 0 0 1"),
    S.NULL: _row("                                        0 0 0 0 0 0 0 0 0 0 0"),
}

#: verb -> the statuses in which a job accepts it     U C R P Y S W D X E N
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    V.CANCEL: _row("                                      0 1 1 1 1 1 1 1 0 0 0"),
    V.PAUSE: _row("                                       0 1 1 1 1 1 0 0 0 0 0"),
    V.RESUME: _row("                                      0 1 1 1 1 1 0 0 0 0 0"),
    V.SET_SPEED: _row("                                   0 1 1 1 1 1 0 0 0 0 0"),
    V.COMPLETE: _row("                                    0 0 0 0 1 1 0 0 0 0 0"),
    V.FINALIZE: _row("                                    0 0 0 0 0 0 0 1 0 0 0"),
    V.DISMISS: _row("                                     0 0 0 0 0 0 0 0 0 1 0"),
}


def check_transition(old: JobStatus, new: JobStatus) -> None:
    """``AssertionError`` if the job state machine has no edge ``old -> new``."""
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"illegal job transition {old.value} -> {new.value}")


def check_verb(job_id: str, status: JobStatus, verb: JobVerb) -> None:
    """``GenericError`` unless a job in ``status`` accepts ``verb``."""
    if status not in VERBS[verb]:
        raise GenericError(
            f"Job '{job_id}' in state '{status.value}' cannot accept command verb "
            f"'{verb.value}'"
        )
