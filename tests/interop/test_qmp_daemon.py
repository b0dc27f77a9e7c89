"""``fleece daemon`` as a subprocess, spoken to over QMP with raw sockets, qemu.qmp and qmp-shell.

Every daemon here is ``sys.executable -m fleece daemon`` with its sockets in ``tmp_path``; every
wait has a timeout and every daemon is killed at teardown. What is tested:

- **QMP conformance, raw sockets**: the greeting's shape; a command before ``qmp_capabilities``
  and a second ``qmp_capabilities`` are ``CommandNotFound``; ids of every JSON type are echoed,
  on success and on error; errors are exactly ``{"error": {"class", "desc"}}``; malformed JSON
  and JSON that is not a command get ``GenericError`` and the connection stays usable; missing,
  unknown and mistyped arguments are ``GenericError`` naming the argument, word for word as
  qemu-storage-daemon says it; the table ``REFERENCE_CASES`` sends the same bad input to fleece
  and to a running qemu-storage-daemon and compares class and text (arguments, nested option
  paths, missing files, device-or-node lookups, nbd-server-start addresses, malformed JSON, a
  permission conflict under a backup job), with fleece's deliberate differences in
  ``DELIBERATE`` and known ones as strict xfails in ``REFERENCE_BUGS``;
  input QEMU's parser recovers from (a top-level string holding a brace, the QMP spec's control
  character or 0xFF resynchronisation) checked on both daemons (fleece: strict xfail, a bug);
  events (``JOB_STATUS_CHANGE`` of a drive-backup) reach two negotiated clients at once with
  ``{"seconds", "microseconds"}`` timestamps, and never a client that did not negotiate; clients
  that hang up mid-command leave the daemon serving the others; ``query-commands``.
- **Lifecycle**: ``quit`` answers ``{}``, then ``BLOCK_JOB_CANCELLED`` of a running job, then
  ``SHUTDOWN``, exit 0; SIGTERM likewise (``SHUTDOWN`` reason ``host-signal``); the QMP socket
  file appears only once it accepts, is mode 0600 and is removed on exit; the pid file is
  written and removed (after every QMP socket, unix and TCP, listens); a bad option exits 1
  naming the option and leaves no socket or pid file; ``--blockdev`` as JSON and dotted
  key=value (with ``,,``), ``--drive readonly=on`` with the format probed, ``--nbd-server`` on
  TCP, ``--object tls-creds-x509`` with a TLS NBD server (nbdinfo over TLS, plain refused,
  ``object-del`` refused while in use); the daemon never logs a traceback.
- **qemu.qmp**: the async ``QMPClient`` (greeting parsed by its models, ``ExecuteError`` with
  the error class, the event listener), the legacy ``QEMUMonitorProtocol`` (``cmd`` vs
  ``cmd_raw``, ``pull_event(wait=...)``), over a unix socket and over TCP.
- **qmp-shell** (shipped by qemu.qmp): the original design's two commands typed into it with
  stdin piped, then the snapshot read over NBD.
- **The original design end to end** (legacy client): ``--drive id=virtio0`` over a qcow2 image
  that qemu-io wrote patterns into, ``drive-backup ... target-id=pit0 sync=none``,
  ``nbd-server-add device=pit0 writable=false``; the guest (a writable NBD export of the same
  node, the device replugged with ``share-rw``) overwrites ranges with qemu-io; ``qemu-io -r``
  reads the old data through ``pit0`` (iotest 222's table); ``block-job-cancel`` leaves the
  export serving; ``nbd-server-stop`` makes ``pit0`` leave the graph; the target file stays,
  ``qemu-img check`` is clean and ``qemu-img info`` names the source as its backing file.
- **The QEMU-style scenario on qemu-storage-daemon and fleece** (parametrized): ``blockdev-add``
  of the source and of a ``qemu-img create -b`` target, ``blockdev-backup sync=none``, NBD
  exports, qemu-io reads, ``block-export-del``, ``blockdev-del`` refused while the job runs and
  accepted after it is cancelled: the same assertions on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemons import DaemonProcess, RawQMP, fleece_argv
from tests.peers import PEER_ENV, require

pytestmark = [pytest.mark.interop, pytest.mark.timeout(30)]

KiB = 1 << 10
MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
START_TIMEOUT = 15.0
IO_TIMEOUT = 10.0
EXIT_TIMEOUT = 15.0
VENV_BIN = Path(sys.executable).parent

#: iotest 222: patterns written before the snapshot, the guest's writes after it, and what the
#: snapshot must read then
PATTERNS_BEFORE = (("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
                   ("0xcd", "0x3ff0000", "64k"))
PATTERNS_AFTER = (("0xab", "0", "64k"), ("0xad", "0x00f8000", "64k"),
                  ("0x1d", "0x2008000", "64k"), ("0xea", "0x3fe0000", "64k"))
SNAPSHOT_READS = (*PATTERNS_BEFORE, ("0", "0x00f8000", "32k"), ("0", "0x2010000", "32k"),
                  ("0", "0x3fe0000", "64k"))


# -- processes ----------------------------------------------------------------------------------
def run_peer(*args: str, check: bool = True, stdin: str | None = None,
             timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a peer (Debian's /usr/bin first); fails the test with its output if ``check``."""
    if not args[0].startswith("/"):
        require(args[0])
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=PEER_ENV, input=stdin)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return proc


def qemu_io(target: str, *commands: str, read_only: bool = False,
            fmt: str = "raw") -> subprocess.CompletedProcess[str]:
    """``qemu-io -c CMD ...`` on ``target``; fails on a non-zero exit or a pattern mismatch."""
    args = ["qemu-io", "-f", fmt]
    if read_only:
        args.append("-r")
    for command in commands:
        args += ["-c", command]
    proc = run_peer(*args, target)
    assert "Pattern verification failed" not in proc.stdout, proc.stdout
    assert "failed" not in proc.stderr, proc.stderr
    return proc


def nbd_uri(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def make_source(path: Path) -> None:
    """A 64 MiB qcow2 image holding iotest 222's patterns, written by qemu-io."""
    run_peer("qemu-img", "create", "-f", "qcow2", str(path), str(IMAGE_SIZE))
    qemu_io(str(path), *(f"write -P {p} {o} {n}" for p, o, n in PATTERNS_BEFORE), fmt="qcow2")


def qsd_argv(qmp: Path, *options: str) -> list[str]:
    return [require("qemu-storage-daemon"), "--chardev",
            f"socket,path={qmp},server=on,wait=off,id=mon0", "--monitor", "chardev=mon0",
            *options]


Starter = Callable[..., DaemonProcess]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Starter]:
    """``start(*options, qmp=..., wait=True)``: a fleece daemon with ``--qmp unix:QMP``."""
    started: list[DaemonProcess] = []

    def starter(*options: str, qmp: Path | None = None, wait: bool = True) -> DaemonProcess:
        path = qmp or tmp_path / "qmp.sock"
        daemon = DaemonProcess(fleece_argv("--qmp", f"unix:{path}", *options), path, tmp_path)
        started.append(daemon)
        if wait:
            daemon.wait_socket()
        return daemon

    yield starter
    for daemon in started:
        daemon.stop()
    for daemon in started:  # whatever the clients did, the daemon logged no crash
        assert "Traceback" not in daemon.stderr, daemon.stderr


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.qcow2"
    make_source(path)
    return path


@pytest.fixture
def drive_daemon(start: Starter, source: Path) -> DaemonProcess:
    """A fleece daemon with ``--drive id=virtio0`` over the pattern image."""
    return start("--drive", f"id=virtio0,file={source},format=qcow2")


