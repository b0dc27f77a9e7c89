"""The same bad command lines given to ``qemu-storage-daemon`` and ``fleece daemon``: both exit
1 and print the same message.

The rule: QEMU prints ``qemu-storage-daemon: MESSAGE`` (for an option, MESSAGE is ``OPTION
VALUE: PROBLEM``), fleece prints ``fleece daemon: MESSAGE``; the last line of each stderr that
starts with its prefix gives MESSAGE, and the two MESSAGEs must be equal, after ``{tmp}`` (the
test's folder) is put in. Lines before it (QEMU's deprecation warnings) are not compared.

Where fleece differs on purpose (README, "Drop-in for qemu-storage-daemon"), :data:`DELIBERATE`
holds fleece's message and what QEMU does instead: print another message, or start and run
(``QEMU_RUNS``), which the test checks too.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import fleece_argv
from tests.peers import PEER_ENV, require

TIMEOUT = 30.0
#: a command line QEMU accepts: it is still running after this many seconds
QEMU_RUNS = "<qemu runs>"
RUNS_FOR = 2.0

RAW = "file,node-name=f,filename={tmp}/r.img"
UNIX = "addr.type=unix,addr.path={tmp}/n.sock"
CHARDEV = "socket,path={tmp}/q.sock,server=on,wait=off,id=c"

#: name -> the arguments (each ``{tmp}`` is the test's folder)
SAME: dict[str, list[str]] = {
    # --blockdev: keyval syntax
    "implied driver, file missing": ["--blockdev", "file,node-name=f,filename={tmp}/none"],
    "implied driver, filename missing": ["--blockdev", "file,node-name=f"],
    "nested key missing keeps its path": ["--blockdev",
                                          "driver=qcow2,node-name=q,file.driver=file"],
    "bool as 1": ["--blockdev", RAW + ",read-only=1"],
    "bool empty": ["--blockdev", RAW + ",read-only="],
    "nested bool onn": ["--blockdev", RAW + ",cache.direct=onn"],
    "unknown key": ["--blockdev", RAW + ",bogus=1"],
    "unknown nested key": ["--blockdev", RAW + ",cache.bogus=on"],
    "unknown driver": ["--blockdev", "nosuch,node-name=f"],
    "enum value": ["--blockdev", RAW + ",aio=bogus"],
    "enum value discard": ["--blockdev", RAW + ",discard=maybe"],
    "empty key": ["--blockdev", ",node-name=f"],
    "escaped comma then empty key": ["--blockdev", "file,,"],
    "empty key fragment": ["--blockdev", "file,a..b=1"],
    "key starting with _": ["--blockdev", "file,_x=1"],
    "list index as first key": ["--blockdev", "file,1=2"],
    "used inconsistently": ["--blockdev", "file,a=1,a.b=2"],
    "list gap": ["--blockdev", "file,a.1=2"],
    "no '=' after a key": ["--blockdev", "file,foo"],
    "help not available": ["--blockdev", "help"],
    "key too long": ["--blockdev", "file," + "a" * 130 + "=1"],
    "a string given members": ["--blockdev", "file,node-name=f,filename.x=1"],
    "an object given a value": ["--blockdev", RAW + ",cache=on"],
    "no driver at all": ["--blockdev", "fi=le,node-name=f"],
    "empty option": ["--blockdev", ""],
    "unknown child node": ["--blockdev", "raw,node-name=r,file=nope"],
    "duplicate node name": ["--blockdev", RAW, "--blockdev", RAW],
    "escaped comma in a value": ["--blockdev", "file,node-name=f,filename={tmp}/r,,img"],
    "long option prefix": ["--block", "file"],
    "--opt=value form": ["--blockdev=file"],
    # --blockdev: JSON
    "JSON trailing comma": ["--blockdev", '{"driver":"file","node-name":"f",}'],
    "JSON premature end": ["--blockdev", '{"driver":"file"'],
    "JSON bare word": ["--blockdev", '{"driver": "file", "node-name": f}'],
    "JSON missing colon": ["--blockdev", '{"driver" "file"}'],
    "JSON two values": ["--blockdev", '{"driver":"file","node-name":"f"} x'],
    "JSON string for a bool": ["--blockdev",
                               '{"driver":"file","node-name":"f","filename":"r.img",'
                               '"read-only":"on"}'],
    "JSON string for a nested bool": ["--blockdev",
                                      '{"driver":"file","node-name":"f","filename":"r.img",'
                                      '"cache":{"direct":"on"}}'],
    "JSON number for a string": ["--blockdev", '{"driver": 1}'],
    "JSON number for a BlockdevRef": ["--blockdev",
                                      '{"driver":"raw","node-name":"r","file":5}'],
    "JSON single quotes": ["--blockdev", "{'driver': 'file'}"],
    "JSON after a space is not JSON": ["--blockdev", ' {"driver":"file"}'],
    # --export
    "export writable=onn": ["--blockdev", RAW, "--export", "nbd,id=e,node-name=f,writable=onn"],
    "export writable=1": ["--blockdev", RAW, "--export", "nbd,id=e,node-name=f,writable=1"],
    "export unknown node": ["--export", "nbd,id=e,node-name=nope"],
    "nbd node, no server": [
        "--blockdev", "nbd,node-name=n,server.type=unix,server.path={tmp}/none.sock"],
    "export without id": ["--export", "nbd"],
    "export type unknown": ["--export", "bogus,id=e"],
    "export without NBD server": ["--blockdev", RAW, "--export", "nbd,id=e,node-name=f"],
    "export bitmaps not a list": ["--blockdev", RAW, "--export",
                                  "nbd,id=e,node-name=f,bitmaps=x"],
    "export list gap": ["--export", "nbd,id=e,node-name=f,bitmaps.1=x"],
    "export list used inconsistently": ["--export",
                                        "nbd,id=e,node-name=f,bitmaps.0=x,bitmaps.x=2"],
    "export bitmap object member missing": ["--export",
                                            "nbd,id=e,node-name=f,bitmaps.0=a,bitmaps.1.x=b"],
    "export string given members": ["--export", "type=nbd,id=e,node-name=f,name.x=1"],
    # --nbd-server
    "uint32 too big": ["--nbd-server", UNIX + ",max-connections=99999999999"],
    "uint32 negative": ["--nbd-server", UNIX + ",max-connections=-1"],
    "integer not a number": ["--nbd-server", UNIX + ",max-connections=abc"],
    "address type unknown": ["--nbd-server", "addr.type=bogus"],
    "address type missing": ["--nbd-server", "addr.path=x"],
    "unix path missing": ["--nbd-server", "addr.type=unix"],
    "inet port missing": ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
    "uint16 too big": ["--nbd-server",
                       "addr.type=inet,addr.host=127.0.0.1,addr.port=10809,addr.to=70000"],
    "port not a service": ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=abc"],
    "unknown server key": ["--nbd-server", UNIX + ",bogus=1"],
    "unknown address key": ["--nbd-server", UNIX + ",addr.bogus=1"],
    "no implied key": ["--nbd-server", "foo"],
    "server twice": ["--nbd-server", UNIX, "--nbd-server", "addr.type=unix,addr.path={tmp}/m.sock"],
    "vsock port missing": ["--nbd-server", "addr.type=vsock,addr.cid=3"],
    # --object
    "object type unknown": ["--object", "bogus,id=x"],
    "object without id": ["--object", "secret,data=x"],
    "object without type": ["--object", "id=x"],
    "x509 without dir": ["--object", "tls-creds-x509,id=x"],
    "x509 unknown key": ["--object", "tls-creds-x509,id=t,dir={tmp},bogus=1"],
    "x509 endpoint": ["--object", "tls-creds-x509,id=t,dir={tmp},endpoint=x"],
    # --chardev and --monitor
    "chardev without id": ["--chardev", "socket,path={tmp}/q.sock,server=on,wait=off"],
    "chardev without backend": ["--chardev", "id=c"],
    "chardev backend unknown": ["--chardev", "bogus,id=c"],
    "chardev unknown key": ["--chardev", CHARDEV + ",bogus=1"],
    "chardev bool onn": ["--chardev", "socket,path={tmp}/q.sock,server=onn,wait=off,id=c"],
    "chardev socket without address": ["--chardev", "socket,id=c"],
    "chardev host without port": ["--chardev", "socket,host=127.0.0.1,id=c"],
    "monitor chardev unknown": ["--monitor", "chardev=nope"],
    "monitor implied chardev unknown": ["--monitor", "nope"],
    "monitor chardev missing": ["--monitor", "mode=control"],
    "monitor readline": ["--chardev", CHARDEV, "--monitor", "c,mode=readline"],
    "monitor pretty=1": ["--chardev", CHARDEV, "--monitor", "c,pretty=1"],
    "monitor unknown key": ["--chardev", CHARDEV, "--monitor", "c,bogus=1"],
    "monitor twice on a chardev": ["--chardev", CHARDEV, "--monitor", "chardev=c",
                                   "--monitor", "chardev=c"],
    # getopt and the pid file
    "unknown long option": ["--bogus"],
    "unknown option after a bad one": ["--blockdev", "file", "--bogus"],
    "missing argument": ["--pidfile"],
    "short option missing argument": ["-T"],
    "unknown short option": ["-x"],
    "flag given a value": ["--daemonize=1"],
    "not an option": ["--nbd-server", UNIX, "foo"],
    "pid file folder missing": ["--nbd-server", UNIX, "--pidfile", "{tmp}/none/d.pid"],
}

#: name -> (arguments, fleece's message, QEMU's message or QEMU_RUNS)
DELIBERATE: dict[str, tuple[list[str], str, str]] = {
    "port above 65535": (
        ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=99999"],
        "--nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=99999: "
        "port 99999 out of range",
        QEMU_RUNS,  # it listens on 99999 - 65536 = 34463
    ),
    "cache.direct=on": (
        ["--blockdev", RAW + ",cache.direct=on", "--nbd-server", UNIX],
        f"--blockdev {RAW},cache.direct=on: cache.direct=on is not supported: fleece does not "
        "open images with O_DIRECT",
        QEMU_RUNS,
    ),
    "chardev waits for a client": (
        ["--chardev", "socket,path={tmp}/q.sock,server=on,id=c", "--monitor", "c"],
        "--chardev socket,path={tmp}/q.sock,server=on,id=c: wait=on is not supported by "
        "fleece: start-up does not stop for the first client (give wait=off)",
        QEMU_RUNS,
    ),
    "duplicate chardev id": (
        ["--chardev", CHARDEV, "--chardev", "socket,path={tmp}/p.sock,server=on,wait=off,id=c"],
        "--chardev socket,path={tmp}/p.sock,server=on,wait=off,id=c: "
        "Duplicate ID 'c' for chardev",
        "--chardev socket,path={tmp}/p.sock,server=on,wait=off,id=c: duplicate yank instance",
    ),
    "driver fleece lacks": (
        ["--blockdev", "null-aio,node-name=n", "--nbd-server", UNIX],
        "--blockdev null-aio,node-name=n: Driver 'null-aio' is not supported by fleece (it has "
        "blkdebug, copy-before-write, file, nbd, null-co, qcow2, raw, snapshot-access)",
        QEMU_RUNS,
    ),
}


def _message(stderr: str, prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in:\n{stderr}"
    return lines[-1][len(prefix):]


def _run(argv: list[str], cwd: Path, *, may_run: bool = False) -> tuple[int | None, str]:
    """Run a daemon; ``(exit status, stderr)``, status None when it was still running after
    :data:`RUNS_FOR` seconds (``may_run``) or :data:`TIMEOUT` (it is then stopped)."""
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL, env=PEER_ENV, cwd=cwd) as proc:
        try:
            _, stderr = proc.communicate(timeout=RUNS_FOR if may_run else TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                _, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # QEMU waiting for a chardev client ignores it
                proc.kill()
                _, stderr = proc.communicate(timeout=TIMEOUT)
            return None, stderr
        return proc.returncode, stderr


@dataclass
class Outcome:
    """What both daemons did with one command line (messages with ``{tmp}`` put back)."""

    qemu_status: int | None
    qemu_stderr: str
    fleece_status: int | None
    fleece_stderr: str
    qemu_folder: Path
    fleece_folder: Path

    def qemu_says(self) -> str:
        return _message(self.qemu_stderr, "qemu-storage-daemon: ").replace(
            str(self.qemu_folder), "{tmp}")

    def fleece_says(self) -> str:
        return _message(self.fleece_stderr, "fleece daemon: ").replace(
            str(self.fleece_folder), "{tmp}")


def _compare(folder: Path, args: list[str], may_run: bool) -> Outcome:
    """Run both daemons on ``args`` in two folders holding the same 1 MiB raw image."""
    folders = []
    for name in ("qemu", "fleece"):
        sub = folder / name
        sub.mkdir(parents=True)
        with open(sub / "r.img", "wb") as image:
            image.truncate(1 << 20)
        folders.append(sub)
    qemu, fleece = folders
    q_status, q_err = _run(["qemu-storage-daemon",
                            *(a.replace("{tmp}", str(qemu)) for a in args)], qemu,
                           may_run=may_run)
    f_status, f_err = _run(fleece_argv(*(a.replace("{tmp}", str(fleece)) for a in args)), fleece)
    return Outcome(q_status, q_err, f_status, f_err, qemu, fleece)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every command line of both tables, run on both daemons at once (16 at a time)."""
    require("qemu-storage-daemon")
    root = tmp_path_factory.mktemp("words")
    jobs = {name: (args, False) for name, args in SAME.items()}
    jobs.update({name: (args, True) for name, (args, _, _) in DELIBERATE.items()})
    with ThreadPoolExecutor(16) as pool:
        futures = {name: pool.submit(_compare, root / f"case{index}", args, may_run)
                   for index, (name, (args, may_run)) in enumerate(jobs.items())}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(SAME))
