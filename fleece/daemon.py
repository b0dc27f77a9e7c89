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
import errno
import fcntl
import fnmatch
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleece.daemon_schema import BLOCKDEV, DRIVE, EXPORT, MONITOR, NBD_SERVER, OBJECT
from fleece.errors import QMPError
from fleece.heap import HeapTrimmer, limit_arenas, return_big_buffers
from fleece.keyval import KeyvalError, QType, parse_option, visit
from fleece.qmp.server import QMPServer
from fleece.storage import Storage


class StartupError(Exception):
    """Start-up failed; ``str()`` is the message printed after ``fleece daemon: ``."""


class OptionError(StartupError):
    """A command-line option that could not be applied: ``str()`` is ``OPTION VALUE: PROBLEM``
    (or ``--option=VALUE: PROBLEM`` when it was given so), as qemu-storage-daemon prints it."""

    def __init__(self, option: str, value: str, problem: str, *, location: str | None = None
                 ) -> None:
        super().__init__(f"{location or f'{option} {value}'}: {problem}")
        self.option = option
        self.problem = problem


@dataclass
class DaemonConfig:
    """What the command line asked for. ``options`` holds the options that build the daemon
    (``--blockdev``, ``--chardev``, ``--export``, ...) in command-line order as ``(option,
    value, location)``; when it is empty the per-kind lists below are used instead, in
    qemu-storage-daemon's usual order (objects, block nodes, drives, NBD server, exports, QMP)."""

    qmp: list[str] = field(default_factory=list)
    blockdev: list[str] = field(default_factory=list)
    drive: list[str] = field(default_factory=list)
    nbd_server: list[str] = field(default_factory=list)
    export: list[str] = field(default_factory=list)
    object: list[str] = field(default_factory=list)
    pidfile: str | None = None
    daemonize: bool = False
    log_level: str = "warning"
    #: ``-T``/``--trace`` options and ``-d`` item lists, as given
    trace: list[str] = field(default_factory=list)
    log_items: list[str] = field(default_factory=list)
    logfile: str | None = None
    options: list[tuple[str, str, str]] = field(default_factory=list)
    #: the first command-line argument that is not an option (refused after the options)
    unexpected: str | None = None

    def ordered(self) -> list[tuple[str, str, str]]:
        """``(option, value, location)`` in the order they are applied."""
        if self.options:
            return list(self.options)
        kinds = (("--object", self.object), ("--blockdev", self.blockdev),
                 ("--drive", self.drive), ("--nbd-server", self.nbd_server),
                 ("--export", self.export), ("--qmp", self.qmp))
        return [(option, value, f"{option} {value}") for option, values in kinds
                for value in values]

    def serves_something(self) -> bool:
        names = {option for option, _, _ in self.ordered()}
        return bool(names & {"--qmp", "--monitor", "--nbd-server", "--export"})


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


_log = logging.getLogger("fleece.daemon")

#: the keys QEMU's ``--chardev`` knows (any backend); fleece uses the first seven
CHARDEV_KEYS = (
    "backend", "id", "path", "host", "port", "server", "wait", "fd", "local", "localaddr",
    "localport", "to", "ipv4", "ipv6", "delay", "nodelay", "reconnect", "telnet", "tn3270",
    "websocket", "tls-creds", "tls-authz", "width", "height", "cols", "rows", "mux", "signal",
    "name", "debug", "size", "chardev", "append", "logfile", "logappend", "mouse", "clipboard",
    "abstract", "tight",
)
_CHARDEV_BOOLS = ("server", "wait", "ipv4", "ipv6", "delay", "nodelay", "telnet", "tn3270",
                  "websocket", "mux", "signal", "append", "logappend", "mouse", "clipboard",
                  "abstract", "tight")
_CHARDEV_USED = ("backend", "id", "path", "host", "port", "server", "wait")
#: QEMU's character device backends (fleece serves QMP on ``socket`` only)
CHARDEV_BACKENDS = ("socket", "null", "file", "pipe", "pty", "stdio", "ringbuf", "memory",
                    "udp", "serial", "tty", "parallel", "parport", "msmouse", "wctablet",
                    "braille", "testdev", "vc", "spicevmc", "spiceport", "qemu-vdagent", "dbus")
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


