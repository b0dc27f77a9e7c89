"""``fleece daemon``: a storage daemon in the spirit of qemu-storage-daemon.

Start-up applies the options in qemu-storage-daemon's order (objects, block nodes, drives, the NBD
server, exports) through the same ``Storage.execute`` the QMP clients use, and only then opens
the QMP sockets and writes the pid file: a client that finds the socket finds a daemon that
accepts commands. An option that fails stops the start-up, releases what was set up, and exits
with status 1 and a message naming the option. ``quit``, SIGTERM and SIGINT shut down the same
way: running jobs are cancelled (their events go out), ``SHUTDOWN`` is sent, every image is
flushed and closed, and the process exits with status 0.

Logging goes through :mod:`logging` to stderr (or ``-D FILE``) at ``--log-level`` (default
``warning``): the NBD server's audit lines (a refused or rejected client, a failed peer
verification, a protocol violation that closes a connection, with the peer) are warnings, so
they are on by default. QEMU's spellings are accepted where they fit: ``-T``/``--trace
[enable=]PATTERN[,events=FILE][,file=FILE]`` and ``-d trace:PATTERN`` turn on debug lines of
the subsystems whose name the pattern matches (``nbd_*``, ``qmp_*``, ``block_*``, ``jobs_*``,
``*``), ``-d guest_errors`` makes sure the NBD audit lines are shown whatever the level.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from fleece.errors import QMPError
from fleece.keyval import KeyvalError, parse_keyval
from fleece.qmp.server import QMPServer
from fleece.storage import Storage


class OptionError(Exception):
    """A command-line option that could not be applied; ``str()`` names it."""

    def __init__(self, option: str, value: str, problem: str) -> None:
        super().__init__(f"{option} '{value}': {problem}")
        self.option = option


@dataclass
class DaemonConfig:
    qmp: list[str] = field(default_factory=list)
    blockdev: list[str] = field(default_factory=list)
    drive: list[str] = field(default_factory=list)
    nbd_server: list[str] = field(default_factory=list)
    export: list[str] = field(default_factory=list)
    object: list[str] = field(default_factory=list)
    pidfile: str | None = None
    log_level: str = "warning"
    #: ``-T``/``--trace`` options and ``-d`` item lists, as given
    trace: list[str] = field(default_factory=list)
    log_items: list[str] = field(default_factory=list)
    logfile: str | None = None


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
#: the subsystems a trace pattern can name (QEMU's trace events are named ``subsystem_*``)
TRACE_SUBSYSTEMS = {"nbd": "fleece.nbd", "qmp": "fleece.qmp", "monitor": "fleece.qmp",
                    "block": "fleece.block", "jobs": "fleece.jobs", "job": "fleece.jobs"}
LOG_ITEMS = {
    "guest_errors": "the NBD audit lines (refused, rejected and misbehaving clients)",
    "trace:PATTERN": "debug lines of the subsystems PATTERN matches (as -T)",
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _trace_patterns(value: str) -> tuple[list[str], str | None]:
    """``[enable=]PATTERN[,events=FILE][,file=FILE]``: the patterns and the log file."""
    patterns: list[str] = []
    logfile = None
    for part in value.split(","):
        key, sep, rest = part.partition("=")
        if not sep:
            patterns.append(part)
        elif key == "enable":
            patterns.append(rest)
        elif key == "events":
            try:
                with open(rest) as f:
                    patterns += [line.strip() for line in f
                                 if line.strip() and not line.startswith("#")]
            except OSError as exc:
                raise OptionError("--trace", value, f"cannot read {rest}: {exc.strerror}") from exc
        elif key == "file":
            logfile = rest
        else:
            raise OptionError("--trace", value, f"unknown option '{key}'")
    return patterns, logfile


def _traced_loggers(option: str, pattern: str) -> list[str]:
    names = sorted({logger for name, logger in TRACE_SUBSYSTEMS.items()
                    if fnmatch.fnmatchcase(f"{name}_event", pattern)
                    or fnmatch.fnmatchcase(name, pattern)})
    if not names:
        known = ", ".join(f"{name}_*" for name in TRACE_SUBSYSTEMS)
        raise OptionError(option, pattern, f"matches no subsystem ({known}, or *)")
    return names


def configure_logging(config: DaemonConfig) -> None:
    """Set up :mod:`logging` from ``--log-level``, ``-T`` and ``-d``; :class:`OptionError`
    for an unknown level, item or pattern."""
    level = LOG_LEVELS.get(config.log_level.lower())
    if level is None:
        raise OptionError("--log-level", config.log_level,
                          f"expected one of {', '.join(LOG_LEVELS)}")
    debug: list[str] = []
    logfile = config.logfile
    for value in config.trace:
        patterns, file = _trace_patterns(value)
        logfile = file or logfile
        for pattern in patterns:
            debug += _traced_loggers("--trace", pattern)
    audit = False
    for value in config.log_items:
        for item in value.split(","):
            if item == "guest_errors":
                audit = True
            elif item.startswith("trace:"):
                debug += _traced_loggers("-d", item[len("trace:"):])
            else:
                raise OptionError("-d", value, "unknown log item '" + item + "' (known: "
                                  + ", ".join(LOG_ITEMS) + ")")
    handler: logging.Handler
    if logfile:
        try:
            handler = logging.FileHandler(logfile)
        except OSError as exc:
            raise OptionError("-D", logfile, exc.strerror or str(exc)) from exc
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if audit and level > logging.WARNING:
        logging.getLogger("fleece.nbd").setLevel(logging.WARNING)
    for name in debug:
        logging.getLogger(name).setLevel(logging.DEBUG)


def _parse(option: str, value: str, implied: str | None = None) -> dict[str, Any]:
    try:
        return parse_keyval(value, implied)
    except KeyvalError as exc:
        raise OptionError(option, value, str(exc)) from exc


def _execute(storage: Storage, option: str, value: str, command: str,
             arguments: dict[str, Any]) -> Any:
    try:
        return storage.execute(command, arguments)
    except QMPError as exc:
        raise OptionError(option, value, exc.desc) from exc


def _socket_address(option: str, value: str, addr: Any) -> dict[str, Any]:
    """qemu-storage-daemon's flat SocketAddress as nbd-server-start's legacy form."""
    if not isinstance(addr, dict) or "type" not in addr:
        raise OptionError(option, value, "addr.type is missing (unix or inet)")
    kind = addr.pop("type")
    if kind == "unix":
        return {"type": "unix", "data": addr}
    if kind == "inet":
        return {"type": "inet", "data": addr}
    raise OptionError(option, value, f"addr.type '{kind}' is not supported (unix or inet)")


def _coerce_bools(arguments: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if isinstance(arguments.get(key), str):
            arguments[key] = arguments[key] in ("on", "true", "yes")


def _coerce_ints(arguments: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = arguments.get(key)
        if isinstance(value, str) and value.isdigit():
            arguments[key] = int(value)


def apply_options(storage: Storage, config: DaemonConfig) -> None:
    """Set up ``storage`` from the command line. Raises :class:`OptionError`."""
    for value in config.object:
        args = _parse("--object", value, "qom-type")
        _coerce_bools(args, ("verify-peer",))
        _execute(storage, "--object", value, "object-add", args)
    for value in config.blockdev:
        _execute(storage, "--blockdev", value, "blockdev-add", _parse("--blockdev", value))
    for value in config.drive:
        add_drive(storage, value)
    for value in config.nbd_server:
        args = _parse("--nbd-server", value)
        args["addr"] = _socket_address("--nbd-server", value, args.get("addr"))
        _coerce_ints(args, ("max-connections", "handshake-max-seconds"))
        _execute(storage, "--nbd-server", value, "nbd-server-start", args)
    for value in config.export:
        args = _parse("--export", value)
        _coerce_bools(args, ("writable", "allocation-depth", "writethrough"))
        if isinstance(args.get("bitmaps"), str):
            args["bitmaps"] = [args["bitmaps"]]
        _execute(storage, "--export", value, "block-export-add", args)


def add_drive(storage: Storage, value: str) -> None:
    """``--drive id=virtio0,file=PATH,format=qcow2[,readonly=on]``: a node and a device."""
    args = _parse("--drive", value)
    device_id = args.pop("id", None)
    path = args.pop("file", None)
    if not device_id or not path:
        raise OptionError("--drive", value, "both id= and file= are needed")
    fmt = args.pop("format", None)
    if fmt is None:
        from fleece.block.qcow2.create import probe_format

        try:
            fmt = probe_format(path)
        except OSError as exc:
            raise OptionError("--drive", value, f"Could not open '{path}': {exc.strerror}") from exc
    read_only = args.pop("readonly", "off") in ("on", "true", "yes")
    if args:
        raise OptionError("--drive", value, f"Parameter '{sorted(args)[0]}' is unexpected")
    node_name = f"drive-{device_id}"
    _execute(storage, "--drive", value, "blockdev-add", {
        "driver": fmt, "node-name": node_name, "read-only": read_only,
        "file": {"driver": "file", "filename": path},
    })
    _execute(storage, "--drive", value, "device_add",
             {"driver": "virtio-blk", "id": device_id, "drive": node_name})


class Daemon:
    """The running daemon: one asyncio loop for QMP, ``Storage`` underneath."""

    def __init__(self, config: DaemonConfig, storage: Storage | None = None, *,
                 handle_signals: bool = True) -> None:
        self.config = config
        self.handle_signals = handle_signals
        self.storage = storage or Storage()
        self.qmp = QMPServer(self.storage, on_quit=lambda: self.request_shutdown("host-qmp-quit"))
        self._stop: asyncio.Event | None = None
        self._reason = "host-qmp-quit"
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Apply the options, then listen. Raises :class:`OptionError` (nothing left running)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._loop.run_in_executor(None, apply_options, self.storage, self.config)
            for value in self.config.qmp:
                await self._listen(value)
            if self.config.pidfile:
                self._write_pidfile(self.config.pidfile)
        except BaseException:
            await self.qmp.close()
            await self._loop.run_in_executor(None, self.storage.close)
            raise
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self.request_shutdown, "host-signal")

    async def _listen(self, value: str) -> None:
        kind, _, rest = value.partition(":")
        try:
            if kind == "unix" and rest:
                path = rest.split(",", 1)[0]
                await self.qmp.listen_unix(path)
            elif kind == "tcp" and rest:
                host, _, port = rest.split(",", 1)[0].rpartition(":")
                await self.qmp.listen_tcp(host or "127.0.0.1", int(port))
            else:
                raise OptionError("--qmp", value, "expected unix:PATH or tcp:HOST:PORT")
        except (OSError, ValueError) as exc:
            raise OptionError("--qmp", value, str(exc)) from exc

    def _write_pidfile(self, path: str) -> None:
        temporary = f"{path}.tmp"
        with open(temporary, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(temporary, path)

    def request_shutdown(self, reason: str) -> None:
        """Ask the daemon to shut down (from the loop's thread)."""
        self._reason = reason
        if self._stop is not None:
            self._stop.set()

    async def serve(self) -> None:
        """Run until ``quit`` or a signal, then shut down cleanly."""
        assert self._stop is not None and self._loop is not None
        await self._stop.wait()
        loop = self._loop
        await loop.run_in_executor(None, self.storage.cancel_all_jobs)
        self.storage.emit("SHUTDOWN", {"guest": False, "reason": self._reason})
        await self.qmp.flush()
        await loop.run_in_executor(None, self.storage.close)
        await self.qmp.close()
        if self.config.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.pidfile)


