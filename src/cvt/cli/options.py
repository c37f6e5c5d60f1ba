"""Options and output shared by the commands that run a model on images (`cvt eval`, `cvt predict`): a positive
integer checked at parse time, `--batch-size` and `--backend`, the JSON result written once, and the one-line
hint when a batch runs out of memory."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from cvt.fileio import write_json
from cvt.inference import BACKENDS

# what torch's allocators say when memory runs out: CUDA's (torch.OutOfMemoryError) and the CPU's RuntimeError
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (`--batch-size 0` and `-3` are usage errors naming the value)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 1, got {number}")
    return number


def add_batch_size_option(parser: argparse.ArgumentParser, default: int) -> None:
    """`--batch-size N`: images per batch, N >= 1."""
    parser.add_argument("--batch-size", type=positive_int, default=default,
                        help=f"images per batch (default {default}; lower it if memory runs out)")  # fmt: skip


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    """`--backend`: what runs the optimized model."""
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="what runs the optimized model: torch, onnxruntime, openvino (converted once, cached) or "
                        "auto (default: the fastest measured on this machine, README: Performance)")  # fmt: skip


def print_stdout(text: str) -> bool:
    """Print `text` to stdout; False when the reader has gone (`cvt predict --json - | head`), without the
    BrokenPipeError Python would report, now and again when it flushes stdout at exit."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit-time flush goes nowhere instead of failing again
        os.close(devnull)
        return False
    return True


def emit_json(result: Any, target: str | None) -> bool:
    """Write `result` as JSON to stdout (`target` "-") or to the .json file `target`; True when it went to stdout
    (the command then prints nothing else there)."""
    if target == "-":
        print_stdout(json.dumps(result, indent=2))
        return True
    if target:
        write_json(result, target)
    return False


@contextlib.contextmanager
def batch_memory_hint(batch_size: int) -> Iterator[None]:
    """Turn running out of memory in the body into one line that names `--batch-size` and a smaller value."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not isinstance(err, MemoryError) and not any(marker in str(err) for marker in OUT_OF_MEMORY):
            raise
        smaller = f"--batch-size {batch_size // 2}" if batch_size > 1 else "a smaller input size or another device"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "no details"
        raise RuntimeError(
            f"out of memory with --batch-size {batch_size} ({type(err).__name__}: {detail}); try {smaller}"
        ) from err