@dataclass
class Endpoint:
    """A QMP socket to listen on once every option is applied."""

    option: str
    value: str
    location: str
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0


@dataclass
class Chardev:
    id: str
    endpoint: Endpoint
    monitor: bool = False


@dataclass
class _Setup:
    """What start-up has built so far, beside ``Storage``."""

    chardevs: dict[str, Chardev] = field(default_factory=dict)
    endpoints: list[Endpoint] = field(default_factory=list)


def _typed(option: str, value: str, location: str, qtype: QType,
           implied: str | None) -> dict[str, Any]:
    try:
        tree, keyval = parse_option(value, implied)
        typed = visit(qtype, tree, keyval=keyval)
    except KeyvalError as exc:
        raise OptionError(option, value, str(exc), location=location) from exc
    assert isinstance(typed, dict)
    return typed


def _execute(storage: Storage, option: str, value: str, location: str, command: str,
             arguments: dict[str, Any]) -> Any:
    try:
        return storage.execute(command, arguments)
    except QMPError as exc:
        raise OptionError(option, value, exc.desc, location=location) from exc


def _cache_refusal(options: dict[str, Any], prefix: str = "") -> str | None:
    """The first ``cache.direct=on`` / ``cache.no-flush=on`` in a tree of BlockdevOptions."""
    cache = options.get("cache")
    if isinstance(cache, dict):
        if cache.get("direct"):
            return (f"{prefix}cache.direct=on is not supported: fleece does not open images "
                    "with O_DIRECT")
        if cache.get("no-flush"):
            return (f"{prefix}cache.no-flush=on is not supported: fleece always passes "
                    "flushes on")
    for key, child in options.items():
        if isinstance(child, dict) and key != "cache":
            found = _cache_refusal(child, f"{prefix}{key}.")
            if found:
                return found
    return None


def _resolve_port(host: str, port: str) -> int:
    """The TCP port ``port`` names for listening on ``host``; QEMU's words when it cannot.
    Stricter than QEMU, which wraps a number above 65535 (99999 listens on 34463)."""
    if port.isdigit() and int(port) > 65535:
        raise ValueError(f"port {port} out of range")
    try:
        infos = socket.getaddrinfo(host or None, port or None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"address resolution failed for {host}:{port}: {exc.strerror}"
                         ) from None
    return int(infos[0][4][1])


def _nbd_server(storage: Storage, option: str, value: str, location: str) -> None:
    args = _typed(option, value, location, NBD_SERVER, None)
    addr = args["addr"]
    kind = addr.pop("type")

    def refuse(problem: str) -> OptionError:
        return OptionError(option, value, problem, location=location)

    if kind not in ("inet", "unix"):
        raise refuse(f"NBD server address type '{kind}' is not supported by fleece "
                     "(inet, unix)")
    for key in ("to", "ipv4", "ipv6", "keep-alive", "mptcp", "abstract"):
        if key in addr:
            raise refuse(f"Parameter 'addr.{key}' is not supported by fleece")
    if kind == "inet":
        try:
            port = _resolve_port(addr["host"], addr["port"])
        except ValueError as exc:
            raise refuse(str(exc)) from None
        data: dict[str, Any] = {"host": addr["host"], "port": str(port)}
    else:
        data = {"path": addr["path"]}
    args["addr"] = {"type": kind, "data": data}
    _execute(storage, option, value, location, "nbd-server-start", args)


def _object(storage: Storage, option: str, value: str, location: str) -> None:
    args = _typed(option, value, location, OBJECT, "qom-type")
    if args["qom-type"] == "tls-creds-x509" and "dir" not in args:
        raise OptionError(option, value, "Missing 'dir' property value", location=location)
    _execute(storage, option, value, location, "object-add", args)