class DaemonThread:
    """A daemon on its own event loop in a background thread: ``fleece demo`` and the tests
    run the real daemon in-process this way and still talk to it over its sockets."""

    def __init__(self, config: DaemonConfig, storage: Storage | None = None) -> None:
        self.daemon = Daemon(config, storage, handle_signals=False)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fleece-daemon", daemon=True)

    @property
    def storage(self) -> Storage:
        return self.daemon.storage

    def _run(self) -> None:
        async def main() -> None:
            try:
                await self.daemon.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self.daemon.serve()

        asyncio.run(main())

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until the sockets accept; re-raises a start-up error here."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the daemon did not start in time")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down as ``quit`` does and wait for the thread."""
        loop = self.daemon._loop
        if loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.daemon.request_shutdown, "host-qmp-quit")
        self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


async def _main(config: DaemonConfig) -> int:
    try:
        configure_logging(config)
    except OptionError as exc:
        print(f"fleece daemon: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(config)
    try:
        await daemon.start()
    except OptionError as exc:
        print(f"fleece daemon: {exc}", file=sys.stderr)
        return 1
    await daemon.serve()
    return 0


#: glibc's M_MMAP_THRESHOLD option, and the value the daemon fixes it at
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 512 * 1024


def return_big_buffers() -> bool:
    """Fix glibc's mmap threshold at 512 KiB for this process: every buffer that big (NBD
    replies and payloads of 512 KiB and more, the sizes a hostile client would queue) gets its
    own mapping, unmapped when freed, so what a departed client held goes back to the system
    at once. glibc's default raises the threshold to the biggest buffer freed so far, after
    which such buffers come from heaps (one per I/O thread) that keep freed pages: after a TLS
    attack the daemon stayed 12-15 MiB above its baseline that way, with this under 1 MiB.
    Not lower: at 256 KiB, nbdcopy's 256 KiB requests each paid a fresh mapping's page faults
    (nbdcopy of the snapshot 916 MiB/s at 512 KiB, 532 at 256 KiB; docs/performance.md).
    False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def run_daemon(config: DaemonConfig) -> int:
    """Run the daemon in this process until it shuts down; returns the exit status."""
    return_big_buffers()
    if not config.qmp and not config.nbd_server and not config.export:
        print("fleece daemon: nothing to serve: give --qmp (and/or --nbd-server, --export)",
              file=sys.stderr)
        return 1
    return asyncio.run(_main(config))
