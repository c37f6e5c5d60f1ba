"""The "cvt.train" training-checkpoint format: the one writer and the one reader of `last.pt` and `best.pt`.

A training checkpoint is a `torch.save`d dict that `torch.load(weights_only=True)` reads:

    {"format": "cvt.train", "version": 1, "model": state dict,
     "model_name", "model_config", "data_config", "class_names" (`cvt.model.model_metadata`),
     "ema": state dict or None, then the run's state (`STATE_KEYS`): optimiser, schedule, GradScaler, the RNG states
     of every rank, the world size, the position (epoch, step, global step), the epoch's running sums, the history
     of epochs, the best epoch, the wall time and the `TrainConfig` as a dict}

`best.pt` has the same keys, with None for the state a resume needs (optimiser, schedule, scaler, RNG, meter).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_save
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
) -> None:
    """Write a training checkpoint atomically (a kill leaves the previous file whole).

    Args:
        path: the file.
        weights: the model's state dict (on the CPU).
        metadata: `cvt.model.model_metadata` of the model.
        ema: the EMA model's state dict, or None.
        state: one entry per `STATE_KEYS` (None for what a weights-only file leaves out).
    """
    if set(state) != set(STATE_KEYS):
        raise ValueError(f"training state keys {sorted(state)} differ from the format's {sorted(STATE_KEYS)}")
    checkpoint = {"format": TRAIN_FORMAT, "version": TRAIN_FORMAT_VERSION, "model": weights, **metadata, "ema": ema}
    atomic_save({**checkpoint, **{key: state[key] for key in STATE_KEYS}}, path)


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
        what = "full training checkpoint" if resumable else "training checkpoint"
        raise CheckpointError(f"{path} is not a {what} (format {TRAIN_FORMAT!r})")
    parse_metadata(obj, path, TRAIN_FORMAT_VERSION)
    return obj


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
