"""The "cvt.train" training-checkpoint format: the one writer and the one reader of `last.pt` and `best.pt`.

A training checkpoint is a `torch.save`d dict that `torch.load(weights_only=True)` reads:

    {"format": "cvt.train", "version": 1, "model": state dict,
     "model_name", "model_config", "data_config", "class_names" (`cvt.model.model_metadata`),
     "ema": state dict or None, then the run's state (`STATE_KEYS`): optimiser, schedule, GradScaler, the RNG states
     of every rank, the world size, the position (epoch, step, global step), the epoch's running sums, the history
     of epochs, the best epoch, the wall time and the `TrainConfig` as a dict}

`best.pt` has the same keys, with None for the state a resume needs (optimiser, schedule, scaler, RNG, meter).

Writing is atomic and verified: the new file is written under a temporary name, its zip records are read back and
checked (CRC) and only then renamed over the old one; with `previous`, the old file is kept under that name first,
so a resume can fall back to it when the newest is damaged. A failed write (a full disk, no permission) raises
`CheckpointWriteError` naming the file and the cause, and leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write, write_error
from .formats import CheckpointError, parse_metadata
from .safe_load import read_weights_file

TRAIN_FORMAT = "cvt.train"
TRAIN_FORMAT_VERSION = 1
STATE_KEYS = (
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "world_size",
    "epoch",
    "step",
    "global_step",
    "meter",
    "history",
    "best",
    "elapsed",
    "train_config",
)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file, the cause and what to do."""


def is_training_checkpoint(obj: Any) -> bool:
    """Whether `obj` (what a file held) is a training checkpoint."""
    return isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT


def write_training_checkpoint(
    path: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    *,
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    previous: str | os.PathLike | None = None,
) -> None:
    """Write a training checkpoint atomically and verified (a kill or a failed write leaves the old file whole).

    Args:
        path: the file.
        weights: the model's state dict (on the CPU).
        metadata: `cvt.model.model_metadata` of the model.
        ema: the EMA model's state dict, or None.
        state: one entry per `STATE_KEYS` (None for what a weights-only file leaves out).
        previous: where to keep the file `path` held until now, once the new one is complete (e.g. last.prev.pt).

    Raises:
        CheckpointWriteError: the file could not be written (full disk, permissions, ...): named with the cause.
    """
    if set(state) != set(STATE_KEYS):
        raise ValueError(f"training state keys {sorted(state)} differ from the format's {sorted(STATE_KEYS)}")
    checkpoint = {"format": TRAIN_FORMAT, "version": TRAIN_FORMAT_VERSION, "model": weights, **metadata, "ema": ema}
    checkpoint.update({key: state[key] for key in STATE_KEYS})
    path = Path(path)
    try:
        with atomic_write(path, "w+b") as f:
            torch.save(checkpoint, f)
            f.flush()
            f.seek(0)
            _verify(f, path)
            if previous is not None and path.is_file():
                _keep(path, Path(previous))
    except (OSError, RuntimeError) as err:
        raise _write_error(path, err) from None


def _verify(f: Any, path: Path) -> None:
    """Read back every zip record of a freshly written checkpoint and check its CRC."""
    try:
        with zipfile.ZipFile(f) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise CheckpointWriteError(f"the checkpoint written for {path} does not read back ({err})") from None
    if bad is not None:
        raise CheckpointWriteError(f"the checkpoint written for {path} does not read back (record {bad} is damaged)")


def _keep(path: Path, previous: Path) -> None:
    """Keep the current `path` as `previous` (a hard link, so `path` itself never goes missing)."""
    tmp = previous.with_name(f".{previous.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here: a copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def _write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    """The error of a failed write, with the system's cause (torch hides it behind 'unexpected pos ...')."""
    if isinstance(err, CheckpointWriteError):
        return err
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno):
        cause = cause.__cause__ or cause.__context__
    kept = f"{path} keeps its previous content" if path.exists() else f"{path} was not written"
    if cause is None:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        if free is not None and free < 64 * 2**20:
            reason += f"; only {free} bytes are free on its disk"
        return CheckpointWriteError(f"cannot write {path}: {reason}; {kept}")
    said = write_error(path, cause)  # the wording every writer shares; atomic_write may have said it already
    return CheckpointWriteError(cause.errno, f"{said.strerror}; {kept}")


def read_training_checkpoint(path: str | os.PathLike, *, resumable: bool = False) -> dict[str, Any]:
    """The dict of a training checkpoint, with its format and version checked.

    Args:
        path: the file.
        resumable: also require the state a resume needs (a `last.pt`, not a weights-only `best.pt`).

    Raises:
        CheckpointError: not a (full, with `resumable`) training checkpoint of a supported version.
    """
    path = Path(path)
    obj = read_weights_file(path)
    if not is_training_checkpoint(obj) or (resumable and obj.get("optimizer") is None):
        needed = "full training checkpoint, the state a resume needs" if resumable else "training checkpoint"
        raise CheckpointError(f"{path} is not a {needed} (format {TRAIN_FORMAT!r}): {_what_instead(obj, path)}")
    parse_metadata(obj, path, TRAIN_FORMAT_VERSION)
    return obj


def _what_instead(obj: Any, path: Path) -> str:
    """What a file that is no (full) training checkpoint holds, and what to do with it."""
    if is_training_checkpoint(obj):
        return (
            "it holds a run's weights without the optimiser, schedule and RNG state (a best.pt); resume from the "
            f"run's last.pt ({path.parent / 'last.pt'}), or fine-tune from it with --set init={path}"
        )
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"it holds a state dict of {len(obj)} tensors (model weights); fine-tune from it with --set init={path}"
    kind = f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    return f"it holds {kind}; resume from the last.pt of a cvt training run"


def training_weights(obj: dict[str, Any], path: Path, *, ema: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, metadata parsed by `formats.parse_metadata`) of a training checkpoint dict read from `path`.

    Args:
        obj: the checkpoint dict.
        path: its file, for messages.
        ema: the EMA weights instead of the model's.
    """
    info = parse_metadata(obj, path, TRAIN_FORMAT_VERSION)
    key = "ema" if ema else "model"
    if obj.get(key) is None:
        raise CheckpointError(f"{path} is a training checkpoint without {key!r} weights")
    return obj[key], {**info, "results": training_results(obj)}


def training_results(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The best epoch's validation results of a training checkpoint dict, or None when it has none."""
    best = obj.get("best") or {}
    if best.get("top1") is None:
        return None
    cfg = obj.get("train_config") or {}
    data = str(cfg.get("data") or "").rstrip("/")
    return {
        "dataset": Path(data).name if data else None,
        "split": cfg.get("val_split"),
        "top1": best["top1"],
        "top5": best.get("top5"),
        "epoch": best.get("epoch"),
    }