def test_same_words_as_qemu(outcomes: dict[str, Outcome], name: str) -> None:
    outcome = outcomes[name]
    assert outcome.qemu_status == 1, outcome.qemu_stderr
    assert outcome.fleece_status == 1, outcome.fleece_stderr
    assert "Traceback" not in outcome.fleece_stderr, outcome.fleece_stderr
    assert outcome.fleece_says() == outcome.qemu_says()


@pytest.mark.parametrize("name", list(DELIBERATE))
def test_deliberate_differences(outcomes: dict[str, Outcome], name: str) -> None:
    _, fleece_says, qemu_does = DELIBERATE[name]
    outcome = outcomes[name]
    assert outcome.fleece_status == 1, outcome.fleece_stderr
    assert outcome.fleece_says() == fleece_says
    if qemu_does == QEMU_RUNS:
        assert outcome.qemu_status is None, outcome.qemu_stderr
    else:
        assert outcome.qemu_status == 1, outcome.qemu_stderr
        assert outcome.qemu_says() == qemu_does


def test_pid_file_locked_by_another_process(tmp_path: Path) -> None:
    """Both refuse a pid file another process holds locked, in the same words."""
    pidfile = tmp_path / "d.pid"
    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        messages = []
        for argv, prefix in ((["qemu-storage-daemon"], "qemu-storage-daemon: "),
                             (fleece_argv(), "fleece daemon: ")):
            status, stderr = _run([*argv, "--nbd-server",
                                   f"addr.type=unix,addr.path={tmp_path}/n{time.monotonic_ns()}",
                                   "--pidfile", str(pidfile)], tmp_path)
            assert status == 1, stderr
            messages.append(_message(stderr, prefix))
        assert messages[0] == messages[1]
        assert messages[1] == ("cannot create PID file: Cannot lock pid file: Resource "
                               "temporarily unavailable")
    finally:
        os.close(fd)
    assert pidfile.exists()  # the file a failed daemon did not own is left alone


def test_at_least_forty_command_lines_compared() -> None:
    assert len(SAME) + len(DELIBERATE) >= 40
