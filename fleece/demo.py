"""``fleece demo``: the main job, end to end, on a built-in sample disk.

1. Make a sample qcow2 disk full of random data (reproducible from ``--seed``).
2. Start the daemon in-process with QMP and NBD sockets in a temporary folder, and plug the disk
   in as device ``virtio0`` over QMP. QMP goes through QEMU's own client library, ``qemu.qmp``
   (its synchronous ``QEMUMonitorProtocol``), as any script driving QEMU would.
3. A synthetic guest writes through the device from two vCPU threads.
4. The original design's two commands, over QMP: ``drive-backup device=virtio0 format=qcow2
   target=pit.qcow2 target-id=pit0 sync=none`` and ``nbd-server-add device=pit0
   writable=false``. The guest is frozen around the first (as a guest agent's fsfreeze would),
   so the point in time is exactly the writes made before it.
5. While the guest keeps writing, read the snapshot over NBD and check it byte for byte against
   the point-in-time content: with fleece's own Python NBD client (the report labels that
   figure so), then with nbdcopy when it is installed (the report says how to install it when
   it is not).
6. Cancel the job and show the export still serving; stop the NBD server and show ``pit0`` gone
   from the graph and the target file kept on disk.

The exit status is 0 only when the snapshot verified.

``fleece demo --push`` shows the other half of fleecing, push backup (QEMU's "push backup with
fleecing", what Proxmox does), on the same sample disk and guest:

1. A backup server on a unix socket in the folder, serving a fresh raw image: ``qemu-nbd`` (with
   ``-e N`` for ``--multi-conn N``) when installed, else (or with ``--push-server fleece``) a
   second ``Storage`` with a writable ``nbd-server-add``.
2. Two guest vCPUs write all over the disk. Frozen for a moment, the filter scheme goes in over
   QMP: ``blockdev-add`` of the fleecing image ``fl-img`` (a sparse raw file), of
   ``copy-before-write fl`` above ``disk0`` with ``target=fl-img``, and of
   ``snapshot-access acc`` over ``fl``. That is the point in time.
3. ``blockdev-add driver=nbd node-name=push server=... multi-conn=N`` and ``blockdev-backup
   device=acc target=push sync=full discard-source=true``, while the guest keeps writing (its
   first write to each cluster copies the old data into ``fl-img``, locally), until
   ``BLOCK_JOB_COMPLETED``.
4. The check: the backup server's image equals the point-in-time content byte for byte, and the
   live disk equals the guest's writes. The report gives the push's rate and connections, what
   the guest wrote meanwhile, and what ``discard-source`` left of the fleecing image.

Its exit status is 0 only when the pushed image verified.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol
from tqdm import tqdm

from fleece.block.qcow2 import create
from fleece.daemon import DaemonConfig, DaemonThread
from fleece.nbd.client import NBDClient
from fleece.storage import Storage
from fleece.units import format_size

CHUNK = 4 << 20  # the unit of sample data generation and of snapshot reads
WRITE = 64 * 1024  # the guest writes 64 KiB at a time
QMP_TIMEOUT = 60.0  # seconds for a QMP command or an awaited event
REQUEST_TIMEOUT = 10  # --push: a server silent this long fails the request, not the demo
NBDCOPY_MISSING = "nbdcopy not installed, skipped (apt-get install libnbd-bin)"


def _chunk(seed: int, index: int) -> bytes:
    """Chunk ``index`` of the sample disk: random, reproducible from the seed."""
    return random.Random(seed * 1_000_003 + index).randbytes(CHUNK)


class Model:
    """What the disk holds: the sample data plus every guest write so far."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.writes: dict[int, bytes] = {}

    def snapshot(self) -> Model:
        frozen = Model(self.size, self.seed)
        frozen.writes = dict(self.writes)
        return frozen

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for index in range(self.size // CHUNK):
            data = bytearray(_chunk(self.seed, index))
            base = index * CHUNK
            for offset in range(base, base + CHUNK, WRITE):
                written = self.writes.get(offset)
                if written is not None:
                    data[offset - base : offset - base + WRITE] = written
            yield base, bytes(data)


def _make_sample_disk(path: Path, size: int, seed: int) -> None:
    """Create the sample disk and fill it, through a ``Storage`` like any user of fleece."""
    create(str(path), size)
    with Storage() as storage:
        storage.execute("blockdev-add", {"driver": "qcow2", "node-name": "sample",
                                         "file": {"driver": "file", "filename": str(path)}})
        storage.execute("device_add", {"driver": "virtio-blk", "id": "sample",
                                       "drive": "sample"})
        disk = storage.device("sample")
        chunks = tqdm(range(size // CHUNK), desc="sample disk", unit="chunk", leave=False,
                      disable=None)
        for index in chunks:
            disk.pwrite(index * CHUNK, _chunk(seed, index))
        disk.flush()


class Guest:
    """A synthetic guest: vCPU threads writing 64 KiB blocks through the device."""

    def __init__(self, device_write: Callable[[int, bytes], None], model: Model, seed: int
                 ) -> None:
        self.write = device_write
        self.model = model
        self.rng = random.Random(seed)
        self.freeze = threading.Lock()  # held by the demo around the snapshot command
        self.stop = threading.Event()
        self.written = 0
        self._threads: list[threading.Thread] = []
        self._slots = threading.Lock()

    def write_block(self, offset: int, data: bytes) -> None:
        with self.freeze:
            self.write(offset, data)
            with self._slots:
                self.model.writes[offset] = data
                self.written += len(data)

    def burst(self, first: int, count: int) -> float:
        """Write ``count`` sequential blocks from ``first``; returns bytes per second."""
        data = self.rng.randbytes(WRITE)
        start = time.perf_counter()
        for block in range(first, first + count):
            self.write_block(block * WRITE, data)
        return count * WRITE / (time.perf_counter() - start)

    def start_background(self, vcpus: int, first_block: int, blocks: int) -> None:
        def vcpu(index: int) -> None:
            rng = random.Random(self.rng.random() + index)
            while not self.stop.is_set():
                block = first_block + rng.randrange(blocks)
                self.write_block(block * WRITE, rng.randbytes(WRITE))
                time.sleep(0.001)

        for index in range(vcpus):
            thread = threading.Thread(target=vcpu, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()


def _verify_over_nbd(socket_path: str, export: str, frozen: Model) -> tuple[int, float]:
    """Read the whole export and compare with ``frozen``; returns (bad chunks, bytes/s)."""
    bad = 0
    start = time.perf_counter()
    with NBDClient.connect_unix(socket_path, export) as client:
        for offset, want in tqdm(frozen.chunks(), total=frozen.size // CHUNK,
                                 desc="snapshot over NBD", unit="chunk", leave=False, disable=None):
            if client.pread(offset, CHUNK) != want:
                bad += 1
    return bad, frozen.size / (time.perf_counter() - start)


def _verify_with_nbdcopy(socket_path: str, export: str, frozen: Model, work: Path) -> str:
    """Copy the export to a file with nbdcopy and compare digests; the report's line."""
    nbdcopy = shutil.which("nbdcopy")
    if nbdcopy is None:
        return NBDCOPY_MISSING
    out = work / "snapshot-copy.raw"
    start = time.perf_counter()
    proc = subprocess.run([nbdcopy, f"nbd+unix:///{export}?socket={socket_path}", str(out)],
                          capture_output=True, text=True, timeout=600)
    rate = frozen.size / (time.perf_counter() - start)
    if proc.returncode != 0:
        return f"FAILED: {proc.stderr.strip()}"
    want, got = hashlib.sha256(), hashlib.sha256()
    for _, data in frozen.chunks():
        want.update(data)
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            got.update(block)
    out.unlink()
    verdict = "identical (sha256)" if want.digest() == got.digest() else "DIFFERENT"
    return f"{format_size(rate)}/s into a file, {verdict}"


def _execute(qmp: QEMUMonitorProtocol, name: str, arguments: dict[str, Any] | None = None
             ) -> Any:
    """Run a QMP command; its return value. ``qemu.qmp.ExecuteError`` when it fails."""
    return qmp.cmd(name, **(arguments or {}))


def _wait_event(qmp: QEMUMonitorProtocol, name: str) -> dict[str, Any]:
    """The next event ``name`` (those before it are dropped); ``TimeoutError`` after
    ``QMP_TIMEOUT`` seconds."""
    deadline = time.monotonic() + QMP_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {name} event within {QMP_TIMEOUT} s")
        event = qmp.pull_event(wait=remaining)
        if event is not None and event.get("event") == name:
            return event


def run_demo(*, size: int, folder: str | None, seed: int, push: bool = False,
             push_server: str | None = None, multi_conn: int = 1) -> int:
    """Run the demo (``push``: the push backup one, to ``push_server``, ``qemu-nbd`` or
    ``fleece``, None for the first installed, over ``multi_conn`` connections); returns the
    exit status (0 only when the snapshot, or the pushed image, verified)."""
    if size < CHUNK or size % CHUNK:
        print(f"fleece demo: --size must be a multiple of {format_size(CHUNK)}, got {size}")
        return 2
    with tempfile.TemporaryDirectory(prefix="fleece-demo-") as tmp:
        work = Path(folder) if folder else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if push:
            server = push_server or ("qemu-nbd" if shutil.which("qemu-nbd") else "fleece")
            return _run_push(work, size, seed, server, multi_conn)
        return _run(work, size, seed)


def _run(work: Path, size: int, seed: int) -> int:
    disk, target = work / "disk.qcow2", work / "pit.qcow2"
    qmp_path, nbd_path = str(work / "qmp.sock"), str(work / "nbd.sock")
    print(f"fleece demo: a {format_size(size)} sample disk of random data at {disk}")
    _make_sample_disk(disk, size, seed)
    model = Model(size, seed)

    daemon = DaemonThread(DaemonConfig(
        qmp=[f"unix:{qmp_path}"],
        blockdev=[f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}"],
        nbd_server=[f"addr.type=unix,addr.path={nbd_path}"],
    ))
    daemon.start()
    ok = False
    try:
        with QEMUMonitorProtocol(qmp_path, nickname="fleece-demo") as qmp:
            qmp.connect()
            qmp.settimeout(QMP_TIMEOUT)
            ok = _scenario(daemon, qmp, model, work, target, nbd_path)
    finally:
        daemon.stop()
    return 0 if ok else 1


def _scenario(daemon: DaemonThread, qmp: QEMUMonitorProtocol, model: Model, work: Path,
              target: Path, nbd_path: str) -> bool:
    size = model.size
    _execute(qmp, "device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    device = daemon.storage.device("virtio0")
    guest = Guest(device.pwrite, model, model.seed)
    blocks = size // WRITE
    quarter = blocks // 4
    burst = min(quarter, (64 << 20) // WRITE)

    print("fleece demo: the guest writes without copy-before-write")
    plain_rate = guest.burst(0, burst)

    with guest.freeze:  # fsfreeze: no guest write is in flight across the point in time
        _execute(qmp, "drive-backup", {"device": "virtio0", "format": "qcow2",
                                       "target": str(target), "target-id": "pit0",
                                       "sync": "none"})
        frozen = model.snapshot()
    _execute(qmp, "nbd-server-add", {"device": "pit0", "writable": False})
    print("fleece demo: snapshot taken: drive-backup ... target-id=pit0 sync=none, "
          "nbd-server-add device=pit0 writable=false")

    cbw_rate = guest.burst(quarter, burst)  # clusters not copied yet: every write copies first
    guest.start_background(2, 2 * quarter, blocks - 2 * quarter)
    try:
        bad, read_rate = _verify_over_nbd(nbd_path, "pit0", frozen)
        nbdcopy_result = _verify_with_nbdcopy(nbd_path, "pit0", frozen, work)
    finally:
        guest.join()
    job = daemon.storage.jobs.get("virtio0")
    copied = job.cbw.copied_clusters if job is not None and hasattr(job, "cbw") else 0
    cluster = job.cbw.cluster_size if job is not None and hasattr(job, "cbw") else 0

    _execute(qmp, "block-job-cancel", {"device": "virtio0"})
    cancelled = _wait_event(qmp, "BLOCK_JOB_CANCELLED")
    with NBDClient.connect_unix(nbd_path, "pit0") as client:
        still_serving = len(client.pread(0, 4096)) == 4096
    _execute(qmp, "nbd-server-stop")
    nodes = [n["node-name"] for n in _execute(qmp, "query-named-block-nodes")]
    kept = target.exists()
    target_size = os.stat(target).st_blocks * 512 if kept else 0

    print()
    print("fleece demo report")
    print(f"  sample disk                  {format_size(size)} qcow2, random data")
    print(f"  guest writes, plain          {format_size(plain_rate)}/s "
          f"(64 KiB sequential, {format_size(burst * WRITE)})")
    print(f"  guest writes, fleecing       {format_size(cbw_rate)}/s "
          f"(copy-before-write of every cluster; ratio {cbw_rate / plain_rate:.2f})")
    print(f"  guest writes meanwhile       {format_size(guest.written)} in all, from 2 vCPUs")
    print(f"  snapshot read over NBD       {format_size(read_rate)}/s with fleece's own Python "
          f"NBD client, {'verified byte for byte' if not bad else f'{bad} chunks WRONG'}")
    print(f"  snapshot read by nbdcopy     {nbdcopy_result}")
    print(f"  clusters copied              {copied} x {format_size(cluster)}")
    print(f"  cancel                       BLOCK_JOB_CANCELLED len={cancelled['data']['len']}; "
          f"export {'still serving' if still_serving else 'NOT serving'}")
    print(f"  after nbd-server-stop        pit0 {'still there' if 'pit0' in nodes else 'gone'}"
          f" from the graph; target file {'kept' if kept else 'MISSING'}, "
          f"{format_size(target_size)} on disk")
    verified = (not bad and (nbdcopy_result.endswith("identical (sha256)")
                             or nbdcopy_result == NBDCOPY_MISSING)
                and still_serving and "pit0" not in nodes and kept)
    print(f"fleece demo: {'the snapshot verified' if verified else 'FAILED'}")
    return verified


# -- fleece demo --push ------------------------------------------------------------------------
@contextmanager
def _qemu_nbd(image: Path, sock: Path, connections: int) -> Iterator[str]:
    """``qemu-nbd`` serving the raw ``image`` on ``sock`` to up to ``connections`` clients
    (more than one: it advertises multi-conn); yields the export name. ``RuntimeError`` when
    it does not start."""
    qemu_nbd = shutil.which("qemu-nbd")
    if qemu_nbd is None:
        raise RuntimeError("qemu-nbd not installed (apt-get install qemu-utils)")
    proc = subprocess.Popen([qemu_nbd, "-t", "-f", "raw", "-e", str(connections), "-k",
                             str(sock), str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + QMP_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"qemu-nbd did not start: {err.strip()}")
            time.sleep(0.01)
        yield ""
    finally:
        proc.terminate()
        try:
            proc.wait(QMP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextmanager
def _fleece_server(image: Path, sock: Path) -> Iterator[str]:
    """A second ``Storage`` serving the raw ``image`` writable on ``sock``; yields the export
    name."""
    with Storage() as remote:
        remote.execute("blockdev-add", {"driver": "raw", "node-name": "backup",
                                        "file": {"driver": "file", "filename": str(image)}})
        remote.execute("nbd-server-start",
                       {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        remote.execute("nbd-server-add", {"device": "backup", "writable": True})
        yield "backup"


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def _differing_chunks(path: Path, model: Model) -> int:
    """How many chunks of the raw image at ``path`` differ from ``model``."""
    bad = 0
    with path.open("rb") as f:
        for offset, want in model.chunks():
            f.seek(offset)
            if f.read(CHUNK) != want:
                bad += 1
    return bad


def _run_push(work: Path, size: int, seed: int, server: str, multi_conn: int) -> int:
    disk, backup = work / "disk.qcow2", work / "backup.raw"
    qmp_path, backup_sock = str(work / "qmp.sock"), work / "backup.sock"
    print(f"fleece demo --push: a {format_size(size)} sample disk of random data at {disk}")
    _make_sample_disk(disk, size, seed)
    _sparse(backup, size)
    serve = (_fleece_server(backup, backup_sock) if server == "fleece"
             else _qemu_nbd(backup, backup_sock, multi_conn))
    daemon = DaemonThread(DaemonConfig(
        qmp=[f"unix:{qmp_path}"],
        blockdev=[f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}"],
    ))
    try:
        with serve as export:
            daemon.start()
            try:
                with QEMUMonitorProtocol(qmp_path, nickname="fleece-demo") as qmp:
                    qmp.connect()
                    qmp.settimeout(QMP_TIMEOUT)
                    ok = _push_scenario(daemon, qmp, Model(size, seed), work, server,
                                        str(backup_sock), export, multi_conn)
            finally:
                daemon.stop()
    except RuntimeError as exc:
        print(f"fleece demo --push: {exc}")
        return 1
    return 0 if ok else 1


def _push_scenario(daemon: DaemonThread, qmp: QEMUMonitorProtocol, model: Model, work: Path,
                   server: str, sock: str, export: str, multi_conn: int) -> bool:
    size = model.size
    fleecing, backup = work / "fleecing.raw", work / "backup.raw"
    _sparse(fleecing, size)
    _execute(qmp, "device_add", {"driver": "virtio-blk", "id": "virtio0", "drive": "disk0"})
    device = daemon.storage.device("virtio0")
    guest = Guest(device.pwrite, model, model.seed)
    guest.start_background(2, 0, size // WRITE)
    try:
        with guest.freeze:  # fsfreeze: no guest write is in flight across the point in time
            _execute(qmp, "blockdev-add", {
                "driver": "raw", "node-name": "fl-img", "discard": "unmap",
                "file": {"driver": "file", "filename": str(fleecing), "discard": "unmap"}})
            _execute(qmp, "blockdev-add", {"driver": "copy-before-write", "node-name": "fl",
                                           "file": "disk0", "target": "fl-img"})
            _execute(qmp, "blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                           "file": "fl"})
            frozen = model.snapshot()
            written_before = guest.written
        print("fleece demo --push: snapshot taken: copy-before-write fl (target fl-img) and "
              "snapshot-access acc above disk0")
        _execute(qmp, "blockdev-add", {"driver": "nbd", "node-name": "push", "export": export,
                                       "server": {"type": "unix", "path": sock},
                                       "multi-conn": multi_conn,
                                       "x-request-timeout": REQUEST_TIMEOUT})
        connections = getattr(daemon.storage.graph.get("push").driver, "connections", 1)
        print(f"fleece demo --push: blockdev-backup device=acc target=push sync=full "
              f"discard-source=true, to {server} over {connections} connection(s)")
        started = time.perf_counter()
        _execute(qmp, "blockdev-backup", {"device": "acc", "target": "push", "sync": "full",
                                          "job-id": "push0", "discard-source": True})
        completed = _wait_push(qmp, size)
        seconds = time.perf_counter() - started
        written_during = guest.written - written_before
    finally:
        guest.join()
    (fleecing_info,) = [node["image"]["fleecing"]
                        for node in _execute(qmp, "query-named-block-nodes")
                        if node["node-name"] == "fl"]
    fleecing_left = os.stat(fleecing).st_blocks * 512
    _execute(qmp, "blockdev-del", {"node-name": "push"})  # flushes, disconnects
    overwritten = sum(1 for offset in model.writes if frozen.writes.get(offset)
                      is not model.writes[offset])
    bad_pushed = _differing_chunks(backup, frozen)
    live = device.pread(0, size)
    bad_live = sum(1 for offset, want in model.chunks() if live[offset:offset + CHUNK] != want)
    error = completed["data"].get("error")

    server_line = ("fleece (a second Storage)" if server == "fleece"
                   else "qemu-nbd" + (f" -e {multi_conn}" if multi_conn > 1 else ""))
    conn_line = f"over {connections} connection{'s' if connections > 1 else ''}"
    if connections < multi_conn:
        conn_line += " (the server does not offer multi-conn)"
    print()
    print("fleece demo --push report")
    print(f"  sample disk                  {format_size(size)} qcow2, random data")
    print(f"  backup server                {server_line}, serving {backup}")
    print(f"  push                         {format_size(size)} in {seconds:.2f} s "
          f"({format_size(size / seconds)}/s), {conn_line}"
          + (f"; FAILED: {error}" if error else ""))
    print(f"  guest writes during push     {format_size(written_during)} from 2 vCPUs "
          f"({overwritten} blocks of {format_size(WRITE)} differ from the point in time)")
    print(f"  fleecing image               {format_size(fleecing_info['copied-bytes'])} copied, "
          f"{format_size(fleecing_left)} left after discard-source")
    print("  pushed image                 "
          + ("equals the point in time byte for byte" if not bad_pushed
             else f"{bad_pushed} chunks DIFFER from the point in time"))
    print("  live disk                    "
          + ("equals the guest's writes" if not bad_live else f"{bad_live} chunks DIFFER"))
    verified = not error and not bad_pushed and not bad_live and written_during > 0
    print(f"fleece demo: {'the pushed backup verified' if verified else 'FAILED'}")
    return verified


def _wait_push(qmp: QEMUMonitorProtocol, size: int) -> dict[str, Any]:
    """The push job's ``BLOCK_JOB_COMPLETED`` event, with a progress bar meanwhile;
    ``TimeoutError`` when the job makes no progress for ``QMP_TIMEOUT`` seconds."""
    with tqdm(total=size, desc="push", unit="B", unit_scale=True, unit_divisor=1024,
              leave=False, disable=None) as bar:
        last, moved = 0, time.monotonic()
        while True:
            try:
                event = qmp.pull_event(wait=0.2)
            except TimeoutError:  # none yet
                event = None
            if event is not None and event.get("event") == "BLOCK_JOB_COMPLETED":
                return event
            jobs = [j for j in _execute(qmp, "query-block-jobs") if j["device"] == "push0"]
            offset = jobs[0]["offset"] if jobs else last
            if offset != last:
                bar.update(offset - last)
                last, moved = offset, time.monotonic()
            elif time.monotonic() - moved > QMP_TIMEOUT:
                raise TimeoutError(f"the push made no progress for {QMP_TIMEOUT} s")
