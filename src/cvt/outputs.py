"""Where a command may write: the one rule of every writer (`cvt convert`, `cvt export`, `cvt attention`,
`save_model`, the staging folder of `push_to_hub`, `write_shards`, a training run's directory).

1. An output never is, contains or resolves to one of the command's inputs (symbolic links, `..` and hard links
   are seen through), and never lies inside an input dataset, where it would become part of the data. Such a
   command is refused before any work, in one line naming both paths.
2. A folder output is written only when it is new, empty, or this project's own: every folder writer first puts
   the marker `.cvt-output.json` ({"format": "cvt.output", "writer": ...}) into it, before any other file, so an
   interrupted write is recognised too (a training run, after taking its lock; a run directory from before the
   marker is known by its `last.pt`). A folder holding anything else is written into only with
   `overwrite=True` (`--overwrite`): the files of the writer's names are replaced, the others left, and the
   folder is marked as the project's from then on.
3. A file output is replaced atomically (`cvt.fileio`), like `cp` replaces its target; a folder in its place, or
   a file where its folder should be, is refused with a message saying what to give instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .fileio import write_json

MARKER = ".cvt-output.json"
MARKER_FORMAT = "cvt.output"

PathLike = str | os.PathLike


class OutputError(ValueError):
    """An output that would destroy an input or files this project did not write; the message says what to do."""


def _same(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file or folder: the same inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies anywhere below it (links and `..` resolved)."""
    resolved = path.resolve()
    return any(_same(parent, folder) for parent in (resolved, *resolved.parents))


def input_paths(inputs: Iterable[PathLike | None]) -> list[Path]:
    """The inputs that name something on disk: None and what does not exist (a registered model name) are left out;
    a shard pattern with braces ("data/shard-{000..009}.tar") stands for its folder."""
    paths = []
    for item in inputs:
        if item is None:
            continue
        path = Path(item).expanduser()
        if "{" in path.name:
            path = path.parent
        if path.exists():
            paths.append(path)
    return paths


def check_output(
    output: PathLike,
    inputs: Iterable[PathLike | None] = (),
    *,
    folder: bool,
    datasets: Iterable[PathLike | None] = (),
    suggest: str | None = None,
) -> Path:
    """Refuse an output that would destroy an input or cannot be written as the kind asked for; nothing is written.

    Args:
        output: the file or folder the command will write.
        inputs: what the command reads (see `input_paths`); a model folder's files are listed by
            `cvt.checkpoint.checkpoint_files`.
        folder: whether the output is a folder (else a file).
        datasets: inputs that are datasets (folders, .csv lists, shard patterns): an output inside one is refused
            too.
        suggest: a file name to offer when a folder stands where a file output should go ("model.onnx").

    Returns:
        `output` as a Path.

    Raises:
        OutputError: the output is, contains or lies inside (`datasets`) an input; a folder stands where a file is
            written, or a file where a folder is; one line naming the paths and what to do.
    """
    out = Path(output).expanduser()
    datasets = input_paths(datasets)
    for source in [*input_paths(inputs), *datasets]:
        if _same(out, source):
            same = "" if os.path.normpath(out) == os.path.normpath(source) else " (the same one under another name)"
            raise OutputError(f"the output {out} is the input {source}{same}: writing it would destroy the input; "
                              "choose another output")  # fmt: skip
        if _inside(source, out):
            raise OutputError(f"the output {out} contains the input {source}: choose an output outside it")
        if source in datasets and source.is_dir() and _inside(out, source):
            raise OutputError(f"the output {out} lies inside the dataset {source}, where it would become part of the "
                              "data: choose an output outside it")  # fmt: skip
    if not folder and out.is_dir():
        example = f" (e.g. {out / suggest})" if suggest else ""
        raise OutputError(f"{out} is a folder, and the output here is a file: give a file path{example}")
    if folder and out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, and the output here is a folder: give a new, empty or cvt-written folder")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"{parent} is a file, so {out} cannot be created inside it: choose another output")
    return out


def is_ours(folder: PathLike) -> bool:
    """Whether `folder` holds this project's marker (see the module notes)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT


def foreign_entries(folder: PathLike, legacy: Sequence[str] = ()) -> list[str]:
    """The names in `folder` that make it not this project's: none when it is missing, empty or marked as ours.

    Args:
        folder: a folder output.
        legacy: names whose presence marks a folder this writer made before it wrote markers (a run's `last.pt`).
    """
    path = Path(folder)
    if not path.is_dir() or is_ours(path):
        return []
    names = sorted(entry.name for entry in path.iterdir())
    return [] if any(name in legacy for name in names) else names


def check_output_folder(folder: PathLike, *, overwrite: bool = False, legacy: Sequence[str] = ()) -> None:
    """Refuse a folder output that holds files this project did not write, unless `overwrite`.

    Raises:
        OutputError: naming the folder and some of its files, and the two ways out.
    """
    foreign = [] if overwrite else foreign_entries(folder, legacy)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{folder} holds files cvt did not write ({shown}): choose a new or empty folder, or pass --overwrite "
            "(overwrite=True) to write into it, replacing files of the same names"
        )


def claim_folder(folder: PathLike, writer: str, *, overwrite: bool = False, legacy: Sequence[str] = ()) -> Path:
    """Check `folder` (`check_output_folder`), create it and mark it as this project's before anything is written.

    Args:
        folder: the folder output.
        writer: what writes it, recorded in the marker ("save_model (hf)", "cvt train").
        overwrite: write into a folder that holds files this project did not write.
        legacy: see `foreign_entries`.

    Returns:
        `folder` as a Path.
    """
    path = check_output(folder, folder=True)
    check_output_folder(path, overwrite=overwrite, legacy=legacy)
    path.mkdir(parents=True, exist_ok=True)
    return mark_folder(path, writer)


def mark_folder(folder: PathLike, writer: str) -> Path:
    """Put the marker into `folder` (existing) unless it is there: for a writer that checked the folder itself."""
    path = Path(folder)
    if not is_ours(path):
        write_json({"format": MARKER_FORMAT, "version": 1, "writer": writer}, path / MARKER)
    return path


__all__ = [
    "MARKER",
    "OutputError",
    "check_output",
    "check_output_folder",
    "claim_folder",
    "foreign_entries",
    "input_paths",
    "is_ours",
    "mark_folder",
]
