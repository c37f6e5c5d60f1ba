"""Reading any supported checkpoint file or folder into a `Checkpoint`: weights in our layout plus what the file
records (architecture, evaluation preprocessing, class names, name). The format is detected from the content."""

from __future__ import annotations

import dataclasses
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import CvTConfig, DataConfig
from .formats import (
    CONFIG_FILE,
    HF_WEIGHT_FILES,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    CheckpointError,
    parse_metadata,
    read_json,
)
from .hf_config import NAME_KEY, PREPROCESSOR_FILE, config_from_hf, data_config_from_hf, hf_class_names
from .layouts import (
    TO_CVT,
    detect_layout,
    is_state_dict,
    repair_compile_prefix,
    repair_ddp_prefix,
    repair_hf_base_model,
    repair_wrapper,
)
from .safe_load import read_weights_file
from .training import TRAIN_FORMAT, is_training_checkpoint, training_weights


@dataclass
class Checkpoint:
    """What a checkpoint file holds, in our key layout.

    Attributes:
        state_dict: the weights, keys as in `CvT.state_dict()`.
        format: "official", "hf", "cvt" (a saved model folder or a bare state dict of ours) or "cvt.train".
        source: the file or folder read.
        config: the architecture if the file records it (ours, Hugging Face), else None.
        data_config: evaluation preprocessing if the file records it.
        class_names: class names if the file records them.
        model_name: the model name the file records.
        results: for a training checkpoint with validation, its best epoch's {"dataset" (the data folder's
            name), "split", "top1", "top5", "epoch"} (percent), what a model card reports.
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    source: Path
    config: CvTConfig | None = None
    data_config: DataConfig | None = None
    class_names: list[str] | None = None
    model_name: str | None = None
    results: dict[str, Any] | None = None


def _read_weights_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder: `model.safetensors`, `pytorch_model.bin`, or shards listed in an index file."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return repair_wrapper(read_weights_file(folder / name))
        index = folder / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in _shards(index):
                state.update(read_weights_file(shard))
            return state
    raise CheckpointError(f"{folder} has a config.json but no weights ({' or '.join(HF_WEIGHT_FILES)})")


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded index's "weight_map" lists, each a file of the index's own folder: an index is
    data, and must not make the reader open any other file of the machine (an absolute path, `..`, a link out)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index} has no "weight_map" object naming the shard files')
    folder = index.parent.resolve()
    names = set()
    for name in weight_map.values():
        if not isinstance(name, str):
            raise CheckpointError(f'{index}: "weight_map" names a shard with {reprlib.repr(name)}, not a file name')
        names.add(name)
    shards = []
    for name in sorted(names):
        path = index.parent / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(folder):
            raise CheckpointError(
                f"{index} lists the shard {reprlib.repr(name)}, which is outside the index's folder: refused, "
                "nothing of it was read (the shards of a model are the files next to its index)"
            )
        if not path.is_file():
            raise CheckpointError(f"{index} lists the shard {reprlib.repr(name)}, which is missing from {folder}")
        shards.append(path)
    return shards


def _from_state_dict(state: Any, source: Path, recorded: tuple[str, dict[str, Any]] | None) -> Checkpoint:
    """Repair, detect and convert a state dict; `recorded` is what a config.json found with it says (`_recorded`),
    taken when the weights are in that config's layout."""
    state = repair_compile_prefix(repair_ddp_prefix(repair_wrapper(state)))
    if not is_state_dict(state):
        raise CheckpointError(
            f"{source} is not a checkpoint: it holds no state dict (a dict of tensors) that this loader recognises "
            f"(keys {sorted(map(str, state))[:5]})"
        )
    state = repair_hf_base_model(state)
    try:
        layout = detect_layout(state)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    ckpt = Checkpoint(TO_CVT[layout](state), layout, source)
    if recorded is not None and recorded[0] == layout:
        return dataclasses.replace(ckpt, **recorded[1])
    return ckpt


def _recorded(meta: dict[str, Any], config_file: Path) -> tuple[str, dict[str, Any]] | None:
    """(layout, `Checkpoint` fields) from a config.json: ours ("cvt") or a Hugging Face CvT one ("hf"), every value
    checked before any weights are read or any tensor is made; None for another kind of config.json.

    Raises:
        CheckpointError: a field of the wrong type or range, naming the file and the field.
    """
    if meta.get("format") == MODEL_FORMAT:
        return MODEL_FORMAT, parse_metadata(meta, config_file, MODEL_FORMAT_VERSION)
    if meta.get("model_type") != "cvt":
        return None
    try:
        fields = {
            "config": config_from_hf(meta),
            "data_config": data_config_from_hf(meta, _preprocessor(config_file.parent)),
            "class_names": hf_class_names(meta),
            "model_name": meta.get(NAME_KEY),
        }
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    return "hf", fields


def _preprocessor(folder: Path) -> dict[str, Any] | None:
    file = folder / PREPROCESSOR_FILE
    return read_json(file) if file.is_file() else None


def read_checkpoint(path: str | os.PathLike, *, ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint file or folder (the formats `cvt.checkpoint` lists) into our layout.

    Args:
        path: a file or folder.
        ema: from a training checkpoint, take the EMA weights instead of the model's.

    Raises:
        FileNotFoundError: nothing at `path`.
        CheckpointError: unreadable, unsafe or unrecognised content; the message names the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        if ema:
            raise CheckpointError(f"{path} is a model folder, not a training checkpoint: it has no EMA weights")
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f"{path} is a folder without {CONFIG_FILE}: not a saved cvt or Hugging Face model")
        meta = read_json(config_file)
        recorded = _recorded(meta, config_file)
        if recorded is None:
            raise CheckpointError(
                f'{config_file} is neither a cvt model config ("format": "cvt") nor a Hugging Face CvT config '
                f'("model_type": "cvt"; found {meta.get("model_type")!r})'
            )
        ckpt = _from_state_dict(_read_weights_folder(path), path, recorded)
    else:
        obj = read_weights_file(path)
        if is_training_checkpoint(obj):
            weights, info = training_weights(obj, path, ema=ema)
            return dataclasses.replace(_from_state_dict(weights, path, None), format=TRAIN_FORMAT, **info)
        if ema:
            raise CheckpointError(f"{path} is not a training checkpoint: it has no EMA weights")
        sidecar = path.parent / CONFIG_FILE
        ckpt = _from_state_dict(obj, path, _recorded(read_json(sidecar), sidecar) if sidecar.is_file() else None)
    return ckpt


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files that `read_checkpoint(path)` may read, for a writer to keep its output off them: the file or folder
    itself, a folder's config, image processor and weights (an index and its shards included), and the config
    files that a weights file is read with from beside it. Paths that do not exist are left out; of the files,
    only a sharded folder's index is read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return []
    folder = path if path.is_dir() else path.parent
    files = [path, folder / CONFIG_FILE, folder / PREPROCESSOR_FILE]
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            index = folder / f"{name}.index.json"
            files += [folder / name, index]
            if index.is_file():
                try:
                    shards = read_json(index).get("weight_map", {})
                    files += [folder / str(shard) for shard in set(shards.values())]
                except (CheckpointError, AttributeError, TypeError):
                    pass  # reading the checkpoint reports it
    return [file for file in files if file.exists()]