# -- a raw QMP client ---------------------------------------------------------------------------
@pytest.fixture
def connect() -> Iterator[Callable[[Path], RawQMP]]:
    clients: list[RawQMP] = []

    def factory(path: Path) -> RawQMP:
        client = RawQMP(path)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def assert_error(reply: dict[str, Any], qmp_class: str, *words: str) -> str:
    """``reply`` is exactly ``{"error": {"class", "desc"}}`` (plus ``id``); returns ``desc``."""
    assert set(reply) <= {"error", "id"} and "error" in reply, reply
    error = reply["error"]
    assert set(error) == {"class", "desc"}, error
    assert error["class"] == qmp_class, error
    assert isinstance(error["desc"], str) and error["desc"], error
    for word in words:
        assert word in error["desc"], error
    desc: str = error["desc"]
    return desc


def assert_timestamp(event: dict[str, Any]) -> None:
    stamp = event["timestamp"]
    assert set(stamp) == {"seconds", "microseconds"}, stamp
    assert isinstance(stamp["seconds"], int) and isinstance(stamp["microseconds"], int)
    assert 0 <= stamp["microseconds"] < 1_000_000
    assert abs(stamp["seconds"] + stamp["microseconds"] / 1e6 - time.time()) < 60


def ret(value: object) -> Any:
    """A value qemu.qmp types as ``object`` (a command's return, event data), for indexing."""
    return value


def job_status(status: str) -> Callable[[dict[str, Any]], bool]:
    """A ``wait_event`` filter for ``JOB_STATUS_CHANGE`` to ``status``."""

    def match(event: dict[str, Any]) -> bool:
        return bool(event["data"]["status"] == status)

    return match


def start_sync_none_backup(client: RawQMP, target: Path, job: str = "virtio0") -> None:
    """A drive-backup of virtio0 with sync=none: it runs until cancelled."""
    client.ok("drive-backup", {"device": "virtio0", "format": "qcow2", "target": str(target),
                               "target-id": "pit0", "sync": "none", "job-id": job})


# -- greeting and negotiation -------------------------------------------------------------------
def test_greeting_shape(start: Starter, connect: Callable[[Path], RawQMP]) -> None:
    daemon = start()
    client = connect(daemon.qmp)
    greeting = client.greeting()
    assert set(greeting) == {"QMP"}
    assert set(greeting["QMP"]) == {"version", "capabilities"}
    assert greeting["QMP"]["capabilities"] == []
    version = greeting["QMP"]["version"]
    assert set(version) == {"qemu", "package"}
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert all(isinstance(version["qemu"][k], int) for k in ("major", "minor", "micro"))
    assert isinstance(version["package"], str)
    assert client.command("qmp_capabilities") == {"return": {}}
    assert client.ok("query-version") == version


