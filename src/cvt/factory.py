"""Creating and loading models: the one place that turns a name, a config or a checkpoint into a `CvT`.

`create_model("cvt_13", num_classes=100)` builds a registered variant (`cvt.variants`), with released weights from
the Hugging Face hub (`cvt.hub`) or any checkpoint (`cvt.checkpoint`) when `pretrained` is given;
`load_model(path)` builds whatever architecture a checkpoint records or its weights imply; `resolve_model(spec)`
does either for a command line's PATH_OR_NAME. Every model comes back with its identity decided once, by
`cvt.variants.identify` (`CvT.identity`: name, released weights it still is, data config, class names).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError, load_state_dict_strict, read_checkpoint
from .checkpoint.infer import check_config_fits
from .checkpoint.infer import infer_config as _infer_from_weights
from .config import TRAINING_FIELDS, CvTConfig, DataConfig, PretrainedCfg, reject_unknown_fields
from .features import CvTFeatures
from .hub import download_weights
from .identity import ModelIdentity
from .model import CvT
from .variants import VARIANTS, find_official_file, identify, match_variant, model_config, resolve

logger = logging.getLogger(__name__)


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] = (0, 1, 2),
    global_pool: str | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    **overrides: Any,
) -> CvT | CvTFeatures:
    """Build a registered CvT variant.

    Args:
        name: a variant from `list_models()`, optionally with a weights tag: "cvt_13", "cvt_21.in22k_ft_384".
        num_classes: classifier outputs; defaults to the variant's 1000.
        pretrained: None/False for random init; True for the tag's released weights (Hugging Face hub or cache);
            or a path to a checkpoint in any supported format.
        features_only: return a backbone (`cvt.features.CvTFeatures`) giving the stage maps selected by
            `out_indices` instead of logits; the full model is built (and its weights loaded) first, then cut.
        out_indices: with `features_only`, the stages whose maps to return.
        global_pool: what the head reads, "token" (the class token) or "avg" (the mean of the spatial tokens);
            None for the variant's (the class token). timm's argument; `CvTConfig.global_pool`.
        checkpoint_path: a checkpoint (any supported format) to load into the created model, as timm's
            argument: the same as `pretrained=checkpoint_path`, and it wins over `pretrained`.
        pretrained_cfg_overlay: timm's argument: changes to the released weights' entry, e.g. {"file": PATH} (the
            same weights from a local file, with `pretrained=True`), {"hf_hub_id": REPO}, or the evaluation
            preprocessing ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"; a file that records
            its own keeps it).
        **overrides: `CvTConfig` fields to change, e.g. `act="gelu"`, `qkv_method="linear"`, `drop_path_rate=0.2`.

    Returns:
        The model, with its `identity` (`cvt.variants.identify`): `model_name`, `data_config` (evaluation
        preprocessing), `class_names` (ImageNet-1k's on a 1000-class head) and `pretrained_cfg` read it; loaded
        weights come in eval mode.
    """
    if checkpoint_path is not None:
        pretrained = checkpoint_path
    if global_pool is not None:
        overrides["global_pool"] = global_pool
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    arch, _, tag, weights = resolve(name)
    weights, local = _overlay(weights, pretrained_cfg_overlay or {})
    cfg = model_config(name, **overrides)
    if pretrained:
        if pretrained is True:
            local = local or download_weights(weights.hf_hub_id, official_file=weights.official_file)
            ckpt = read_checkpoint(local)
        else:
            ckpt = read_checkpoint(pretrained)
        # the released weights are what the name says; a file of ours says what it is
        named = f"{arch}.{tag}" if pretrained is True or ckpt.model_name is None else ckpt.model_name
        model = model_from_checkpoint(ckpt, cfg, num_classes=num_classes, name=named, data=weights.data)
    else:
        model = CvT(cfg)
        # the variant's own 1000-class head is ImageNet's, even before its weights are loaded; a narrowed model's is not
        model.identity = identify(cfg, f"{arch}.{tag}", data=weights.data, imagenet_head=match_variant(cfg) == arch)
    return CvTFeatures(model, out_indices) if features_only else model


OVERLAY_KEYS = ("file", "hf_hub_id", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def _overlay(weights: PretrainedCfg, overlay: dict[str, Any]) -> tuple[PretrainedCfg, Path | None]:
    """(the released weights' entry with timm's `pretrained_cfg_overlay` applied, the local file it names)."""
    unknown = sorted(set(overlay) - set(OVERLAY_KEYS))
    if unknown:
        raise ValueError(f"unknown pretrained_cfg_overlay key(s) {unknown}; valid keys: {list(OVERLAY_KEYS)}")
    data = {k: v for k, v in overlay.items() if k in OVERLAY_KEYS[2:]}
    if "input_size" in data:
        data["input_size"] = tuple(data["input_size"])[-2:]  # timm's (C, H, W)
    hub = {"hf_hub_id": overlay["hf_hub_id"]} if "hf_hub_id" in overlay else {}
    weights = dataclasses.replace(weights, data=dataclasses.replace(weights.data, **data), **hub)
    return weights, Path(overlay["file"]) if overlay.get("file") else None


def infer_config(
    state_dict: dict[str, torch.Tensor], known: dict[str, Any] | None = None, *, source: str | os.PathLike = "weights"
) -> tuple[CvTConfig, str | None, bool]:
    """The architecture of weights that record none (`cvt.checkpoint.infer.infer_config`), a registered variant's
    whole config where they fit one: (config, variant name or None, whether the heads were guessed)."""
    variants = {name: cfg for name, (cfg, _) in VARIANTS.items()}
    return _infer_from_weights(state_dict, known, variants, source=source)


def _check_same_architecture(file_cfg: CvTConfig, cfg: CvTConfig, ckpt: Checkpoint) -> None:
    ignore = set(TRAINING_FIELDS) | ({"act"} if ckpt.format == "hf" else set())
    diff = [
        f"{f.name}={getattr(file_cfg, f.name)!r} (asked {getattr(cfg, f.name)!r})"
        for f in dataclasses.fields(CvTConfig)
        if f.name not in ignore and getattr(file_cfg, f.name) != getattr(cfg, f.name)
    ]
    if diff:
        raise CheckpointError(
            f"{ckpt.source} ({ckpt.format} format) records another architecture than the one asked for: "
            f"{'; '.join(diff)}. Load it with cvt.load_model(path) (which reads the architecture from the file)."
        )


def _file_architecture(ckpt: Checkpoint, cfg: CvTConfig | None, overrides: dict[str, Any]) -> CvTConfig:
    """The architecture to build for `ckpt`: `cfg` (checked against what the file records), the file's, or the one
    its weights imply; with `overrides` applied and the head the file holds."""
    if cfg is not None:
        if ckpt.config is not None:
            _check_same_architecture(ckpt.config, cfg, ckpt)
    elif ckpt.config is not None:
        cfg = ckpt.config
    else:
        cfg, _, guessed = infer_config(ckpt.state_dict, overrides, source=ckpt.source)
        if guessed:
            logger.warning(
                "%s does not record the attention heads; assuming 64 channels per head: heads=%s. Pass heads=... "
                "if the model was trained with others.",
                ckpt.source,
                cfg.heads,
            )
    head = ckpt.state_dict.get("head.weight")
    return dataclasses.replace(cfg, **overrides, num_classes=head.shape[0] if head is not None else 0)


def _class_names(ckpt: Checkpoint, num_classes: int) -> list[str] | None:
    """The class names `ckpt` records, if they fit its head."""
    names = ckpt.class_names
    if names is not None and len(names) != num_classes:
        logger.warning("%s lists %d class names for %d classes; ignoring them", ckpt.source, len(names), num_classes)
        return None
    return names


def model_from_checkpoint(
    ckpt: Checkpoint,
    cfg: CvTConfig | None = None,
    *,
    num_classes: int | None = None,
    name: str | None = None,
    data: DataConfig | None = None,
    **overrides: Any,
) -> CvT:
    """A `CvT` holding the weights of `ckpt` (from `read_checkpoint`), with its identity (`cvt.variants.identify`).

    Args:
        ckpt: from `read_checkpoint`.
        cfg: the architecture; None to take it from the file, or infer it from the weights.
        num_classes: classifier outputs; None keeps the file's head. Another size re-initialises the head.
        name: the registered `name.tag` the weights were asked for as; None for what the file records (the
            authors' file: what its file name says).
        data: the evaluation preprocessing of the weights asked for, used when the file records none.
        **overrides: `CvTConfig` fields changed on the file's architecture, e.g. `act="gelu"`.

    Returns:
        The model in eval mode, with its `identity` (`model_name`, `data_config`, `class_names`, `pretrained_cfg`).
    """
    reject_unknown_fields(CvTConfig, overrides, "CvTConfig")
    file_cfg = _file_architecture(ckpt, cfg, overrides)
    cfg = file_cfg if num_classes is None else dataclasses.replace(file_cfg, num_classes=num_classes)
    state, allow_missing = dict(ckpt.state_dict), set()
    class_names = _class_names(ckpt, file_cfg.num_classes)
    if cfg.num_classes != file_cfg.num_classes:
        logger.info(
            "re-initialising the classifier head: %s has %d classes, the model %d",
            ckpt.source,
            file_cfg.num_classes,
            cfg.num_classes,
        )
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        allow_missing |= {"head.weight", "head.bias"}
        class_names = None
    if ckpt.format == "hf" and "norm.weight" not in state:
        logger.info("%s is a transformers CvtModel, without the final LayerNorm: it keeps its init", ckpt.source)
        allow_missing |= {"norm.weight", "norm.bias"}

    source = f"{ckpt.source} ({ckpt.format} format)"
    check_config_fits(cfg, state, source=source, allow_missing=allow_missing)  # before CvT(cfg) allocates
    model = CvT(cfg)
    load_state_dict_strict(model, state, source=source, allow_missing=allow_missing)
    model.eval()
    model.identity = _file_identity(ckpt, cfg, file_cfg, class_names, name, data)
    return model


def _file_identity(
    ckpt: Checkpoint,
    cfg: CvTConfig,
    file_cfg: CvTConfig,
    class_names: list[str] | None,
    name: str | None,
    data: DataConfig | None,
) -> ModelIdentity:
    """The identity of a model of architecture `cfg` holding the weights of `ckpt` (file architecture `file_cfg`)."""
    if ckpt.format == "official":  # the authors' file name tells 224 from 384 weights
        found = find_official_file(ckpt.source.name)
        name = found[0] if found and match_variant(cfg) == found[0].partition(".")[0] else name
    kept_head = cfg.num_classes == file_cfg.num_classes
    return identify(
        cfg,
        name or ckpt.model_name,
        data=ckpt.data_config or data,
        class_names=class_names,
        imagenet_head=kept_head and ckpt.format in ("official", "hf"),
    )


def checkpoint_identity(ckpt: Checkpoint) -> ModelIdentity:
    """The identity `model_from_checkpoint(ckpt)` gives its model (name, released weights it still is, data config,
    class names), decided without building the model."""
    cfg = _file_architecture(ckpt, None, {})
    return _file_identity(ckpt, cfg, cfg, _class_names(ckpt, cfg.num_classes), None, None)


def load_model(path: str | os.PathLike, *, num_classes: int | None = None, ema: bool = False, **overrides: Any) -> CvT:
    """Load a model from any supported checkpoint, with the architecture the file records or its weights imply.

    Args:
        path: the authors' `.pth`, a Hugging Face CvT folder or weights file, a folder written by `save_model`, or
            a training checkpoint.
        num_classes: classifier outputs; None keeps the file's. Another size re-initialises the head (fine-tuning).
        ema: from a training checkpoint, load the EMA weights.
        **overrides: `CvTConfig` fields to change, e.g. `act="gelu"` for what transformers computes,
            `drop_path_rate=0.2` for fine-tuning, `heads=(...)` for a file that does not record them.

    Returns:
        The model in eval mode, with `data_config`, `class_names` (ImageNet-1k names for the released 1000-class
        weights) and `model_name` attributes.
    """
    return model_from_checkpoint(read_checkpoint(path, ema=ema), num_classes=num_classes, **overrides)


def resolve_model(spec: str | os.PathLike, **kwargs: Any) -> CvT:
    """A model from a command-line PATH_OR_NAME: an existing path is loaded, a registered name[.tag] gets its
    released weights.

    Args:
        spec: a checkpoint path, or a registered name such as "cvt_13" or "cvt_21.in22k_ft_384".
        **kwargs: passed to `load_model` or `create_model` (num_classes, CvTConfig overrides).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return load_model(path, **kwargs)
    try:
        resolve(str(spec))
    except ValueError as err:
        raise FileNotFoundError(
            f"{spec!r} is neither an existing file or folder nor a registered model ({err})"
        ) from None
    return create_model(str(spec), pretrained=True, **kwargs)


__all__ = [
    "checkpoint_identity",
    "create_model",
    "infer_config",
    "load_model",
    "model_from_checkpoint",
    "resolve_model",
]
