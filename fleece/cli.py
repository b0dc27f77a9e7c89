"""The ``fleece`` command (also ``python -m fleece``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fleece import __version__
from fleece.units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _multi_conn(text: str) -> int:
    """``fleece demo --multi-conn``: the nbd driver's bound, 1 to 16."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer from 1 to 16, got {text!r}") from None
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"from 1 to 16, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleece",
        description="Export a point-in-time snapshot of a live virtual disk over NBD.",
    )
    parser.add_argument("--version", action="version", version=f"fleece {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "daemon", add_help=False,
        help="run the storage daemon (QMP and NBD): qemu-storage-daemon's command line "
             "(fleece daemon --help)")
    demo = sub.add_parser("demo", help="run the main job on a built-in sample disk")
    demo.add_argument("--size", type=_size, default=parse_size("1G"),
                      help="sample disk size, as qemu-img takes it (64M, 1G); default 1G")
    demo.add_argument("--dir", default=None,
                      help="keep the demo's files in this folder (default: a temporary one)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the synthetic guest")
    demo.add_argument("--push", action="store_true",
                      help="show push backup instead: the snapshot pushed over NBD to a local "
                           "backup server while the guest writes, then checked")
    demo.add_argument("--push-server", choices=("qemu-nbd", "fleece"), default=None,
                      help="with --push: the backup server (default: qemu-nbd when installed, "
                           "else a second fleece Storage)")
    demo.add_argument("--multi-conn", type=_multi_conn, default=None, metavar="N",
                      help="with --push: the nbd node's multi-conn, 1 to 16 (default 1)")
    return parser


DAEMON_HELP = """\
Usage: fleece daemon [options]
fleece storage daemon: qemu-storage-daemon's command line, QMP and NBD exports

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         debug lines of the subsystems <pattern> matches:
                         nbd_*, qmp_*, block_*, jobs_*, * (QEMU's spelling)
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=off][,cache.no-flush=off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block node (drivers: file, raw, qcow2,
                         null-co, blkdebug, copy-before-write, snapshot-access);
                         key=value with dotted keys, or JSON ('{"driver": ...}')

  --chardev socket,id=<id>,path=<path>,server=on,wait=off
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off
                         a socket for a QMP monitor (see --monitor)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmaps.0=<name>][,allocation-depth=on|off]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control]
                         configure a QMP monitor on a --chardev

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes
                         (fleece's: [,handshake-max-seconds=<s>], default 10)

  --object tls-creds-x509,id=<id>,dir=<dir>[,endpoint=server|client]
           [,verify-peer=on|off]
                         create an object (fleece has tls-creds-x509)

  --pidfile <path>       write process ID to a file after startup

fleece's own options:
  --qmp unix:<path> | tcp:<host>:<port>
                         QMP on a socket: short for --chardev socket,...,
                         server=on,wait=off plus --monitor on it
  --drive id=<id>,file=<path>[,format=qcow2|raw][,readonly=on|off]
                         a block node and a virtio-blk device <id> on it (the
                         device a harness or drive-backup names)
  --log-level debug|info|warning|error
                         log lines at this level and above (default warning:
                         the NBD audit lines are warnings)
  -d <item>[,<item>...]  QEMU's log items: guest_errors, trace:<pattern>
  -D, --logfile <file>   log to <file>, not stderr

Options are applied in the order given, as qemu-storage-daemon does.

Examples:
  Export raw image file disk.img over NBD UNIX domain socket nbd.sock:
    fleece daemon \\
        --blockdev driver=file,node-name=disk,filename=disk.img \\
        --nbd-server addr.type=unix,addr.path=nbd.sock \\
        --export type=nbd,id=export,node-name=disk,writable=on

  A qcow2 image, a QMP monitor on qmp.sock, an NBD export and a pid file:
    fleece daemon \\
        --blockdev driver=file,node-name=file,filename=disk.qcow2 \\
        --blockdev driver=qcow2,node-name=qcow2,file=file \\
        --chardev socket,path=qmp.sock,server=on,wait=off,id=char1 \\
        --monitor chardev=char1 \\
        --nbd-server addr.type=unix,addr.path=nbd.sock \\
        --export type=nbd,id=export,node-name=qcow2 \\
        --pidfile daemon.pid

  Fleecing with QMP (drive-backup ... target-id=pit0, then nbd-server-add):
    fleece daemon --qmp unix:qmp.sock \\
        --drive id=virtio0,file=disk.qcow2 \\
        --nbd-server addr.type=unix,addr.path=nbd.sock
"""

