"""Multi-conn alone: ``nbdcopy -C 1`` against ``-C 4`` of one warm fleecing snapshot.

The scenario of ``compare_qemu.py`` up to its snapshot copies, per daemon: a 1 GiB qcow2 of
random data exported writable, 64 KiB sequential writes over its first half, fleecing into
``pit0`` exported read-only as ``snap``, the same writes again (so half the snapshot comes
from the target, half from the live disk), one copy to warm it. Then ``--rounds`` pairs of
copies, ``-C 1`` and ``-C 4`` in alternating order. Each copy prints its rate, the daemon's
CPU seconds (``/proc/PID/stat``), nbdcopy's, and how busy the whole machine was
(``/proc/stat``): a copy that leaves the machine idle is waiting, not working. Run::

    PATH=/usr/bin:$PATH .venv/bin/python benchmarks/multi_conn.py [--daemons fleece,qemu]
                                                                  [--rounds 3] [--strace]

``--strace`` also counts the daemon's system calls (``strace -c -f``) over one more ``-C 1``
copy and prints the summary (the traced copy is slower; its counts are what matter).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import compare_qemu as cq

SIZE = 1 << 30


def _machine_ticks() -> tuple[int, int]:
    """All and idle (idle + iowait) CPU ticks of the machine so far."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _copy(d: cq.Daemon, connections: int) -> float:
    """One copy of ``snap``; prints and returns its MiB/s."""
    daemon0, peer0, (all0, idle0) = cq.cpu_seconds(d.pid), _children_cpu(), _machine_ticks()
    rate = cq.nbdcopy_rate(d.nbd, "snap", SIZE, connections)
    daemon1, peer1, (all1, idle1) = cq.cpu_seconds(d.pid), _children_cpu(), _machine_ticks()
    busy = 100 * (1 - (idle1 - idle0) / max(all1 - all0, 1))
    print(f"{d.kind} -C {connections}: {rate:6.0f} MiB/s  daemon {daemon1 - daemon0:.2f} s  "
          f"nbdcopy {peer1 - peer0:.2f} s  machine {busy:.0f} % busy", flush=True)
    return rate


def _traced_copy(d: cq.Daemon, work: Path) -> None:
    out = work / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(d.pid)],
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached to every thread
    rate = cq.nbdcopy_rate(d.nbd, "snap", SIZE, 1)
    tracer.send_signal(signal.SIGINT)
    tracer.wait()
    print(f"{d.kind} -C 1 under strace: {rate:.0f} MiB/s; system calls:")
    print("\n".join(out.read_text().splitlines()[:14]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--daemons", default="fleece,qemu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strace", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleece-multi-conn-"))
    try:
        base = work / "base.qcow2"
        cq.make_random_qcow2(base, SIZE, work)
        for kind in args.daemons.split(","):
            source, target = work / "src.qcow2", work / "pit0.qcow2"
            shutil.copyfile(base, source)
            cq.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(source), "-F", "qcow2",
                    str(target)])
            with cq.daemon(kind, work) as d:
                cq.add_qcow2(d.qmp, "src", source)
                cq.export(d.qmp, "live", "src", writable=True)
                cq.fio(d.nbd, "live", "write", "64k", 8, 0, SIZE // 2)
                cq.start_fleecing(d, target)
                cq.fio(d.nbd, "live", "write", "64k", 8, 0, SIZE // 2)
                cq.nbdcopy_rate(d.nbd, "snap", SIZE, 4)  # the routes learn the snapshot
                rates: dict[int, list[float]] = {1: [], 4: []}
                for number in range(args.rounds):
                    for connections in (1, 4) if number % 2 == 0 else (4, 1):
                        rates[connections].append(_copy(d, connections))
                one, four = statistics.median(rates[1]), statistics.median(rates[4])
                print(f"{kind}: median -C 1 {one:.0f}, -C 4 {four:.0f} MiB/s: "
                      f"-C 4 / -C 1 {four / one:.2f}")
                if args.strace:
                    _traced_copy(d, work)
            source.unlink()
            target.unlink()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
