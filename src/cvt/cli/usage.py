"""Command-line usage helpers: `UsageError` (arguments found not to work together after parsing: exit code 2, as
argparse's own), `DeprecatedAlias` (an old option spelling that still works and says which one replaces it),
`add_json_option` (the one `--json [FILE]` of the commands that report results), `add_input_size_option` (the
one `--input-size N | H W`), `add_overwrite_option` (the one `--overwrite` of the commands that write a folder),
`checked_int` (a number option checked at parse time) and `DeviceAction` (the one check of every `--device`: a device
this machine has, refused at parse time otherwise)."""

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


class _InputSize(argparse.Action):
    """Store N or H W as (H, W); any other count is the parser's error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        if len(values) not in (1, 2):
            parser.error(f"{option_string} takes N or H W, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, (values[0], values[-1]))


def add_input_size_option(
    parser: argparse.ArgumentParser, help: str, type: Callable[[str], int] = int
) -> None:
    """`--input-size N | H W` (alias `--res`), parsed to (H, W), None when not given; `type` parses each number."""
    parser.add_argument("--input-size", "--res", dest="input_size", type=type, nargs="+", default=None,
                        action=_InputSize, metavar="N", help=f"{help}: N (square) or H W")  # fmt: skip


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


def _device_problem(value: str) -> str | None:
    """Why `value` is no device this process can use, or None when it is one."""
    import torch  # here, not at import time: `cvt --help` stays light

    try:
        device = torch.device(value)
    except RuntimeError:
        return "not a device; use cpu or cuda (cuda:N for one GPU)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                return f"CUDA is not available: this torch ({torch.__version__}) is built without it; use cpu"
            return f"CUDA is not available: no GPU is visible to this torch ({torch.__version__}); use cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"there is no GPU {device.index}: {torch.cuda.device_count()} visible (cuda:0 to cuda:N-1)"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine; use cpu"
    elif device.type not in ("cpu", "mps"):
        return f"{device.type!r} devices are not supported here; use cpu or cuda"
    return None


class DeviceAction(argparse.Action):
    """`--device`: a device this machine has (cpu, cuda, cuda:N, mps; `auto` where the command allows it, with
    `choices`), checked at parse time: "--device cuda: CUDA is not available ..." and exit 2, never a traceback from
    deep inside torch later. Use: `p.add_argument("--device", action=DeviceAction, default="cpu", help=...)`.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        problem = None if values in (self.choices or ()) and values == "auto" else _device_problem(values)
        if problem:
            parser.error(f"{option_string} {values}: {problem}")
        setattr(namespace, self.dest, values)
