"""The backup job's parallel copy (QEMU's ``x-perf.max-workers``), and the behaviour it keeps.

What is tested (through ``Storage.execute``, as a harness drives it; raw images under
``blkdebug`` where a request must fail):

- **x-perf is validated as QEMU does**: ``max-workers`` from 1 to INT_MAX, ``max-chunk`` zero
  (no limit) or at least the job's cluster size, both integers; a refused job leaves no job,
  no filter and no node in use.
- **The copies overlap**: with ``max-workers`` 4 the target sees two copies in flight at once
  (each copy's write waits at a barrier for a second one); with ``max-workers`` 1 it never does.
- **The error policies keep their meaning** with 1 and 4 workers, for a failing target and a
  failing source: ``report`` fails the job with exactly one ``BLOCK_JOB_ERROR`` even when
  several pieces fail at once (the first error wins, the other workers stop); ``stop`` pauses
  the job until resumed, then the copy is retried and the target is whole; ``ignore`` goes on;
  ``enospc`` stops on ENOSPC and reports anything else.
- **Cancel mid-copy** ends with ``BLOCK_JOB_CANCELLED``, part of the image copied; **pause**
  holds every worker (no progress while paused).
- **Progress reaches len**, the target equals the source, for sync=full (data and zero ranges),
  sync=bitmap and sync=incremental, with guest writes during the copy keeping the point in
  time; under a speed limit the job still takes as long as the limit says.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleece.block.cbw import CopyBeforeWrite
from fleece.errors import GenericError
from fleece.jobs.backup import BackupJob
from fleece.storage import Storage
from tests.events import EventLog

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
CLUSTER = 64 << 10
SIZE = 16 * MiB
INT_MAX = 2**31 - 1


class Rig:
    """A raw source ``src`` (data in its even MiBs, zeroes elsewhere) on device virtio0, maybe
    under blkdebug, and a raw target ``tgt`` of the same size, maybe under blkdebug."""

    def __init__(self, tmp: Path, size: int = SIZE, *,
                 source_rules: list[dict[str, Any]] | None = None,
                 target_rules: list[dict[str, Any]] | None = None) -> None:
        self.tmp = tmp
        self.size = size
        self.storage = Storage()
        self.log = EventLog()
        self.storage.subscribe(self.log)
        rng = random.Random(1)
        src = tmp / "src.raw"
        with src.open("wb") as f:
            f.truncate(size)
            for offset in range(0, size, 2 * MiB):
                f.seek(offset)
                f.write(rng.randbytes(MiB))
        tgt = tmp / "tgt.raw"
        with tgt.open("wb") as f:
            f.truncate(size)
        self.execute("blockdev-add", {"driver": "raw", "node-name": "src",
                                      "file": self._file(src, source_rules)})
        self.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                      "file": self._file(tgt, target_rules)})
        self.execute("device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "src"})
        self.device = self.storage.device("virtio0")

    @staticmethod
    def _file(path: Path, rules: list[dict[str, Any]] | None) -> dict[str, Any]:
        image = {"driver": "file", "filename": str(path)}
        if rules is None:
            return image
        return {"driver": "blkdebug", "image": image, "inject-error": rules}

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return self.storage.execute(command, args or {})

    def backup(self, workers: int | None = None, **extra: Any) -> BackupJob:
        args: dict[str, Any] = {"device": "src", "target": "tgt", "sync": "full",
                                "job-id": "j", **extra}
        if workers is not None:
            args["x-perf"] = {**args.get("x-perf", {}), "max-workers": workers}
        self.execute("blockdev-backup", args)
        job = self.storage.jobs["j"]
        assert isinstance(job, BackupJob)
        return job

    def done(self) -> dict[str, Any]:
        return self.log.wait("BLOCK_JOB_COMPLETED", device="j")

    def target_equals(self, expected: bytes) -> bool:
        return bool(self.storage.graph.get("tgt").pread(0, self.size) == expected)

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def tmp_rig(tmp_path: Path) -> Iterator[list[Rig]]:
    rigs: list[Rig] = []
    yield rigs
    for rig in rigs:
        rig.close()


def make(rigs: list[Rig], tmp: Path, **kwargs: Any) -> Rig:
    rig = Rig(tmp, **kwargs)
    rigs.append(rig)
    return rig


# --------------------------------------------------------------------------------------------
# x-perf
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("perf", "message"), [
    ({"max-workers": 0}, f"max-workers must be between 1 and {INT_MAX}"),
    ({"max-workers": INT_MAX + 1}, f"max-workers must be between 1 and {INT_MAX}"),
    ({"max-workers": "4"}, "'x-perf.max-workers'"),
    ({"max-workers": True}, "'x-perf.max-workers'"),
    ({"max-chunk": -1}, "max-chunk must be zero \\(which means no limit\\) or positive"),
    ({"max-chunk": 4096}, f"Required max-chunk \\(4096\\) is less than backup cluster size "
                          f"\\({CLUSTER}\\)"),
    ({"max-chunk": 1.5}, "'x-perf.max-chunk'"),
])
def test_x_perf_is_validated_as_qemu_does(tmp_rig: list[Rig], tmp_path: Path,
                                          perf: dict[str, Any], message: str) -> None:
    rig = make(tmp_rig, tmp_path)
    with pytest.raises(GenericError, match=message):
        rig.execute("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full",
                                        "job-id": "j", "x-perf": perf})
    assert rig.execute("query-block-jobs") == []
    # nothing left behind: the same nodes take a backup at once
    rig.execute("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full",
                                    "job-id": "j", "x-perf": {"max-workers": INT_MAX,
                                                              "max-chunk": CLUSTER,
                                                              "use-copy-range": False}})
    assert "error" not in rig.done()


# --------------------------------------------------------------------------------------------
# The copies overlap
# --------------------------------------------------------------------------------------------

def _max_in_flight(monkeypatch: pytest.MonkeyPatch, rendezvous: bool) -> list[int]:
    """Count the job's copies (runs of clusters) in flight; with ``rendezvous`` each also waits
    (up to 5 s) until a second one is in flight."""
    state = {"now": 0, "max": 0}
    lock = threading.Condition()
    original = CopyBeforeWrite._copy_run
    seen: list[int] = []

    def copy_run(self: CopyBeforeWrite, first: int, count: int) -> int:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            lock.notify_all()
            if rendezvous:
                lock.wait_for(lambda: state["max"] >= 2, 5)
        try:
            if not rendezvous:
                time.sleep(0.002)  # give a second copy a chance to overlap
            return original(self, first, count)
        finally:
            with lock:
                state["now"] -= 1
                seen.append(state["max"])

    monkeypatch.setattr(CopyBeforeWrite, "_copy_run", copy_run)
    return seen


def test_copies_really_overlap(tmp_rig: list[Rig], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make(tmp_rig, tmp_path)
    expected = rig.device.pread(0, rig.size)
    seen = _max_in_flight(monkeypatch, rendezvous=True)
    start = time.monotonic()
    rig.backup(workers=4)
    assert "error" not in rig.done()
    assert max(seen) >= 2
    assert time.monotonic() - start < 4  # nobody waited out the rendezvous
    assert rig.target_equals(expected)


def test_one_worker_copies_one_piece_at_a_time(tmp_rig: list[Rig], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make(tmp_rig, tmp_path)
    expected = rig.device.pread(0, rig.size)
    seen = _max_in_flight(monkeypatch, rendezvous=False)
    rig.backup(workers=1)
    assert "error" not in rig.done()
    assert seen and max(seen) == 1
    assert rig.target_equals(expected)


# --------------------------------------------------------------------------------------------
# Error policies
# --------------------------------------------------------------------------------------------

WORKERS = [1, 4]


@pytest.mark.parametrize("workers", WORKERS)
def test_target_error_report_fails_the_job_once(tmp_rig: list[Rig], tmp_path: Path,
                                                workers: int) -> None:
    """Two pieces far apart fail every time: one BLOCK_JOB_ERROR, the job fails."""
    rules = [{"event": "write_aio", "errno": 5, "sector": 0},
             {"event": "write_aio", "errno": 5, "sector": (8 * MiB) // 512}]
    rig = make(tmp_rig, tmp_path, target_rules=rules)
    rig.backup(workers, **{"auto-dismiss": False})
    done = rig.done()
    assert done["error"]
    assert rig.log.data("BLOCK_JOB_ERROR") == [{"device": "j", "operation": "write",
                                                "action": "report"}]
    rig.log.wait_status("j", "concluded")
    (info,) = rig.execute("query-block-jobs")
    assert info["io-status"] == "failed"
    rig.execute("job-dismiss", {"id": "j"})
    rig.execute("blockdev-del", {"node-name": "tgt"})  # the job let go of it


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize(("side", "operation"), [("target", "write"), ("source", "read")])
def test_stop_pauses_and_resume_retries(tmp_rig: list[Rig], tmp_path: Path, workers: int,
                                        side: str, operation: str) -> None:
    event = "write_aio" if side == "target" else "read_aio"
    rule = [{"event": event, "errno": 5, "once": True, "sector": (4 * MiB + 8192) // 512}]
    rig = make(tmp_rig, tmp_path, **{f"{side}_rules": rule})
    expected = rig.device.pread(0, rig.size) if side == "target" else None
    rig.backup(workers, **{f"on-{side}-error": "stop"})
    error = rig.log.wait("BLOCK_JOB_ERROR", device="j")
    assert error == {"device": "j", "operation": operation, "action": "stop"}
    rig.log.wait_status("j", "paused")
    (info,) = rig.execute("query-block-jobs")
    assert info["io-status"] == "failed" and info["paused"] is True
    offset = info["offset"]
    time.sleep(0.1)
    assert rig.execute("query-block-jobs")[0]["offset"] == offset  # every worker holds
    rig.execute("block-job-resume", {"device": "j"})
    done = rig.done()
    assert "error" not in done and done["offset"] == done["len"] == rig.size
    assert len(rig.log.data("BLOCK_JOB_ERROR")) == 1
    if expected is None:
        expected = rig.device.pread(0, rig.size)
    assert rig.target_equals(expected)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize(("side", "operation"), [("target", "write"), ("source", "read")])
def test_ignore_goes_on(tmp_rig: list[Rig], tmp_path: Path, workers: int, side: str,
                        operation: str) -> None:
    event = "write_aio" if side == "target" else "read_aio"
    rule = [{"event": event, "errno": 5, "once": True, "sector": (4 * MiB) // 512}]
    rig = make(tmp_rig, tmp_path, **{f"{side}_rules": rule})
    expected = rig.device.pread(0, rig.size) if side == "target" else bytes(0)
    rig.backup(workers, **{f"on-{side}-error": "ignore"})
    done = rig.done()
    assert "error" not in done and done["offset"] == done["len"] == rig.size
    assert rig.log.data("BLOCK_JOB_ERROR") == [{"device": "j", "operation": operation,
                                                "action": "ignore"}]
    if side == "target":
        tgt = rig.storage.graph.get("tgt")
        # what comes before the piece that failed (at 4 MiB, data) reached the target, and,
        # since the job copies in pieces, what comes after it too: ignore skips the piece that
        # failed (as QEMU's block-copy skips one task), no longer the rest of a 16 MiB chunk
        assert tgt.pread(0, 4 * MiB) == expected[: 4 * MiB]
        assert tgt.pread(8 * MiB, 8 * MiB) == expected[8 * MiB:]


@pytest.mark.parametrize("workers", WORKERS)
def test_enospc_stops_on_enospc_and_reports_the_rest(tmp_rig: list[Rig], tmp_path: Path,
                                                     workers: int) -> None:
    rule = [{"event": "write_aio", "errno": 28, "once": True, "sector": (6 * MiB + 8192) // 512}]
    rig = make(tmp_rig, tmp_path, target_rules=rule)
    expected = rig.device.pread(0, rig.size)
    rig.backup(workers, **{"on-target-error": "enospc"})
    assert rig.log.wait("BLOCK_JOB_ERROR", device="j")["action"] == "stop"
    rig.log.wait_status("j", "paused")
    assert rig.execute("query-block-jobs")[0]["io-status"] == "nospace"
    rig.execute("block-job-resume", {"device": "j"})
    assert "error" not in rig.done()
    assert rig.target_equals(expected)


@pytest.mark.parametrize("workers", WORKERS)
def test_enospc_reports_other_errors(tmp_rig: list[Rig], tmp_path: Path, workers: int) -> None:
    rule = [{"event": "write_aio", "errno": 5, "sector": (6 * MiB + 8192) // 512}]
    rig = make(tmp_rig, tmp_path, target_rules=rule)
    rig.backup(workers, **{"on-target-error": "enospc"})
    assert rig.done()["error"]
    assert [e["action"] for e in rig.log.data("BLOCK_JOB_ERROR")] == ["report"]


# --------------------------------------------------------------------------------------------
# Cancel, pause, progress, speed
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", WORKERS)
def test_cancel_mid_copy(tmp_rig: list[Rig], tmp_path: Path, workers: int) -> None:
    rig = make(tmp_rig, tmp_path)
    rig.backup(workers, speed=8 * MiB)
    deadline = time.monotonic() + 5
    while rig.execute("query-block-jobs")[0]["offset"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rig.execute("block-job-cancel", {"device": "j"})
    cancelled = rig.log.wait("BLOCK_JOB_CANCELLED", device="j")
    assert 0 < cancelled["offset"] < rig.size
    assert rig.execute("query-block-jobs") == []
    rig.execute("blockdev-del", {"node-name": "tgt"})


@pytest.mark.parametrize("workers", WORKERS)
def test_pause_holds_every_worker(tmp_rig: list[Rig], tmp_path: Path, workers: int) -> None:
    rig = make(tmp_rig, tmp_path)
    expected = rig.device.pread(0, rig.size)
    rig.backup(workers, speed=16 * MiB)
    rig.execute("block-job-pause", {"device": "j"})
    rig.log.wait_status("j", "paused")
    offset = rig.execute("query-block-jobs")[0]["offset"]
    time.sleep(0.2)
    assert rig.execute("query-block-jobs")[0]["offset"] == offset
    rig.execute("block-job-set-speed", {"device": "j", "speed": 0})
    rig.execute("block-job-resume", {"device": "j"})
    done = rig.done()
    assert done["offset"] == rig.size
    assert rig.target_equals(expected)


@pytest.mark.parametrize("workers", WORKERS)
def test_speed_limit_still_holds(tmp_rig: list[Rig], tmp_path: Path, workers: int) -> None:
    rig = make(tmp_rig, tmp_path, size=4 * MiB)
    start = time.monotonic()
    rig.backup(workers, speed=8 * MiB)
    assert rig.done()["offset"] == 4 * MiB
    assert time.monotonic() - start >= 0.3  # 4 MiB at 8 MiB/s, less the first quarter second


class Guest:
    """Random 4 KiB writes through virtio0 until stopped."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rng = random.Random(3)
        try:
            while not self.stop.is_set():
                self.rig.device.pwrite(rng.randrange(self.rig.size // 4096) * 4096,
                                       rng.randbytes(4096))
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Guest:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.errors, self.errors


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_full_reaches_len_at_the_point_in_time(tmp_rig: list[Rig], tmp_path: Path,
                                               workers: int) -> None:
    rig = make(tmp_rig, tmp_path)
    expected = rig.device.pread(0, rig.size)
    rig.backup(workers, **{"x-perf": {"max-chunk": 256 << 10}})
    with Guest(rig):  # from the point in time on
        done = rig.done()
    assert "error" not in done and done["offset"] == done["len"] == rig.size
    assert rig.target_equals(expected)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("sync", ["bitmap", "incremental"])
def test_bitmap_copies_the_dirty_clusters(tmp_rig: list[Rig], tmp_path: Path, workers: int,
                                          sync: str) -> None:
    rig = make(tmp_rig, tmp_path)
    rig.execute("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    dirty = [(MiB + 4096, 100), (5 * MiB, 3 * MiB), (15 * MiB, MiB)]
    for offset, length in dirty:
        rig.device.pwrite(offset, b"\x5a" * length)
    expected = rig.device.pread(0, rig.size)
    mode = {"bitmap-mode": "on-success"} if sync == "bitmap" else {}
    rig.backup(workers, sync=sync, bitmap="b0", **mode)
    with Guest(rig):  # from the point in time on
        done = rig.done()
    assert "error" not in done and done["offset"] == done["len"]
    tgt = rig.storage.graph.get("tgt")
    for offset, length in dirty:
        lo = offset // CLUSTER * CLUSTER
        hi = -(-(offset + length) // CLUSTER) * CLUSTER
        assert tgt.pread(lo, hi - lo) == expected[lo:hi]
    assert tgt.pread(3 * MiB, MiB) == bytes(MiB)  # clean: not copied


def test_the_target_is_flushed_when_it_closes_not_before_the_job_completes(
        tmp_rig: list[Rig], tmp_path: Path, file_syscalls: list[tuple[str, int]]) -> None:
    """As in QEMU, a backup's end does not wait for the target's cache to reach its disk
    (for a push, the remote server's fdatasync of everything sent): the target is flushed
    when its last user lets go of it (here ``blockdev-del``), after BLOCK_JOB_COMPLETED."""
    rig = make(tmp_rig, tmp_path)
    target_file = rig.storage.graph.get("tgt").file_child()
    assert target_file is not None
    synced = ("fdatasync", target_file.driver.fd)  # type: ignore[attr-defined]
    calls_at_the_event: list[tuple[str, int]] = []
    rig.storage.subscribe(lambda event: calls_at_the_event.extend(file_syscalls)
                          if event["event"] == "BLOCK_JOB_COMPLETED" else None)
    expected = rig.device.pread(0, rig.size)
    rig.backup(4)
    assert "error" not in rig.done()
    assert synced not in calls_at_the_event
    assert rig.target_equals(expected)
    rig.execute("blockdev-del", {"node-name": "tgt"})
    assert synced in file_syscalls
