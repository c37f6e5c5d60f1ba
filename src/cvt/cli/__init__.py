"""The `cvt` command line: one sub-command per module in this package, each thin over the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cvt import __version__
from cvt.allocator import keep_freed_memory

# the commands that own a compute-heavy process keep freed memory for reuse (see cvt.allocator)
HEAVY_COMMANDS = ("train", "eval", "predict", "demo")

# Each module defines `add_parser(subparsers)`, which registers its sub-command(s) with `func=run`.
COMMAND_MODULES = (
    "cvt.cli.info",
    "cvt.cli.demo",
    "cvt.cli.train",
    "cvt.cli.eval",
    "cvt.cli.predict",
    "cvt.cli.ablations",
    "cvt.cli.data",
    "cvt.cli.convert",
    "cvt.cli.export",
    "cvt.cli.attention",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: Convolutional vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command in HEAVY_COMMANDS:
        keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"cvt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