def _qemu_opts(option: str, value: str, location: str, implied: str) -> dict[str, str]:
    """QemuOpts syntax (``--chardev``): ``key=value,...``, the first bare word is ``implied``,
    a later bare ``key`` means ``key=on`` and ``nokey`` means ``key=off`` (deprecated forms,
    warned about as QEMU does); the last of repeated keys wins."""
    result: dict[str, str] = {}
    pos, first = 0, True
    while pos < len(value):
        length = 0
        while pos + length < len(value) and value[pos + length] not in "=,":
            length += 1
        name = value[pos:pos + length]
        bare = pos + length >= len(value) or value[pos + length] != "="
        if bare and not first:
            short = name
            name, flag = (name[2:], "off") if name.startswith("no") else (name, "on")
            print(f"fleece daemon: {location}: warning: short-form boolean option '{short}' "
                  f"deprecated\nPlease use {name}={flag} instead", file=sys.stderr)
            result[name] = flag
            pos += length + 1
            first = False
            continue
        i = pos if bare else pos + length + 1
        chars: list[str] = []
        while i < len(value):
            if value[i] == ",":
                if value[i + 1:i + 2] != ",":
                    break
                i += 1
            chars.append(value[i])
            i += 1
        result[implied if bare else name] = "".join(chars)
        pos, first = i + 1, False
    for name, text in result.items():
        if name not in CHARDEV_KEYS:
            raise OptionError(option, value, f"Invalid parameter '{name}'", location=location)
        if name in _CHARDEV_BOOLS and text not in ("on", "yes", "true", "y", "off", "no",
                                                   "false", "n"):
            raise OptionError(option, value, f"Parameter '{name}' expects 'on' or 'off'",
                              location=location)
    if "id" in result and not _ID.fullmatch(result["id"]):
        raise OptionError(option, value, "Parameter 'id' expects an identifier",
                          location=location)
    return result


def _on(opts: dict[str, str], key: str, default: bool) -> bool:
    return opts[key] in ("on", "yes", "true", "y") if key in opts else default


def _chardev(setup: _Setup, option: str, value: str, location: str) -> None:
    opts = _qemu_opts(option, value, location, "backend")

    def refuse(problem: str) -> OptionError:
        return OptionError(option, value, problem, location=location)

    backend, chardev_id = opts.get("backend"), opts.get("id")
    if backend is None:
        raise refuse(f'chardev: "{chardev_id}" missing backend')
    if chardev_id is None:
        raise refuse("chardev: no id specified")
    if backend not in CHARDEV_BACKENDS:
        raise refuse(f"'{backend}' is not a valid char driver name")
    if backend != "socket":
        raise refuse(f"chardev backend '{backend}' is not supported by fleece (it has socket)")
    if chardev_id in setup.chardevs:
        raise refuse(f"Duplicate ID '{chardev_id}' for chardev")
    path, host = opts.get("path"), opts.get("host")
    if path is None and host is None:
        raise refuse(f"Unable to parse FD number {opts.get('fd', '')}")
    if path is None and "port" not in opts:
        raise refuse("chardev: socket: no port given")
    for key in opts:
        if key not in _CHARDEV_USED:
            raise refuse(f"chardev option '{key}' is not supported by fleece")
    if not _on(opts, "server", False):
        raise refuse("server=off is not supported by fleece: the daemon listens for QMP "
                     "clients, it does not connect to them (give server=on,wait=off)")
    if _on(opts, "wait", True):
        raise refuse("wait=on is not supported by fleece: start-up does not stop for the "
                     "first client (give wait=off)")
    if path is not None:
        endpoint = Endpoint(option, value, location, "unix", path=path)
    else:
        assert host is not None
        try:
            port = _resolve_port(host, opts["port"])
        except ValueError as exc:
            raise refuse(str(exc)) from None
        endpoint = Endpoint(option, value, location, "tcp", host=host, port=port)
    setup.chardevs[chardev_id] = Chardev(chardev_id, endpoint)


def _monitor(setup: _Setup, option: str, value: str, location: str) -> None:
    args = _typed(option, value, location, MONITOR, "chardev")
    if args.get("mode", "control") != "control":
        raise OptionError(option, value, "Only QMP is supported", location=location)
    if args.get("pretty"):
        raise OptionError(option, value, "pretty=on is not supported by fleece",
                          location=location)
    chardev = setup.chardevs.get(args["chardev"])
    if chardev is None:
        raise OptionError(option, value, f'chardev "{args["chardev"]}" not found',
                          location=location)
    if chardev.monitor:
        raise OptionError(option, value, f"Device '{chardev.id}' is in use", location=location)
    chardev.monitor = True
    setup.endpoints.append(chardev.endpoint)


