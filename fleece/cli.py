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

    demo = sub.add_parser("demo", help="run the main job on a built-in sample disk")
    demo.add_argument("--size", type=_size, default=parse_size("256M"),
                      help="sample disk size, as qemu-img takes it (64M, 1G); default 256M")
    demo.add_argument("--dir", default=None,
                      help="keep the demo's files in this folder (default: a temporary one)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the synthetic guest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from fleece.demo import run_demo

        return run_demo(size=args.size, folder=args.dir, seed=args.seed)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
