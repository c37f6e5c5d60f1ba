"""Command-line usage helpers: `UsageError` (arguments found not to work together after parsing: exit code 2, as
argparse's own), `DeprecatedAlias` (an old option spelling that still works and says which one replaces it),
`add_json_option` (the one `--json [FILE]` of the commands that report results), `add_overwrite_option` (the one
`--overwrite` of the commands that write a folder) and `checked_int` (a number option checked at parse time)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from cvt._optional import MissingExtraError


class UsageError(ValueError):
    """A combination of command-line arguments that cannot work; `cvt` prints it in one line and exits 2."""


def _json_target(value: str) -> str:
    if value != "-" and not value.endswith(".json"):  # e.g. `--json photo.jpg folder/`: never overwrite an image
        raise argparse.ArgumentTypeError(f"takes a .json file or '-' (stdout), got {value!r}")
    return value


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    """`--json [FILE]`: `what` as JSON to FILE (a .json file), or to stdout without FILE or with '-'."""
    parser.add_argument("--json", nargs="?", const="-", default=None, type=_json_target, metavar="FILE",
                        help=f"{what} as JSON: to FILE (.json), or to stdout instead of text without FILE or "
                        "with '-'")  # fmt: skip


def checked_int(check: Callable[[int], int]) -> Callable[[str], int]:
    """An argparse `type`: a whole number that `check` returns; its ValueError (or a missing extra it needs)
    becomes argparse's error line naming the option: `argument --opset: opset 1 is outside ...`."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        try:
            return check(number)
        except (ValueError, MissingExtraError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`: write into an output folder that holds files cvt did not write (`cvt.outputs`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an output folder that holds files cvt did not write, replacing those of "
                        "the same names (without it such a folder is refused)")  # fmt: skip


class DeprecatedAlias(argparse.Action):
    """Store the value like `store`; given under `old` (one of the option strings), print one deprecation line.

    Use: `p.add_argument("--arch", "--model", action=DeprecatedAlias, old="--model", ...)`.
    """

    def __init__(self, option_strings: list[str], dest: str, *, old: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.old = old

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        if option_string == self.old:
            new = next(s for s in self.option_strings if s != self.old)
            print(f"{parser.prog}: {self.old} is deprecated here, use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)