def _qmp(setup: _Setup, option: str, value: str, location: str) -> None:
    """``--qmp unix:PATH`` or ``--qmp tcp:HOST:PORT`` (fleece's short form of a socket
    chardev with ``server=on,wait=off`` and a monitor on it; QEMU's ``-qmp`` suffixes
    ``,server=on,wait=off`` are allowed)."""
    kind, _, rest = value.partition(":")
    address, *flags = rest.split(",")
    if any(flag not in ("server", "server=on", "nowait", "wait=off") for flag in flags):
        raise OptionError(option, value, "only ',server=on,wait=off' may follow the address",
                          location=location)
    if kind == "unix" and address:
        setup.endpoints.append(Endpoint(option, value, location, "unix", path=address))
        return
    host, _, port = address.rpartition(":")
    if kind == "tcp" and port:
        try:
            number = _resolve_port(host, port)
        except ValueError as exc:
            raise OptionError(option, value, str(exc), location=location) from None
        setup.endpoints.append(Endpoint(option, value, location, "tcp", host=host or "127.0.0.1",
                                        port=number))
        return
    raise OptionError(option, value, "expected unix:PATH or tcp:HOST:PORT", location=location)


def apply_options(storage: Storage, config: DaemonConfig) -> list[Endpoint]:
    """Apply the options to ``storage`` in order; returns the QMP sockets to open.
    Raises :class:`OptionError` with QEMU's words for the first option that fails."""
    setup = _Setup()
    for option, value, location in config.ordered():
        try:
            _apply_one(storage, setup, option, value, location)
        except OptionError:
            raise
        except Exception as exc:  # a bug: no Python text reaches the user, the log has it
            _log.debug("applying %s failed", location, exc_info=True)
            raise OptionError(option, value, "internal error (the debug log has the details: "
                              "--log-level debug)", location=location) from exc
    if config.unexpected is not None:
        raise StartupError(f"{config.unexpected}: Unexpected argument")
    if not config.serves_something():
        raise StartupError("nothing to serve: give --qmp or --chardev with --monitor (and/or "
                           "--nbd-server, --export)")
    return setup.endpoints


def _apply_one(storage: Storage, setup: _Setup, option: str, value: str, location: str
               ) -> None:
    if option == "--blockdev":
        args = _typed(option, value, location, BLOCKDEV, "driver")
        refusal = _cache_refusal(args)
        if refusal:
            raise OptionError(option, value, refusal, location=location)
        _execute(storage, option, value, location, "blockdev-add", args)
    elif option == "--drive":
        add_drive(storage, value, location)
    elif option == "--export":
        args = _typed(option, value, location, EXPORT, "type")
        if storage.graph.find(args["node-name"]) is None:  # QEMU looks the node up first
            raise OptionError(option, value,
                              f"Cannot find device='' nor node-name='{args['node-name']}'",
                              location=location)
        _execute(storage, option, value, location, "block-export-add", args)
    elif option == "--nbd-server":
        _nbd_server(storage, option, value, location)
    elif option == "--object":
        _object(storage, option, value, location)
    elif option == "--chardev":
        _chardev(setup, option, value, location)
    elif option == "--monitor":
        _monitor(setup, option, value, location)
    elif option == "--qmp":
        _qmp(setup, option, value, location)
    else:
        raise AssertionError(option)


