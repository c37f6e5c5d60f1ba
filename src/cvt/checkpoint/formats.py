"""What every checkpoint format shares: its names and versions, the error type, and the recorded metadata.

The files of a saved model folder (ours and Hugging Face's), the format markers with their versions, and the
reading of the metadata that our two formats record ({"model_name", "model_config", "data_config",
"class_names"}, written from `cvt.model.model_metadata`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, CvTConfig, DataConfig

MODEL_FORMAT = "cvt"  # a folder written by `save_model`: config.json {"format": "cvt", ...} + model.safetensors
MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face folder's weights, preferred first
SAVE_FORMATS = ("cvt", "hf", "official")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file and the fix."""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; CheckpointError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def check_version(meta: dict[str, Any], where: Path, supported: int) -> None:
    """CheckpointError unless `meta["version"]` is the `supported` version of its format."""
    version = meta.get("version")
    if version != supported:
        raise CheckpointError(
            f"{where}: {meta.get('format')!r} version {version!r} is not supported (this cvt reads version "
            f"{supported}); upgrade cvt or re-save the model"
        )


def parse_metadata(meta: dict[str, Any], where: Path, version: int) -> dict[str, Any]:
    """config, data config, class names and name from a "cvt" config.json or a "cvt.train" checkpoint.

    Args:
        meta: the file's dict.
        where: the file, for messages.
        version: the version of its format this cvt reads.

    Returns:
        {"config": CvTConfig, "data_config": DataConfig or None, "class_names": list or None, "model_name": ...}.
    """
    check_version(meta, where, version)
    try:
        config = CvTConfig.from_dict(meta["model_config"])
        data = meta.get("data_config")
        data_config = DataConfig.from_dict(data) if data else None
    except ConfigError as err:
        key = "model_config" if err.owner == "CvTConfig" else "data_config"
        raise CheckpointError(f"{where}: {key}.{err.field}{err.detail}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: bad model_config/data_config: {err}") from None
    names = meta.get("class_names")
    return {
        "config": config,
        "data_config": data_config,
        "class_names": list(names) if names else None,
        "model_name": meta.get("model_name"),
    }