#: the options that build the daemon, applied in command-line order
_BUILDING = ("blockdev", "chardev", "drive", "export", "monitor", "nbd-server", "object", "qmp")
#: long option -> takes an argument
_LONG = {**{name: True for name in _BUILDING}, "daemonize": False, "help": False,
         "logfile": True, "log-level": True, "pidfile": True, "trace": True, "version": False}
#: short option -> (long name, takes an argument)
_SHORT = {"h": ("help", False), "T": ("trace", True), "V": ("version", False),
          "d": ("log-items", True), "D": ("logfile", True)}


class UsageError(Exception):
    """A command line getopt_long refuses; ``str()`` is glibc's message."""


def getopt_daemon(argv: Sequence[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``getopt_long`` as qemu-storage-daemon calls it (GNU: unambiguous prefixes of long
    options, ``--opt=value`` or ``--opt value``, short options clustered, non-options
    permuted to the end). Returns ``([(name, value, location)], non_options)``; raises
    :class:`UsageError` with glibc's words."""
    found: list[tuple[str, str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            rest += argv[i:]
            break
        if arg.startswith("--"):
            text, has_value, inline = arg[2:].partition("=")
            matches = [name for name in _LONG if name.startswith(text)]
            if text in _LONG:
                matches = [text]
            if not matches:
                raise UsageError(f"unrecognized option '{arg}'")
            if len(matches) > 1:
                raise UsageError(f"option '--{text}' is ambiguous; possibilities:"
                                 + "".join(f" '--{name}'" for name in matches))
            name = matches[0]
            if not _LONG[name]:
                if has_value:
                    raise UsageError(f"option '--{name}' doesn't allow an argument")
                found.append((name, "", arg))
            elif has_value:
                found.append((name, inline, arg))
            elif i < len(argv):
                found.append((name, argv[i], f"{arg} {argv[i]}"))
                i += 1
            else:
                raise UsageError(f"option '--{name}' requires an argument")
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                j += 1
                if letter not in _SHORT:
                    raise UsageError(f"invalid option -- '{letter}'")
                name, needs = _SHORT[letter]
                if not needs:
                    found.append((name, "", f"-{letter}"))
                    continue
                if j < len(arg):
                    found.append((name, arg[j:], arg))
                elif i < len(argv):
                    found.append((name, argv[i], f"-{letter} {argv[i]}"))
                    i += 1
                else:
                    raise UsageError(f"option requires an argument -- '{letter}'")
                break
        else:
            rest.append(arg)
    return found, rest


def daemon_main(argv: Sequence[str]) -> int:
    """``fleece daemon ARGS``: qemu-storage-daemon's command line (plus fleece's options)."""
    from fleece.daemon import DaemonConfig, run_daemon

    try:
        found, rest = getopt_daemon(argv)
    except UsageError as exc:
        print(f"fleece daemon: {exc}", file=sys.stderr)
        return 1
    config = DaemonConfig()
    for name, value, location in found:
        if name == "help":
            print(DAEMON_HELP, end="")
            return 0
        if name == "version":
            print(f"fleece daemon version {__version__} (a drop-in for qemu-storage-daemon 7.2)")
            return 0
        if name in _BUILDING:
            config.options.append((f"--{name}", value, location))
        elif name == "pidfile":
            config.pidfile = value
        elif name == "daemonize":
            config.daemonize = True
        elif name == "trace":
            config.trace.append(value)
        elif name == "log-items":
            config.log_items.append(value)
        elif name == "logfile":
            config.logfile = value
        elif name == "log-level":
            config.log_level = value
    if rest:
        config.unexpected = rest[0]
    return run_daemon(config)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["daemon"]:
        return daemon_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "demo":
        from fleece.demo import run_demo

        if not args.push and (args.multi_conn is not None or args.push_server is not None):
            parser.error("--multi-conn and --push-server need --push")
        return run_demo(size=args.size, folder=args.dir, seed=args.seed, push=args.push,
                        push_server=args.push_server, multi_conn=args.multi_conn or 1)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