def test_command_before_negotiation_is_command_not_found(
        start: Starter, connect: Callable[[Path], RawQMP]) -> None:
    client = connect(start().qmp)
    client.greeting()
    for name in ("query-version", "query-commands", "quit", "drive-backup", "nosuch"):
        assert_error(client.command(name, id=name), "CommandNotFound")
    reply = client.command("query-version", id=5)
    assert reply["id"] == 5
    assert_error(reply, "CommandNotFound", "qmp_capabilities")
    # still usable: negotiation then works
    assert client.command("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
    assert "qemu" in client.ok("query-version")


def test_second_qmp_capabilities_is_command_not_found(
        start: Starter, connect: Callable[[Path], RawQMP]) -> None:
    client = connect(start().qmp)
    client.negotiate()
    assert_error(client.command("qmp_capabilities"), "CommandNotFound")
    assert_error(client.command("qmp_capabilities", {"enable": []}), "CommandNotFound")
    assert "qemu" in client.ok("query-version")


def test_qmp_capabilities_with_unknown_capability(
        start: Starter, connect: Callable[[Path], RawQMP]) -> None:
    client = connect(start().qmp)
    client.greeting()
    assert_error(client.command("qmp_capabilities", {"enable": ["oob"]}), "GenericError", "oob")
    assert_error(client.command("query-version"), "CommandNotFound")  # still not negotiated
    assert client.command("qmp_capabilities", {"enable": []}) == {"return": {}}


IDS: list[Any] = [0, -7, 2**40, 1.5, "", "s p a c e", "\u00e9", {"a": [1, {"b": None}]}, [],
                  [1, "x", None], None, True, False, {}]


def test_ids_of_any_json_type_are_echoed(start: Starter,
                                         connect: Callable[[Path], RawQMP]) -> None:
    client = connect(start().qmp)
    client.greeting()
    for ident in IDS:  # before negotiation: errors carry the id
        reply = client.command("query-version", id=ident)
        assert reply["id"] == ident and type(reply["id"]) is type(ident)
    assert client.command("qmp_capabilities", id=IDS[7]) == {"return": {}, "id": IDS[7]}
    for ident in IDS:
        ok = client.command("query-version", id=ident)
        assert set(ok) == {"return", "id"} and ok["id"] == ident
        assert type(ok["id"]) is type(ident)
        bad = client.command("nosuch", id=ident)
        assert bad["id"] == ident
        assert_error(bad, "CommandNotFound", "nosuch")
        lacks = client.command("blockdev-del", {}, id=ident)
        assert lacks["id"] == ident
        assert_error(lacks, "GenericError", "node-name")
        client.send({"execute": 5, "id": ident})
        not_string = client.reply()
        assert not_string["id"] == ident
        assert_error(not_string, "GenericError", "'execute'")
    no_id = client.command("query-version")
    assert "id" not in no_id


def test_error_shape(start: Starter, connect: Callable[[Path], RawQMP]) -> None:
    client = connect(start().qmp)
    client.negotiate()
    desc = assert_error(client.command("nosuch-command"), "CommandNotFound")
    assert desc == "The command nosuch-command has not been found"
    desc = assert_error(client.command("blockdev-del", {"node-name": "nosuch"}), "GenericError")
    assert "nosuch" in desc
    assert_error(client.command("block-job-cancel", {"device": "nosuch"}), "DeviceNotActive",
                 "nosuch")


MALFORMED: dict[str, bytes] = {
    "bad value": b'{"execute": nope}',
    "lone brace": b"}",
    "bare word": b"hello\n",
    "invalid utf-8": b'{"execute": "\xff\xfe"}',
    "unterminated single quote": b"{'execute': 'query-version}",
    "trailing comma": b'{"execute": "query-version",}',
    "too deep": b"[" * 1100 + b"]" * 1100,
}


@pytest.mark.parametrize("garbage", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_json_gets_generic_error_and_connection_stays_usable(
        start: Starter, connect: Callable[[Path], RawQMP], garbage: bytes) -> None:
    daemon = start()
    client = connect(daemon.qmp)
    client.negotiate()
    client.send(garbage + b"\n")
    desc = assert_error(client.reply(), "GenericError")
    assert "JSON" in desc or "QMP input" in desc, desc
    # Every reply for the garbage, then the next command is answered (with its id).
    client.send({"execute": "query-version", "id": "after"})
    while True:
        reply = client.reply()
        if reply.get("id") == "after":
            assert "return" in reply
            break
        assert_error(reply, "GenericError")
    assert daemon.process.poll() is None


NOT_COMMANDS: list[tuple[bytes, str, Any]] = [
    (b"[1, 2]", "QMP input must be a JSON object", None),
    (b"42\n", "QMP input must be a JSON object", None),
    (b"null\n", "QMP input must be a JSON object", None),
    (b'{"id": 12}', "QMP input lacks member 'execute'", 12),
    (b'{"arguments": {}}', "QMP input lacks member 'execute'", None),
    (b'{"execute": 1, "id": "x"}', "QMP input member 'execute' must be a string", "x"),
    (b'{"execute": "query-version", "arguments": [], "id": [1]}',
     "QMP input member 'arguments' must be an object", [1]),
    (b'{"execute": "query-version", "control": 1, "id": {}}',
     "QMP input member 'control' is unexpected", {}),
    (b'{"exec-oob": "query-version", "id": 9}', "QMP input member 'exec-oob' is unexpected", 9),
    (b'{"execute": "query-version", "exec-oob": "x", "id": 8}',
     "QMP input member 'exec-oob' is unexpected", 8),
]


@pytest.mark.parametrize(("data", "desc", "ident"), NOT_COMMANDS,
                         ids=[d[:24].decode() for d, _, _ in NOT_COMMANDS])
def test_json_that_is_not_a_command(start: Starter, connect: Callable[[Path], RawQMP],
                                    data: bytes, desc: str, ident: Any) -> None:
    client = connect(start().qmp)
    client.negotiate()
    client.send(data)
    reply = client.reply()
    got = assert_error(reply, "GenericError")
    assert got.startswith(desc), got
    if ident is not None:
        assert reply["id"] == ident
    assert client.ok("query-version")["qemu"]["major"] >= 0


ARGUMENT_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("blockdev-del", {}, "node-name"),
    ("blockdev-del", {"node-name": 1}, "node-name"),
    ("blockdev-del", {"node-name": "x", "foo": 1}, "foo"),
    ("query-version", {"x": 1}, "x"),
    ("drive-backup", {"device": "virtio0", "target": "t"}, "sync"),
    ("drive-backup", {"device": "virtio0", "target": "t", "sync": "sideways"}, "sync"),
    ("drive-backup", {"device": 7, "target": "t", "sync": "none"}, "device"),
    ("drive-backup", {"device": "virtio0", "target": "t", "sync": "none", "speed": "1"},
     "speed"),
    ("block-job-set-speed", {"device": "j", "speed": 1.5}, "speed"),
    ("block-job-cancel", {"device": "j", "force": "yes"}, "force"),
    ("nbd-server-add", {"device": "a", "writable": "no"}, "writable"),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bogus": 1}, "bogus"),
    ("query-named-block-nodes", {"flat": 1}, "flat"),
]


@pytest.mark.parametrize(("name", "arguments", "argument"), ARGUMENT_ERRORS,
                         ids=[f"{n}-{sorted(a)}" for n, a, _ in ARGUMENT_ERRORS])
def test_argument_errors_name_the_argument(drive_daemon: DaemonProcess,
                                           connect: Callable[[Path], RawQMP], name: str,
                                           arguments: dict[str, Any], argument: str) -> None:
    client = connect(drive_daemon.qmp)
    client.negotiate()
    assert_error(client.command(name, arguments, id=1), "GenericError", f"'{argument}'")
    assert client.ok("query-block")[0]["device"] == "virtio0"


# -- word for word against qemu-storage-daemon ---------------------------------------------------
#: what a case sends: a command and its arguments ("{tmp}" in a string becomes the test's folder,
#: the same for both daemons), or raw bytes (the answer is then every error they bring)
Sent = tuple[str, dict[str, Any]] | bytes

#: the same bad input for both daemons, in order; the first part with no NBD server running
REFERENCE_CASES: list[Sent | None] = [
    ("blockdev-del", {}),
    ("blockdev-del", {"node-name": 1}),
    ("blockdev-del", {"node-name": "x", "foo": 1}),
    ("blockdev-del", {"node-name": "nosuch"}),
    ("query-version", {"x": 1}),
    ("block-job-cancel", {"device": "j", "force": "yes"}),
    ("block-job-cancel", {"device": "nosuch"}),
    ("block-job-set-speed", {"device": "j", "speed": "fast"}),
    ("block-job-set-speed", {"device": "j", "speed": 1.5}),
    ("blockdev-backup", {"device": "a", "target": "b", "sync": "sideways"}),
    ("blockdev-backup", {"device": "a", "target": "b"}),
    ("nbd-server-add", {"device": "a", "writable": "no"}),
    ("nbd-server-stop", {}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bogus": 1}),
    ("query-named-block-nodes", {"flat": 1}),
    ("blockdev-add", {"driver": "nosuch", "node-name": "x"}),
    ("blockdev-add", {"driver": "null-co"}),
    ("job-cancel", {"id": "nosuch"}),
    ("nosuch-command", {}),
    ("blockdev-del", {"foo": 1}),
    # a nested option keeps its path; an enum's refusal names the member alone
    ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": {"driver": "file"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "a",
                      "file": {"driver": "file", "filename": 5}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "a",
                      "file": {"driver": "file", "filename": "{tmp}/src.qcow2", "aio": "x"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": {"driver": "nosuch"}}),
    # no Python text: QEMU's sentence for a missing file
    ("blockdev-add", {"driver": "qcow2", "node-name": "a",
                      "file": {"driver": "file", "filename": "{tmp}/nosuch.qcow2"}}),
    ("blockdev-add", {"driver": "file", "node-name": "a", "filename": "{tmp}/nosuch.raw"}),
    # device-or-node lookups: GenericError, but block-commit's DeviceNotFound
    ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": "nonode"}),
    ("drive-backup", {"device": "x", "target": "{tmp}/t.qcow2", "sync": "none"}),
    ("blockdev-backup", {"device": "x", "target": "y", "sync": "none"}),
    ("transaction", {"actions": [{"type": "blockdev-backup",
                                  "data": {"device": "x", "target": "y", "sync": "none"}}]}),
    ("transaction", {"actions": [{"type": "drive-backup", "data": {
        "device": "x", "target": "{tmp}/t.qcow2", "sync": "none"}}]}),
    ("block-stream", {"device": "x"}),
    ("block-commit", {"device": "x"}),
    ("block-dirty-bitmap-add", {"node": "x", "name": "b"}),
    ("block-dirty-bitmap-remove", {"node": "x", "name": "b"}),
    ("block-export-del", {"id": "x"}),
    ("object-del", {"id": "x"}),
    # nbd-server-start: a port is a string; a socket that cannot be bound
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                            "port": 99999}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "{tmp}/nodir/n.sock"}}}),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                            "port": "99999"}}}),
    # malformed JSON: QEMU's lexer and parser words, every error it gives
    b'{"execute": "query-version", }',
    b'{"execute": query-version}',
    b'{"execute" "query-version"}',
    b'{"execute": "query-version", "id": 1, "id": 2}',
    b"True\n",
    b'{"execute": "x\\ud800"}',
    b"{1: 2}",
    b"[1 2]",
    b"[" * 1025 + b"]" * 1025,
    # with a source, a target, a backup job (filter cbw0) and an NBD server (REFERENCE_SETUP)
    None,
    ("nbd-server-add", {"device": "src", "writable": True}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "src", "name": "x",
                          "writable": True}),
    ("nbd-server-add", {"device": "x"}),
    ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "x"}),
    ("block-stream", {"device": "src", "base-node": "x"}),
    ("blockdev-backup", {"device": "src", "target": "x", "sync": "none"}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "{tmp}/n2.sock"}}}),
]
#: what both daemons are given where REFERENCE_CASES holds None; every step must succeed
REFERENCE_SETUP: list[tuple[str, dict[str, Any]]] = [
    ("nbd-server-stop", {}),  # QEMU started one on port 99999 modulo 65536 (see DELIBERATE)
    ("blockdev-add", {"driver": "qcow2", "node-name": "src",
                      "file": {"driver": "file", "filename": "{tmp}/src.qcow2"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                      "file": {"driver": "file", "filename": "{tmp}/tgt.qcow2"}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "{tmp}/n.sock"}}}),
    ("blockdev-backup", {"device": "src", "target": "tgt", "sync": "none", "job-id": "j0",
                         "filter-node-name": "cbw0"}),
]
#: cases where fleece differs on purpose: the reason, and fleece's own answer
DELIBERATE: dict[int, tuple[str, Any]] = {
    REFERENCE_CASES.index(("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "99999"}}})): (
        "QEMU listens on port 99999 modulo 65536 (34463) and says nothing; fleece refuses",
        {"error": {"class": "GenericError", "desc": "port 99999 out of range"}}),
    REFERENCE_CASES.index(b"[" * 1025 + b"]" * 1025): (
        "over the nesting limit QEMU parses the rest of the value as new input (one error per "
        "bracket, and a command inside would run); fleece skips the rest of the value",
        [{"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}]),
}
#: cases where fleece is known to differ, not on purpose (strict xfail)
REFERENCE_BUGS: dict[int, str] = {}


def _case_id(index: int, sent: Sent | None) -> str:
    if sent is None:
        return f"{index}-setup"
    if isinstance(sent, bytes):
        return f"{index}-json-{sent[:24]!r}"
    return f"{index}-{sent[0]}-{sorted(sent[1])}"


REFERENCE_PARAMS = [
    pytest.param(index, id=_case_id(index, sent), marks=[pytest.mark.xfail(
        strict=True, reason=REFERENCE_BUGS[index])] if index in REFERENCE_BUGS else [])
    for index, sent in enumerate(REFERENCE_CASES) if sent is not None
]


def _in_tmp(value: Any, tmp: Path) -> Any:
    """``value`` with "{tmp}" in every string replaced by ``tmp``."""
    return json.loads(json.dumps(value).replace("{tmp}", str(tmp)))


def _errors_for(client: RawQMP, data: bytes) -> list[Any]:
    """Every reply ``data`` brings (then a marked query-version shows they are all in)."""
    client.send(data)
    client.send({"execute": "query-version", "id": "after"})
    replies = []
    while (reply := client.reply()).get("id") != "after":
        replies.append(reply.get("error", reply))
    return replies


@pytest.fixture(scope="module")
def reference_replies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """The replies of fleece and of qemu-storage-daemon to every ``REFERENCE_CASES`` input."""
    tmp = tmp_path_factory.mktemp("ref")
    for image in ("src.qcow2", "tgt.qcow2"):
        run_peer("qemu-img", "create", "-f", "qcow2", str(tmp / image), str(IMAGE_SIZE))
    replies: dict[str, list[Any]] = {}
    for name, argv in (("fleece", fleece_argv("--qmp", f"unix:{tmp / 'f.sock'}")),
                       ("qsd", qsd_argv(tmp / "q.sock"))):
        path = tmp / ("f.sock" if name == "fleece" else "q.sock")
        daemon = DaemonProcess(argv, path, tmp)
        try:
            daemon.wait_socket()
            client = RawQMP(path)
            client.negotiate()
            answers: list[Any] = []
            for sent in REFERENCE_CASES:
                if sent is None:
                    for step, (command, arguments) in enumerate(REFERENCE_SETUP):
                        reply = client.command(command, _in_tmp(arguments, tmp))
                        assert step == 0 or "return" in reply, (name, command, reply)
                    answers.append(None)
                elif isinstance(sent, bytes):
                    answers.append(_errors_for(client, sent))
                else:
                    answers.append(client.command(sent[0], _in_tmp(sent[1], tmp)))
            replies[name] = answers
            client.ok("job-cancel", {"id": "j0"})
            client.close()
        finally:
            daemon.stop()
        assert "Traceback" not in daemon.stderr, daemon.stderr
    return replies


@pytest.mark.parametrize("index", REFERENCE_PARAMS)
def test_error_replies_match_qemu_storage_daemon(reference_replies: dict[str, list[Any]],
                                                 index: int) -> None:
    fleece, qsd = reference_replies["fleece"][index], reference_replies["qsd"][index]
    if index in DELIBERATE:
        assert fleece == DELIBERATE[index][1]
        assert qsd != fleece
        return
    assert qsd and ("error" in qsd if isinstance(qsd, dict) else True), qsd
    assert fleece == qsd


def test_the_comparison_covers_enough_cases() -> None:
    assert len([sent for sent in REFERENCE_CASES if sent is not None]) >= 45


RESYNC_INPUTS: dict[str, bytes] = {
    "string holding a brace": b'"{"\n',
    "control character after half a command": b'{"execute": "qmp_cap\x01',
    "0xff after half a command": b'{"execute": "qmp_cap\xff',
}
RESYNC_PARAMS = [
    pytest.param(flavour, data, id=f"{flavour}-{name}")
    for flavour in ("qemu-storage-daemon", "fleece")
    for name, data in RESYNC_INPUTS.items()
]


@pytest.mark.parametrize(("flavour", "data"), RESYNC_PARAMS)
def test_parser_resynchronises_like_qemu(tmp_path: Path, flavour: str, data: bytes) -> None:
    qmp = tmp_path / "qmp.sock"
    argv = qsd_argv(qmp) if flavour == "qemu-storage-daemon" else fleece_argv("--qmp",
                                                                                f"unix:{qmp}")
    daemon = DaemonProcess(argv, qmp, tmp_path)
    try:
        daemon.wait_socket()
        client = RawQMP(qmp)
        client.negotiate()
        client.send(data)
        client.send({"execute": "query-version", "id": "after"})
        while True:
            reply = client.reply(timeout=2.0)
            if reply.get("id") == "after":
                break
            assert_error(reply, "GenericError")
        assert "return" in reply
        client.close()
    finally:
        daemon.stop()


# -- events -------------------------------------------------------------------------------------
def test_events_reach_every_negotiated_client(drive_daemon: DaemonProcess, tmp_path: Path,
                                              connect: Callable[[Path], RawQMP]) -> None:
    a, b, silent = connect(drive_daemon.qmp), connect(drive_daemon.qmp), connect(drive_daemon.qmp)
    a.negotiate()
    b.negotiate()
    silent.greeting()  # never negotiates: QEMU sends it no events
    start_sync_none_backup(a, tmp_path / "pit.qcow2")
    for client in (a, b):
        for status in ("created", "running"):
            event = client.wait_event("JOB_STATUS_CHANGE", match=job_status(status))
            assert event["data"] == {"id": "virtio0", "status": status}
            assert set(event) == {"event", "data", "timestamp"}
            assert_timestamp(event)
    b.ok("block-job-cancel", {"device": "virtio0"})
    for client in (a, b):
        cancelled = client.wait_event("BLOCK_JOB_CANCELLED")
        assert cancelled["data"]["device"] == "virtio0"
        assert cancelled["data"]["type"] == "backup"
        assert cancelled["data"]["len"] == IMAGE_SIZE
        assert_timestamp(cancelled)
    silent.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        silent.sock.recv(1)
    # a client that negotiates later gets only the later events
    silent.command("qmp_capabilities")
    silent.ok("nbd-server-start", {"addr": {"type": "unix",
                                            "data": {"path": str(tmp_path / "n.sock")}}})
    silent.ok("nbd-server-add", {"device": "virtio0"})
    silent.ok("nbd-server-stop")
    event = silent.wait_event("BLOCK_EXPORT_DELETED")
    assert event["data"] == {"id": "virtio0"}
    assert not any(e["event"] == "JOB_STATUS_CHANGE" for e in silent.events)


def test_clients_hanging_up_mid_command_leave_the_daemon_serving(
        drive_daemon: DaemonProcess, tmp_path: Path, connect: Callable[[Path], RawQMP]) -> None:
    watcher = connect(drive_daemon.qmp)
    watcher.negotiate()
    for round_ in range(5):
        rude = RawQMP(drive_daemon.qmp)
        rude.greeting()
        rude.send({"execute": "qmp_capabilities"})
        rude.send({"execute": "query-named-block-nodes", "id": round_})
        rude.send(b'{"execute": "query-block", "arg')  # half a message
        rude.close()
    # one that starts a job and hangs up before the reply: the job starts all the same (a
    # command the daemon read before the hang-up runs; QEMU drops those still queued after it)
    rude = RawQMP(drive_daemon.qmp)
    rude.negotiate()
    rude.send({"execute": "drive-backup", "arguments": {
        "device": "virtio0", "format": "qcow2", "target": str(tmp_path / "pit.qcow2"),
        "target-id": "pit0", "sync": "none"}})
    rude.sock.shutdown(socket.SHUT_RDWR)
    rude.close()
    watcher.wait_event("JOB_STATUS_CHANGE", match=job_status("running"))
    # one that connects and never says anything
    mute = connect(drive_daemon.qmp)
    assert drive_daemon.process.poll() is None
    jobs = watcher.ok("query-block-jobs")
    assert [j["device"] for j in jobs] == ["virtio0"]
    fresh = connect(drive_daemon.qmp)
    fresh.negotiate()
    assert [b["device"] for b in fresh.ok("query-block")] == ["virtio0"]
    assert "QMP" in mute.greeting()


def test_query_commands_lists_the_commands(drive_daemon: DaemonProcess,
                                           connect: Callable[[Path], RawQMP]) -> None:
    client = connect(drive_daemon.qmp)
    client.negotiate()
    listing = client.ok("query-commands")
    assert all(set(entry) == {"name"} for entry in listing)
    names = [entry["name"] for entry in listing]
    assert len(names) == len(set(names))
    for name in ("qmp_capabilities", "quit", "query-version", "query-commands", "blockdev-add",
                 "blockdev-del", "drive-backup", "blockdev-backup", "block-job-cancel",
                 "nbd-server-start", "nbd-server-add", "nbd-server-remove", "nbd-server-stop",
                 "block-export-add", "block-export-del", "query-named-block-nodes",
                 "query-block-jobs", "device_add", "device_del"):
        assert name in names, name
    # every listed command exists (none answers CommandNotFound)
    for name in names:
        if name in ("quit", "qmp_capabilities"):
            continue
        reply = client.command(name, {"__probe__": 1})
        assert reply.get("error", {}).get("class") != "CommandNotFound", (name, reply)


# -- shutdown -----------------------------------------------------------------------------------
def test_quit_cancels_the_job_then_shutdown_then_exit_0(
        drive_daemon: DaemonProcess, tmp_path: Path, connect: Callable[[Path], RawQMP]) -> None:
    client, other = connect(drive_daemon.qmp), connect(drive_daemon.qmp)
    client.negotiate()
    other.negotiate()
    start_sync_none_backup(client, tmp_path / "pit.qcow2")
    client.wait_event("JOB_STATUS_CHANGE", match=job_status("running"))
    client.events.clear()
    assert client.command("quit", id="bye") == {"return": {}, "id": "bye"}
    for observer in (client, other):
        names: list[str] = []
        while "SHUTDOWN" not in names:
            message = observer.recv()
            if "event" in message:
                names.append(message["event"])
                assert_timestamp(message)
                if message["event"] == "SHUTDOWN":
                    assert message["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert "BLOCK_JOB_CANCELLED" in names
        assert names.index("BLOCK_JOB_CANCELLED") < names.index("SHUTDOWN")
    assert drive_daemon.wait() == 0
    for observer in (client, other):
        observer.sock.settimeout(IO_TIMEOUT)
        assert observer.sock.recv(65536) == b""
    assert not drive_daemon.qmp.exists()
    assert (tmp_path / "pit.qcow2").exists()
    run_peer("qemu-img", "check", str(tmp_path / "pit.qcow2"))


def test_sigterm_sends_shutdown_and_exits_0(drive_daemon: DaemonProcess, tmp_path: Path,
                                             connect: Callable[[Path], RawQMP]) -> None:
    client = connect(drive_daemon.qmp)
    client.negotiate()
    start_sync_none_backup(client, tmp_path / "pit.qcow2")
    drive_daemon.process.send_signal(signal.SIGTERM)
    client.wait_event("BLOCK_JOB_CANCELLED")
    shutdown = client.wait_event("SHUTDOWN")
    assert shutdown["data"] == {"guest": False, "reason": "host-signal"}
    assert drive_daemon.wait() == 0
    assert not drive_daemon.qmp.exists()
    run_peer("qemu-img", "check", str(tmp_path / "src.qcow2"))


def test_sigint_exits_0(start: Starter, connect: Callable[[Path], RawQMP]) -> None:
    daemon = start()
    client = connect(daemon.qmp)
    client.negotiate()
    daemon.process.send_signal(signal.SIGINT)
    assert client.wait_event("SHUTDOWN")["data"]["reason"] == "host-signal"
    assert daemon.wait() == 0


# -- sockets and pid file -----------------------------------------------------------------------
def test_socket_appears_only_when_accepting_mode_0600_removed_on_exit(
        tmp_path: Path, source: Path) -> None:
    qmp, pidfile = tmp_path / "qmp.sock", tmp_path / "daemon.pid"
    # Enough start-up work (a drive, an NBD server, an export) to make an early socket visible.
    daemon = DaemonProcess(fleece_argv(
        "--drive", f"id=virtio0,file={source},format=qcow2",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
        "--export", "type=nbd,id=e0,node-name=drive-virtio0,name=disk",
        "--qmp", f"unix:{qmp}", "--pidfile", str(pidfile)), qmp, tmp_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not qmp.exists():
            assert daemon.process.poll() is None, daemon.stderr
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.001)
        # the moment the file exists, connect succeeds and the greeting comes
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(str(qmp))
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "closed before the greeting"
            data += chunk
        assert b'"QMP"' in data
        sock.close()
        mode = os.stat(qmp).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        # the pid file names the daemon once it serves
        deadline = time.monotonic() + START_TIMEOUT
        while not pidfile.exists():
            assert time.monotonic() < deadline, "no pid file"
            time.sleep(0.01)
        assert pidfile.read_text().strip() == str(daemon.process.pid)
        assert not list(tmp_path.glob("*.tmp"))
        run_peer("nbdinfo", nbd_uri(tmp_path / "nbd.sock", "disk"))
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert not qmp.exists()
        assert not pidfile.exists()
        assert not (tmp_path / "nbd.sock").exists()
    finally:
        daemon.stop()


def test_pidfile_then_connect_succeeds_at_once(start: Starter, tmp_path: Path) -> None:
    pidfile = tmp_path / "p.pid"
    daemon = start("--pidfile", str(pidfile), wait=False)
    deadline = time.monotonic() + START_TIMEOUT
    while not pidfile.exists():
        assert daemon.process.poll() is None, daemon.stderr
        assert time.monotonic() < deadline
        time.sleep(0.005)
    client = RawQMP(daemon.qmp)  # no retry: the pid file promises a listening socket
    client.negotiate()
    client.send({"execute": "quit"})
    assert client.reply() == {"return": {}}
    client.close()
    assert daemon.wait() == 0
    assert not pidfile.exists()


def test_two_qmp_sockets_unix_and_tcp(start: Starter, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    second, pidfile = tmp_path / "second.sock", tmp_path / "d.pid"
    daemon = start("--qmp", f"unix:{second}", "--qmp", f"tcp:127.0.0.1:{port}",
                   "--pidfile", str(pidfile))
    # The first socket appearing says nothing of the others; the pid file comes after them all.
    deadline = time.monotonic() + START_TIMEOUT
    while not pidfile.exists():
        assert daemon.process.poll() is None, daemon.stderr
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.01)
    assert second.exists()
    qmp = QEMUMonitorProtocol(("127.0.0.1", port))
    try:
        qmp.settimeout(IO_TIMEOUT)
        greeting = qmp.connect(negotiate=True)
        assert greeting is not None and "QMP" in greeting
        assert isinstance(qmp.cmd("query-version"), dict)
    finally:
        qmp.close()
    client = RawQMP(second)
    client.negotiate()
    client.close()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert not second.exists() and not daemon.qmp.exists()


BAD_OPTIONS: dict[str, tuple[list[str], str]] = {
    "unknown driver": (["--blockdev", "driver=nosuch,node-name=x"], "--blockdev"),
    "bad json": (["--blockdev", '{"driver": '], "--blockdev"),
    "export of a missing node": (["--nbd-server", "addr.type=unix,addr.path={tmp}/nbd.sock",
                                  "--export", "type=nbd,id=e0,node-name=nosuch"], "--export"),
    "bogus qmp": (["--qmp", "bogus:x"], "--qmp"),
    "drive without file": (["--drive", "id=virtio0"], "--drive"),
    "drive of a missing file": (["--drive", "id=virtio0,file={tmp}/missing.qcow2,format=qcow2"],
                                "--drive"),
    "drive option unknown": (["--drive", "id=v,file={tmp}/x.qcow2,format=qcow2,bogus=1"],
                             "--drive"),
    "nbd address type": (["--nbd-server", "addr.type=vsock,addr.cid=3"], "--nbd-server"),
    "object type": (["--object", "secret,id=s0,data=x"], "--object"),
    "object dir": (["--object", "tls-creds-x509,id=t0,dir={tmp}/nocerts,endpoint=server"],
                   "--object"),
}


@pytest.mark.parametrize(("options", "option"), list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_bad_option_exits_1_naming_it_and_leaves_nothing(
        tmp_path: Path, options: list[str], option: str) -> None:
    qmp, pidfile, nbd = tmp_path / "qmp.sock", tmp_path / "d.pid", tmp_path / "nbd.sock"
    make = [o.replace("{tmp}", str(tmp_path)) for o in options]
    if "{tmp}/x.qcow2" in " ".join(options):
        run_peer("qemu-img", "create", "-f", "qcow2", str(tmp_path / "x.qcow2"), "1M")
    # a valid --qmp first: it must be opened and then removed again (or never opened at all)
    argv = fleece_argv("--qmp", f"unix:{qmp}", *make, "--pidfile", str(pidfile))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT,
                          env=PEER_ENV, cwd=tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert option in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not qmp.exists()
    assert not pidfile.exists()
    assert not nbd.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p for p in ("x.qcow2",) if (tmp_path / p).exists())


def test_nothing_to_serve_exits_1() -> None:
    proc = subprocess.run(fleece_argv(), capture_output=True, text=True, timeout=START_TIMEOUT)
    assert proc.returncode == 1
    assert "--qmp" in proc.stderr


def test_help_lists_every_option() -> None:
    proc = subprocess.run(fleece_argv("--help"), capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert proc.returncode == 0
    for option in ("--qmp", "--blockdev", "--drive", "--nbd-server", "--export", "--object",
                   "--pidfile"):
        assert option in proc.stdout


def test_blockdev_json_and_dotted_forms(start: Starter, tmp_path: Path,
                                        connect: Callable[[Path], RawQMP]) -> None:
    one, two = tmp_path / "one.qcow2", tmp_path / "two,comma.raw"
    run_peer("qemu-img", "create", "-f", "qcow2", str(one), "1M")
    run_peer("qemu-img", "create", "-f", "raw", str(two), "2M")
    daemon = start(
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "one",
                                  "file": {"driver": "file", "filename": str(one)}}),
        "--blockdev", f"driver=raw,node-name=two,file.driver=file,"
                      f"file.filename={str(two).replace(',', ',,')}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'n.sock'}",
        "--export", "type=nbd,id=e1,node-name=one,name=first,writable=on",
    )
    client = connect(daemon.qmp)
    client.negotiate()
    nodes = {n["node-name"]: n for n in client.ok("query-named-block-nodes")}
    assert nodes["one"]["drv"] == "qcow2" and nodes["two"]["drv"] == "raw"
    assert nodes["two"]["image"]["virtual-size"] == 2 * MiB
    assert nodes["two"]["file"] == str(two)
    assert client.ok("query-block-exports") == [
        {"type": "nbd", "id": "e1", "node-name": "one", "shutting-down": False}]
    qemu_io(nbd_uri(tmp_path / "n.sock", "first"), "write -P 0x42 0 64k")


def test_drive_readonly_and_inet_nbd_server(start: Starter, source: Path,
                                            connect: Callable[[Path], RawQMP]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start(
        "--drive", f"id=virtio0,file={source},readonly=on",  # format probed
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=4",
        "--export", "type=nbd,id=e0,node-name=drive-virtio0,name=ro,writable=off",
    )
    uri = f"nbd://127.0.0.1:{port}/ro"
    info = json.loads(run_peer("nbdinfo", "--json", uri).stdout)
    assert info["exports"][0]["is_read_only"] is True
    qemu_io(uri, *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS_BEFORE), read_only=True)
    assert run_peer("qemu-io", "-f", "raw", "-c", "write 0 4k", uri, check=False).returncode != 0
    client = connect(daemon.qmp)
    client.negotiate()
    inserted = client.ok("query-block")[0]["inserted"]
    assert inserted["ro"] is True and inserted["drv"] == "qcow2"
    assert_error(client.command("block-export-add", {"type": "nbd", "id": "w", "writable": True,
                                                     "node-name": "drive-virtio0"}),
                 "GenericError", "read-only")


def make_server_certs(directory: Path) -> Path:
    """A CA and a server certificate for localhost, in QEMU's x509 layout; the CA's folder."""
    certtool = require("certtool")
    directory.mkdir()
    ca_key, ca_cert = directory / "ca-key.pem", directory / "ca-cert.pem"
    (directory / "ca.info").write_text("cn = fleece test CA\nca\ncert_signing_key\n"
                                       "expiration_days = 30\n")
    run_peer(certtool, "--generate-privkey", "--outfile", str(ca_key))
    run_peer(certtool, "--generate-self-signed", "--load-privkey", str(ca_key), "--template",
             str(directory / "ca.info"), "--outfile", str(ca_cert))
    (directory / "server.info").write_text(
        "organization = fleece\ncn = localhost\ndns_name = localhost\ntls_www_server\n"
        "encryption_key\nsigning_key\nexpiration_days = 30\n")
    run_peer(certtool, "--generate-privkey", "--outfile", str(directory / "server-key.pem"))
    run_peer(certtool, "--generate-certificate", "--load-ca-certificate", str(ca_cert),
             "--load-ca-privkey", str(ca_key), "--load-privkey",
             str(directory / "server-key.pem"), "--template", str(directory / "server.info"),
             "--outfile", str(directory / "server-cert.pem"))
    client = directory / "client"
    client.mkdir()
    (client / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    return client


def test_object_tls_creds_and_tls_nbd_server(start: Starter, tmp_path: Path, source: Path,
                                             connect: Callable[[Path], RawQMP]) -> None:
    pki = tmp_path / "pki"
    client_dir = make_server_certs(pki)
    nbd = tmp_path / "nbd.sock"
    daemon = start(
        "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off",
        "--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={source}",
        "--nbd-server", f"addr.type=unix,addr.path={nbd},tls-creds=tls0",
        "--export", "type=nbd,id=e0,node-name=disk",
    )
    tls_uri = f"nbds+unix:///disk?socket={nbd}&tls-certificates={client_dir}"
    info = json.loads(run_peer("nbdinfo", "--json", tls_uri).stdout)
    assert info["TLS"] is True
    assert run_peer("nbdinfo", nbd_uri(nbd, "disk"), check=False).returncode != 0  # plain
    client = connect(daemon.qmp)
    client.negotiate()
    assert_error(client.command("object-del", {"id": "tls0"}), "GenericError", "in use")
    client.ok("nbd-server-stop")
    client.ok("object-del", {"id": "tls0"})
    assert_error(client.command("object-del", {"id": "tls0"}), "GenericError", "tls0")


# -- qemu.qmp -----------------------------------------------------------------------------------
def test_qemu_qmp_async_client(drive_daemon: DaemonProcess, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = QMPClient("fleece-test")
        await asyncio.wait_for(client.connect(str(drive_daemon.qmp)), IO_TIMEOUT)
        try:
            greeting = client.greeting
            assert greeting is not None
            assert greeting.QMP.capabilities == []
            qemu = greeting.QMP.version["qemu"]
            assert isinstance(qemu, dict) and qemu["major"] == 7
            version = await asyncio.wait_for(client.execute("query-version"), IO_TIMEOUT)
            assert isinstance(version, dict) and "package" in version
            with pytest.raises(ExecuteError) as info:
                await asyncio.wait_for(client.execute("nosuch"), IO_TIMEOUT)
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as info:
                await asyncio.wait_for(client.execute("blockdev-del", {"node-name": 1}),
                                       IO_TIMEOUT)
            assert info.value.error_class == "GenericError"
            assert "'node-name'" in str(info.value)
            listener = EventListener(("JOB_STATUS_CHANGE", "BLOCK_JOB_CANCELLED"))
            with client.listen(listener):
                await asyncio.wait_for(client.execute("drive-backup", {
                    "device": "virtio0", "format": "qcow2", "target": str(tmp_path / "p.qcow2"),
                    "target-id": "pit0", "sync": "none"}), IO_TIMEOUT)
                first = await asyncio.wait_for(listener.get(), IO_TIMEOUT)
                assert first["event"] == "JOB_STATUS_CHANGE"
                assert ret(first["data"])["status"] == "created"
                jobs = await asyncio.wait_for(client.execute("query-block-jobs"), IO_TIMEOUT)
                assert isinstance(jobs, list) and jobs[0]["type"] == "backup"
                await asyncio.wait_for(
                    client.execute("block-job-cancel", {"device": "virtio0"}), IO_TIMEOUT)
                while True:
                    event = await asyncio.wait_for(listener.get(), IO_TIMEOUT)
                    if event["event"] == "BLOCK_JOB_CANCELLED":
                        assert ret(event["data"])["device"] == "virtio0"
                        break
            # execute_msg with a message built by the library, and an explicit id
            msg = client.make_execute_msg("query-named-block-nodes", {"flat": True})
            nodes = await asyncio.wait_for(client.execute_msg(msg), IO_TIMEOUT)
            assert isinstance(nodes, list)
            names = {n["node-name"] for n in nodes}
            # the job held the last reference of pit0: cancelled, it left the graph
            assert "drive-virtio0" in names and "pit0" not in names
        finally:
            await asyncio.wait_for(client.disconnect(), IO_TIMEOUT)

    asyncio.run(scenario())
    assert drive_daemon.process.poll() is None


def test_qemu_qmp_legacy_cmd_cmd_raw_pull_event(drive_daemon: DaemonProcess,
                                                tmp_path: Path) -> None:
    qmp = QEMUMonitorProtocol(str(drive_daemon.qmp))
    qmp.settimeout(IO_TIMEOUT)
    try:
        greeting = qmp.connect(negotiate=True)
        assert greeting is not None and greeting["QMP"]["capabilities"] == []
        # cmd(name, **kwargs) returns the return value and raises on error
        assert qmp.cmd("query-version") == qmp.cmd_raw("query-version")["return"]
        with pytest.raises(ExecuteError):
            qmp.cmd("blockdev-del", **{"node-name": "nosuch"})
        # cmd_raw(name, args) returns the whole reply, error included
        raw = qmp.cmd_raw("blockdev-del", {"node-name": "nosuch"})
        assert_error(raw, "GenericError", "nosuch")
        raw = qmp.cmd_obj({"execute": "query-block", "id": "mine"})
        assert raw["id"] == "mine" and raw["return"][0]["device"] == "virtio0"
        assert qmp.pull_event(wait=False) is None
        assert qmp.cmd("drive-backup", device="virtio0", format="qcow2",
                       target=str(tmp_path / "p.qcow2"), sync="none",
                       **{"target-id": "pit0"}) == {}
        event = qmp.pull_event(wait=IO_TIMEOUT)
        assert event is not None and event["event"] == "JOB_STATUS_CHANGE"
        assert_timestamp(event)
        qmp.cmd("block-job-cancel", device="virtio0")
        seen = [event["event"]]
        statuses: list[str] = []
        deadline = time.monotonic() + IO_TIMEOUT
        # the job's last event is its move to 'null': after it, no event is on its way
        while "null" not in statuses and time.monotonic() < deadline:
            pulled = qmp.pull_event(wait=max(0.01, deadline - time.monotonic()))
            assert pulled is not None
            seen.append(pulled["event"])
            if pulled["event"] == "JOB_STATUS_CHANGE":
                statuses.append(pulled["data"]["status"])
        assert "BLOCK_JOB_CANCELLED" in seen and "null" in statuses
        qmp.clear_events()
        assert qmp.get_events(wait=False) == []
    finally:
        qmp.close()


def test_qmp_shell_runs_the_original_two_commands(drive_daemon: DaemonProcess,
                                                  tmp_path: Path) -> None:
    shell = VENV_BIN / "qmp-shell"
    assert shell.exists(), "qemu.qmp no longer ships qmp-shell"
    client = RawQMP(drive_daemon.qmp)
    client.negotiate()
    client.ok("nbd-server-start", {"addr": {"type": "unix",
                                            "data": {"path": str(tmp_path / "nbd.sock")}}})
    target = tmp_path / "point-in-time.qcow2"
    script = "\n".join([
        "query-version",
        f"drive-backup device=virtio0 format=qcow2 target={target} target-id=pit0 sync=none",
        "nbd-server-add device=pit0 writable=false",
        "query-block-exports",
        "blockdev-del node-name=nosuch",
        "no-such-command",
        "",
    ])
    proc = run_peer(str(shell), str(drive_daemon.qmp), stdin=script)
    replies = [json.loads(line.split("(QEMU) ", 1)[1])
               for line in proc.stdout.splitlines() if line.startswith("(QEMU) {")]
    assert len(replies) == 6, proc.stdout
    assert replies[0]["return"]["qemu"]["major"] == 7
    assert replies[1] == {"return": {}}
    assert replies[2] == {"return": {}}
    assert replies[3]["return"] == [
        {"type": "nbd", "id": "pit0", "node-name": "pit0", "shutting-down": False}]
    assert replies[4]["error"]["class"] == "GenericError"
    assert replies[5]["error"]["class"] == "CommandNotFound"
    # the export made in the shell serves the snapshot after the shell has gone
    qemu_io(nbd_uri(tmp_path / "nbd.sock", "pit0"),
            *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS_BEFORE), read_only=True)
    info = json.loads(run_peer("nbdinfo", "--json", nbd_uri(tmp_path / "nbd.sock", "pit0")).stdout)
    assert info["exports"][0]["is_read_only"] is True
    client.ok("block-job-cancel", {"device": "virtio0"})
    client.wait_event("BLOCK_JOB_CANCELLED")
    client.close()


# -- the original design, end to end ------------------------------------------------------------
def legacy_event(qmp: QEMUMonitorProtocol, name: str, timeout: float = IO_TIMEOUT
                 ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {name} within {timeout} s"
        event = qmp.pull_event(wait=max(remaining, 0.01))
        if event is not None and event["event"] == name:
            return event


def test_original_design_end_to_end(tmp_path: Path, source: Path, start: Starter) -> None:
    nbd, target = tmp_path / "nbd.sock", tmp_path / "pit.qcow2"
    daemon = start("--drive", f"id=virtio0,file={source},format=qcow2",
                   "--nbd-server", f"addr.type=unix,addr.path={nbd}")
    qmp = QEMUMonitorProtocol(str(daemon.qmp))
    qmp.settimeout(IO_TIMEOUT)
    try:
        qmp.connect(negotiate=True)
        block = qmp.cmd("query-block")
        assert isinstance(block, list) and block[0]["device"] == "virtio0"
        node: str = block[0]["inserted"]["node-name"]
        # The device does not share writes (QEMU's default): a writable export is refused.
        refused = qmp.cmd_raw("nbd-server-add", {"device": "virtio0", "name": "live",
                                                 "writable": True})
        assert_error(refused, "GenericError", "virtio0")
        # The VM's disk is configured share-rw=on, so the "guest" below may be an NBD client.
        qmp.cmd("device_del", id="virtio0")
        qmp.cmd("device_add", driver="virtio-blk", id="virtio0", drive=node,
                **{"share-rw": True})

        # The original design's two commands.
        assert qmp.cmd("drive-backup", device="virtio0", format="qcow2", target=str(target),
                       sync="none", **{"target-id": "pit0"}) == {}
        assert qmp.cmd("nbd-server-add", device="pit0", writable=False) == {}
        jobs = qmp.cmd("query-block-jobs")
        assert isinstance(jobs, list) and jobs[0]["device"] == "virtio0"
        assert jobs[0]["type"] == "backup"

        # Every write passes through the backup's copy-before-write filter, as in QEMU: a
        # writable export of the disk's node itself is refused; one of the device is not.
        refused = qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "live", "name": "live",
                                                   "writable": True, "node-name": node})
        assert_error(refused, "GenericError", f"Permission conflict on node '{node}': "
                     "permissions 'write' are both required by an unnamed block device "
                     f"(uses node '{node}' as 'root' child) and unshared by node '")
        # The guest writes after the point in time.
        assert qmp.cmd("nbd-server-add", device="virtio0", name="live", writable=True) == {}
        qemu_io(nbd_uri(nbd, "live"), *(f"write -P {p} {o} {n}" for p, o, n in PATTERNS_AFTER))
        qemu_io(nbd_uri(nbd, "live"), *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS_AFTER),
                read_only=True)
        # The snapshot still holds the old data.
        snapshot_reads = [f"read -P {p} {o} {n}" for p, o, n in SNAPSHOT_READS]
        qemu_io(nbd_uri(nbd, "pit0"), *snapshot_reads, read_only=True)
        info = json.loads(run_peer("nbdinfo", "--json", nbd_uri(nbd, "pit0")).stdout)
        assert info["exports"][0]["is_read_only"] is True
        assert info["exports"][0]["export-size"] == IMAGE_SIZE
        nodes = {n["node-name"]: n for n in ret(qmp.cmd("query-named-block-nodes"))}
        assert nodes["pit0"]["image"]["backing-filename"] == str(source)

        # Cancelling the job leaves the export serving.
        qmp.cmd("block-job-cancel", device="virtio0")
        cancelled = legacy_event(qmp, "BLOCK_JOB_CANCELLED")
        assert cancelled["data"]["device"] == "virtio0"
        assert qmp.cmd("query-block-jobs") == []
        qemu_io(nbd_uri(nbd, "pit0"), *snapshot_reads, read_only=True)

        # Stopping the NBD server drops the last reference: pit0 leaves the graph.
        qmp.cmd("nbd-server-stop")
        deleted = {legacy_event(qmp, "BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2)}
        assert deleted == {"pit0", "live"}
        names = [n["node-name"] for n in ret(qmp.cmd("query-named-block-nodes"))]
        assert "pit0" not in names and node in names
        assert target.exists()
        qmp.cmd("quit")
    finally:
        qmp.close()
    assert daemon.wait() == 0
    # The target stays, is clean, names the source as backing, and holds the point in time.
    assert target.exists()
    run_peer("qemu-img", "check", str(target))
    run_peer("qemu-img", "check", str(source))
    info = json.loads(run_peer("qemu-img", "info", "--output=json", str(target)).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(source)
    assert info.get("backing-filename-format", "qcow2") == "qcow2"
    qemu_io(str(target), *(f"read -P {p} {o} {n}" for p, o, n in SNAPSHOT_READS),
            read_only=True, fmt="qcow2")
    qemu_io(str(source), *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS_AFTER),
            read_only=True, fmt="qcow2")


# -- the same QEMU-style scenario on qemu-storage-daemon and on fleece ---------------------------
@dataclass(frozen=True)
class Flavour:
    name: str
    argv: Callable[[Path], list[str]]


FLAVOURS = [
    Flavour("qemu-storage-daemon", lambda qmp: qsd_argv(qmp)),
    Flavour("fleece", lambda qmp: fleece_argv("--qmp", f"unix:{qmp}")),
]


@pytest.mark.parametrize("flavour", FLAVOURS, ids=[f.name for f in FLAVOURS])
def test_blockdev_backup_fleecing_same_on_both(tmp_path: Path, source: Path,
                                               flavour: Flavour) -> None:
    target, qmp_path, nbd = tmp_path / "tgt.qcow2", tmp_path / "qmp.sock", tmp_path / "nbd.sock"
    run_peer("qemu-img", "create", "-f", "qcow2", "-b", str(source), "-F", "qcow2", str(target))
    daemon = DaemonProcess(flavour.argv(qmp_path), qmp_path, tmp_path)
    qmp = QEMUMonitorProtocol(str(qmp_path))
    qmp.settimeout(IO_TIMEOUT)
    try:
        daemon.wait_socket()
        qmp.connect(negotiate=True)
        qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "src"},
                file={"driver": "file", "filename": str(source)})
        qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "tgt"}, backing="src",
                file={"driver": "file", "filename": str(target)})
        qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
        # the "guest": a writable export of the source, attached before the job starts
        qmp.cmd("block-export-add", type="nbd", id="live", name="live", writable=True,
                **{"node-name": "src"})
        qmp.cmd("blockdev-backup", device="src", target="tgt", sync="none",
                **{"job-id": "fleecing"})
        qmp.cmd("block-export-add", type="nbd", id="snap", name="snap", writable=False,
                **{"node-name": "tgt"})
        jobs = qmp.cmd("query-block-jobs")
        assert isinstance(jobs, list) and [(j["device"], j["type"]) for j in jobs] == [
            ("fleecing", "backup")]

        qemu_io(nbd_uri(nbd, "live"), *(f"write -P {p} {o} {n}" for p, o, n in PATTERNS_AFTER))
        snapshot_reads = [f"read -P {p} {o} {n}" for p, o, n in SNAPSHOT_READS]
        qemu_io(nbd_uri(nbd, "snap"), *snapshot_reads, read_only=True)
        qemu_io(nbd_uri(nbd, "live"), *(f"read -P {p} {o} {n}" for p, o, n in PATTERNS_AFTER),
                read_only=True)
        exports = qmp.cmd("query-block-exports")
        assert isinstance(exports, list)
        # (QEMU's live export now sits on the copy-before-write filter above src)
        assert sorted(e["id"] for e in exports) == ["live", "snap"]
        assert [e["node-name"] for e in exports if e["id"] == "snap"] == ["tgt"]

        # in use: neither node can go while the job and the exports hold them
        for node in ("tgt", "src"):
            busy = qmp.cmd_raw("blockdev-del", {"node-name": node})
            assert_error(busy, "GenericError")

        qmp.cmd("block-job-cancel", device="fleecing")
        assert legacy_event(qmp, "BLOCK_JOB_CANCELLED")["data"]["device"] == "fleecing"
        deadline = time.monotonic() + IO_TIMEOUT
        while qmp.cmd("query-block-jobs") != []:
            assert time.monotonic() < deadline, "the cancelled job does not go away"
            time.sleep(0.05)
        qemu_io(nbd_uri(nbd, "snap"), *snapshot_reads, read_only=True)  # still serving

        qmp.cmd("block-export-del", id="snap")
        assert legacy_event(qmp, "BLOCK_EXPORT_DELETED")["data"] == {"id": "snap"}
        qmp.cmd("block-export-del", id="live")
        assert legacy_event(qmp, "BLOCK_EXPORT_DELETED")["data"] == {"id": "live"}
        gone = qmp.cmd_raw("block-export-del", {"id": "snap"})
        assert_error(gone, "GenericError", "snap")
        # the source is still the target's backing file: deleting it first is refused
        assert_error(qmp.cmd_raw("blockdev-del", {"node-name": "src"}), "GenericError")
        assert qmp.cmd("blockdev-del", **{"node-name": "tgt"}) == {}
        assert qmp.cmd("blockdev-del", **{"node-name": "src"}) == {}
        names = [n["node-name"] for n in ret(qmp.cmd("query-named-block-nodes"))]
        assert "src" not in names and "tgt" not in names
        qmp.cmd("nbd-server-stop")
        qmp.cmd("quit")
        assert daemon.wait() == 0
    finally:
        with contextlib.suppress(Exception):
            qmp.close()
        daemon.stop()
    run_peer("qemu-img", "check", str(target))
    run_peer("qemu-img", "check", str(source))
    info = json.loads(run_peer("qemu-img", "info", "--output=json", str(target)).stdout)
    assert info["backing-filename"] == str(source)
    qemu_io(str(target), *(f"read -P {p} {o} {n}" for p, o, n in SNAPSHOT_READS),
            read_only=True, fmt="qcow2")
