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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleece",
        description="Export a point-in-time snapshot of a live virtual disk over NBD.",
    )
    parser.add_argument("--version", action="version", version=f"fleece {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = sub.add_parser(
        "daemon", help="run the storage daemon (QMP and NBD), like qemu-storage-daemon"
    )
    daemon.add_argument("--qmp", action="append", default=[], metavar="unix:PATH|tcp:HOST:PORT",
                        help="serve QMP on this socket (repeatable)")
    daemon.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                        help="a block node: JSON, or key=value with dotted keys (repeatable)")
    daemon.add_argument("--drive", action="append", default=[], metavar="OPTIONS",
                        help="id=NAME,file=PATH[,format=qcow2|raw][,readonly=on]: a node and "
                             "a device named NAME (repeatable)")
    daemon.add_argument("--nbd-server", action="append", default=[], metavar="OPTIONS",
                        help="addr.type=unix,addr.path=P or addr.type=inet,addr.host=H,"
                             "addr.port=N[,tls-creds=ID][,max-connections=N (default 100; 0: "
                             "none)][,handshake-max-seconds=S (default 10; 0: none)]")
    daemon.add_argument("--export", action="append", default=[], metavar="OPTIONS",
                        help="type=nbd,id=ID,node-name=N[,name=NAME][,writable=on] (repeatable)")
    daemon.add_argument("--object", action="append", default=[], metavar="OPTIONS",
                        help="tls-creds-x509,id=ID,dir=D,endpoint=server[,verify-peer=on]")
    daemon.add_argument("--pidfile", default=None, help="write the daemon's pid here")
    daemon.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="log lines at this level and above go to stderr (default warning: "
                             "the NBD audit lines are warnings)")
    daemon.add_argument("-T", "--trace", action="append", default=[],
                        metavar="[enable=]PATTERN[,events=FILE][,file=FILE]",
                        help="debug lines of the subsystems PATTERN matches: nbd_*, qmp_*, "
                             "block_*, jobs_*, * (QEMU's spelling; repeatable)")
    daemon.add_argument("-d", dest="log_items", action="append", default=[],
                        metavar="ITEM[,ITEM...]",
                        help="QEMU's log items: guest_errors (the NBD audit lines whatever the "
                             "level), trace:PATTERN (as -T)")
    daemon.add_argument("-D", "--logfile", default=None, help="log to this file, not stderr")

    demo = sub.add_parser("demo", help="run the main job on a built-in sample disk")
    demo.add_argument("--size", type=_size, default=parse_size("1G"),
                      help="sample disk size, as qemu-img takes it (64M, 1G); default 1G")
    demo.add_argument("--dir", default=None,
                      help="keep the demo's files in this folder (default: a temporary one)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the synthetic guest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "daemon":
        from fleece.daemon import DaemonConfig, run_daemon

        return run_daemon(DaemonConfig(
            qmp=args.qmp, blockdev=args.blockdev, drive=args.drive, nbd_server=args.nbd_server,
            export=args.export, object=args.object, pidfile=args.pidfile,
            log_level=args.log_level, trace=args.trace, log_items=args.log_items,
            logfile=args.logfile,
        ))
    if args.command == "demo":
        from fleece.demo import run_demo

        return run_demo(size=args.size, folder=args.dir, seed=args.seed)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