def add_drive(storage: Storage, value: str, location: str | None = None) -> None:
    """``--drive id=virtio0,file=PATH[,format=qcow2|raw][,readonly=on]``: a node named
    ``drive-ID`` and a virtio-blk device ``ID`` on it (fleece's; not in qemu-storage-daemon)."""
    option = "--drive"
    location = location or f"{option} {value}"
    args = _typed(option, value, location, DRIVE, None)
    path = args["file"]
    fmt = args.get("format")
    if fmt is None:
        from fleece.block.qcow2.create import probe_format

        try:
            fmt = probe_format(path)
        except OSError as exc:
            raise OptionError(option, value, f"Could not open '{path}': {exc.strerror}",
                              location=location) from exc
    node_name = f"drive-{args['id']}"
    _execute(storage, option, value, location, "blockdev-add", {
        "driver": fmt, "node-name": node_name, "read-only": args.get("readonly", False),
        "file": {"driver": "file", "filename": path},
    })
    _execute(storage, option, value, location, "device_add",
             {"driver": "virtio-blk", "id": args["id"], "drive": node_name})


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
        self._pidfile: PidFile | None = None
        #: called once start-up is complete (``--daemonize`` lets the parent go then)
        self.on_ready: Callable[[], None] | None = None

    async def start(self) -> None:
        """Apply the options, then listen, then write the pid file. Raises
        :class:`StartupError` (nothing left running)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            endpoints = await self._loop.run_in_executor(None, apply_options, self.storage,
                                                         self.config)
            for endpoint in endpoints:
                await self._listen(endpoint)
            if self.config.pidfile:
                self._pidfile = write_pidfile(self.config.pidfile)
        except BaseException:
            await self.qmp.close()
            await self._loop.run_in_executor(None, self.storage.close)
            raise
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._loop.add_signal_handler(sig, self.request_shutdown, "host-signal")
        if self.on_ready is not None:
            self.on_ready()

    async def _listen(self, endpoint: Endpoint) -> None:
        try:
            if endpoint.kind == "unix":
                await self.qmp.listen_unix(endpoint.path)
            else:
                await self.qmp.listen_tcp(endpoint.host, endpoint.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if endpoint.kind == "unix":
                problem = f"Failed to bind socket to {endpoint.path}: {reason}"
            elif exc.errno == errno.EADDRINUSE:
                problem = f"Failed to find an available port: {reason}"
            else:
                problem = f"Failed to bind socket: {reason}"
            raise OptionError(endpoint.option, endpoint.value, problem,
                              location=endpoint.location) from exc

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
        await loop.run_in_executor(None, self.storage.job_commands.cancel_all_jobs)
        self.storage.emit("SHUTDOWN", {"guest": False, "reason": self._reason})
        await self.qmp.flush()
        await loop.run_in_executor(None, self.storage.close)
        await self.qmp.close()
        if self._pidfile is not None:
            self._pidfile.remove()


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


class PidFile:
    """qemu-storage-daemon's pid file: created 0600, locked (``lockf``) for the daemon's life
    so a second daemon with the same path fails, removed on exit."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


def write_pidfile(path: str) -> PidFile:
    """Create, lock and fill the pid file; :class:`StartupError` in QEMU's words."""
    path = os.path.abspath(path)
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot create PID file: Could not create '{path}': "
                               f"{exc.strerror}") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            code = errno.EAGAIN if exc.errno == errno.EACCES else exc.errno or errno.EAGAIN
            raise StartupError("cannot create PID file: Cannot lock pid file: "
                               + os.strerror(code)) from exc
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed or replaced between open and lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return PidFile(path, fd)


async def _main(config: DaemonConfig, on_ready: Callable[[], None] | None = None) -> int:
    try:
        configure_logging(config)
    except OptionError as exc:
        print(f"fleece daemon: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(config)
    daemon.on_ready = on_ready
    try:
        await daemon.start()
    except StartupError as exc:
        print(f"fleece daemon: {exc}", file=sys.stderr)
        return 1
    await daemon.serve()
    return 0


def _daemonize() -> Callable[[], None] | None:
    """Fork: the parent waits until the child's start-up is complete and exits 0 then (or 1
    when the child fails); the child gets a new session and returns the function that tells
    the parent, and points its standard streams at /dev/null once started."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        status = os.read(read_end, 1)
        if status == b"\0":
            os._exit(0)
        os.waitpid(pid, 0)
        os._exit(1)
    os.close(read_end)
    os.setsid()

    def ready() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(write_end, b"\0")
        os.close(write_end)

    return ready


def run_daemon(config: DaemonConfig) -> int:
    """Run the daemon in this process until it shuts down; returns the exit status."""
    return_big_buffers()
    limit_arenas()
    on_ready = _daemonize() if config.daemonize else None
    trimmer = HeapTrimmer()  # after the fork: a thread does not survive it
    trimmer.start()
    try:
        return asyncio.run(_main(config, on_ready))
    finally:
        trimmer.stop()
