"""The `cvt` command line: one sub-command per module in this package, each thin over the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from cvt import __version__
from cvt._optional import MissingExtraError
from cvt.allocator import keep_freed_memory
from cvt.cli.usage import UsageError

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
    "cvt.cli.push",
    "cvt.cli.export",
    "cvt.cli.attention",
    "cvt.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="CvT: Convolutional vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    for sub in subparsers.choices.values():  # global options are accepted after the sub-command too
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    return parser


def _message(err: Exception) -> str:
    """`err`'s message; of an error re-raised from a DataLoader worker, only the original's (torch writes the
    worker's whole traceback into the message)."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].partition(": ")[2] or text
    return text


# errors that say what is wrong with the input or the environment: one line, no traceback (unless -v)
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, MissingExtraError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code: 0, 1 for a failure, 2 for a usage error."""
    args = build_parser().parse_args(argv)  # a usage error exits here with argparse's message and code 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it prints through its own handler: not twice
    if args.command in HEAVY_COMMANDS:
        keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if args.verbose:
            traceback.print_exc()
        if isinstance(err, USER_ERRORS):
            print(f"cvt {args.command}: error: {_message(err)}", file=sys.stderr)
            return 2 if isinstance(err, UsageError) else 1
        # not foreseen: say what it was; -v shows where
        hint = "" if args.verbose else f" (cvt {args.command} -v shows the traceback)"
        print(f"cvt {args.command}: error: {type(err).__name__}: {err}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
