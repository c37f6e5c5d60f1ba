"""Writing a model: our folder format, a Hugging Face `CvtForImageClassification` folder, or the authors' `.pth`."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from ..config import TRAINING_FIELDS, CvTConfig
from ..fileio import atomic_save, atomic_write, write_json
from ..model import model_metadata
from ..outputs import check_output, check_output_folder, claim_folder
from .card import CARD_FILE, model_card
from .formats import CONFIG_FILE, MODEL_FORMAT, MODEL_FORMAT_VERSION, SAVE_FORMATS, WEIGHTS_FILE, CheckpointError
from .hf_config import PREPROCESSOR_FILE, config_to_hf, preprocessor_to_hf
from .hf_processor import processor_deviation
from .infer import infer_config
from .layouts import cvt_to_hf, cvt_to_official

logger = logging.getLogger(__name__)


def _tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_write(path) as f:
        f.write(save(tensors, metadata={"format": "pt"}))  # "pt": what transformers expects


def _weights_tell(state: dict[str, torch.Tensor], cfg: CvTConfig) -> bool:
    """Whether the weights alone give back the architecture `cfg` (what a file that records none is read with)."""
    try:
        found, _, _ = infer_config(state)
    except CheckpointError:
        return False
    return dataclasses.replace(found, **{f: getattr(cfg, f) for f in (*TRAINING_FIELDS, "act")}) == cfg


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    class_names: list[str] | None = None,
    *,
    format: str = "cvt",
    results: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` atomically (each file appears whole or not at all), under the rule of `cvt.outputs`.

    Args:
        model: a `CvT`; its `model_name`, `data_config` and `class_names` are recorded (`cvt.model.model_metadata`).
        path: a folder for "cvt" and "hf", a file for "official".
        class_names: one name per class; default `model.class_names`.
        format: "cvt" (model.safetensors + config.json with the architecture, preprocessing and class names),
            "hf" (a transformers `CvtForImageClassification` folder with the image processor of `data_config`,
            which `transformers.pipeline("image-classification", model=path)` runs) or "official" (the authors'
            bare state dict, which records no architecture). Both folders get a model card (README.md with the
            Hugging Face hub's metadata header, `cvt.checkpoint.card`).
        results: what a run measured, for the card: {"dataset", "split", "top1", "top5", "epoch"} (percent), as
            `Checkpoint.results` of a training checkpoint holds them.
        overwrite: write a folder format into a folder that holds files cvt did not write (files of the same
            names are replaced, the others left); without it such a folder is refused.

    Returns:
        `path`.

    Raises:
        OutputError: a folder stands where the file goes or the reverse, or the folder holds files cvt did not
            write (without `overwrite`); nothing is written then.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {SAVE_FORMATS}")
    path = check_output(path, folder=format != "official", suggest="model.pth")
    if format != "official":
        check_output_folder(path, overwrite=overwrite)
    cfg = model.cfg
    meta = model_metadata(model)
    if class_names is not None:
        meta["class_names"] = [str(n) for n in class_names]
    names = meta["class_names"]
    if names is not None and len(names) != cfg.num_classes:
        raise ValueError(f"{len(names)} class names for a model with {cfg.num_classes} classes")
    state = _tensors(model.state_dict())
    if format == "official":
        if not _weights_tell(state, cfg):
            logger.warning("%s records no architecture; load it with the same config fields you built it with", path)
        atomic_save(cvt_to_official(state), path)
        return path
    hf_config = config_to_hf(cfg, names, model.data_config, meta["model_name"]) if format == "hf" else None
    claim_folder(path, f"save_model ({format})", overwrite=overwrite)
    if hf_config is not None:
        if cfg.act != "gelu":
            logger.warning("transformers' CvT computes GELU where this model computes QuickGELU: logits will differ")
        _write_safetensors(cvt_to_hf(state), path / WEIGHTS_FILE)
        write_json(preprocessor_to_hf(model.data_config), path / PREPROCESSOR_FILE)
        write_json(hf_config, path / CONFIG_FILE)
        if deviation := processor_deviation(path, model.data_config):
            logger.warning("%s: %s", path, deviation)
    else:
        _write_safetensors(state, path / WEIGHTS_FILE)
        write_json({"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, **meta}, path / CONFIG_FILE)
    card = model_card(meta, format=format, entry=getattr(model, "pretrained_entry", None), results=results)
    with atomic_write(path / CARD_FILE) as f:
        f.write(card.encode("utf-8"))
    return path
