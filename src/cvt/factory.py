"""Creating and loading models: the one place that turns a name, a config or a checkpoint into a `CvT`.

`create_model("cvt_13", num_classes=100)` builds a registered variant (`cvt.variants`), with released weights from
the Hugging Face hub (`cvt.hub`) or any checkpoint (`cvt.checkpoint`) when `pretrained` is given;
`load_model(path)` builds whatever architecture a checkpoint records or its weights imply; `resolve_model(spec)`
does either for a command line's PATH_OR_NAME. Every model comes back with its metadata set (`CvT.model_name`,
`data_config`, `class_names`, `pretrained_cfg`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, CheckpointError, infer_config, load_state_dict_strict, read_checkpoint
from .checkpoint.infer import check_config_fits
from .config import TRAINING_FIELDS, CvTConfig, DataConfig, PretrainedCfg, check_fields
from .features import CvTFeatures
from .hub import download_weights
from .model import CvT
from .variants import find_official_file, imagenet_classes, match_variant, model_config, resolve, variant_model_name

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
        **overrides: `CvTConfig` fields to change, e.g. `act="gelu"`, `qkv_method="linear"`, `drop_path_rate=0.2`.

    Returns:
        The model, with `data_config` (evaluation preprocessing), `class_names` (None for random init),
        `model_name` and `pretrained_cfg` attributes; loaded weights come in eval mode.
    """
    if checkpoint_path is not None:
        pretrained = checkpoint_path
    if global_pool is not None:
        overrides["global_pool"] = global_pool
    if features_only:
        return CvTFeatures(create_model(name, num_classes=num_classes, pretrained=pretrained, **overrides), out_indices)
    arch, _, tag, pretrained_cfg = resolve(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = model_config(name, **overrides)
    if pretrained:
        return load_pretrained(cfg, pretrained_cfg, pretrained, num_classes=num_classes, model_name=f"{arch}.{tag}")
    model = CvT(cfg)
    model.model_name = variant_model_name(f"{arch}.{tag}", cfg)
    model.data_config = pretrained_cfg.data
    model.pretrained_entry = pretrained_cfg
    return model


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


def build_model(
    ckpt: Checkpoint,
    cfg: CvTConfig | None = None,
    *,
    num_classes: int | None = None,
    pretrained_cfg: PretrainedCfg | None = None,
    model_name: str | None = None,
    **overrides: Any,
) -> CvT:
    """A `CvT` holding the weights of `ckpt`.

    Args:
        ckpt: from `read_checkpoint`.
        cfg: the architecture; None to take it from the file, or infer it from the weights.
        num_classes: classifier outputs; None keeps the file's head. Another size re-initialises the head.
        pretrained_cfg: released-weights entry (its evaluation preprocessing is used when the file has none).
        model_name: name to record on the model.
        **overrides: `CvTConfig` fields changed on the file's architecture, e.g. `act="gelu"`.

    Returns:
        The model in eval mode, with `data_config`, `class_names`, `model_name` and `pretrained_cfg` attributes.
    """
    check_fields(CvTConfig, overrides, "CvTConfig")
    inferred_name = None
    if cfg is not None:
        if ckpt.config is not None:
            _check_same_architecture(ckpt.config, cfg, ckpt)
    elif ckpt.config is not None:
        cfg = ckpt.config
    else:
        cfg, inferred_name, guessed = infer_config(ckpt.state_dict, overrides, source=ckpt.source)
        if guessed:
            logger.warning(
                "%s does not record the attention heads; assuming 64 channels per head: heads=%s. Pass heads=... "
                "if the model was trained with others.",
                ckpt.source,
                cfg.heads,
            )
    cfg = dataclasses.replace(cfg, **overrides)
    head = ckpt.state_dict.get("head.weight")
    file_classes = head.shape[0] if head is not None else 0
    cfg = dataclasses.replace(cfg, num_classes=file_classes if num_classes is None else num_classes)

    state = dict(ckpt.state_dict)
    allow_missing: set[str] = set()
    class_names = ckpt.class_names
    if cfg.num_classes != file_classes:
        logger.info(
            "re-initialising the classifier head: %s has %d classes, the model %d",
            ckpt.source,
            file_classes,
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

    variant = match_variant(cfg)
    found = find_official_file(ckpt.source.name) if ckpt.format == "official" else None
    if found and found[0].partition(".")[0] == variant:  # the authors' file name tells 224 from 384 weights
        model_name, pretrained_cfg = found
    if pretrained_cfg is None and variant is not None:
        _, _, tag, pretrained_cfg = resolve(variant)
        inferred_name = f"{variant}.{tag}"
    if class_names is None and ckpt.format in ("official", "hf") and cfg.num_classes == 1000 == file_classes:
        class_names = imagenet_classes()
    if class_names is not None and len(class_names) != cfg.num_classes:
        logger.warning(
            "%s lists %d class names for %d classes; ignoring them", ckpt.source, len(class_names), cfg.num_classes
        )
        class_names = None
    model.pretrained_entry = pretrained_cfg
    model.data_config = ckpt.data_config or (pretrained_cfg.data if pretrained_cfg else DataConfig())
    model.class_names = class_names
    model.model_name = variant_model_name(model_name or ckpt.model_name or inferred_name or "cvt_custom", cfg)
    return model


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
    return build_model(read_checkpoint(path, ema=ema), num_classes=num_classes, **overrides)


def load_pretrained(
    cfg: CvTConfig,
    pretrained_cfg: PretrainedCfg,
    pretrained: bool | str | os.PathLike,
    num_classes: int | None = None,
    model_name: str | None = None,
) -> CvT:
    """`create_model(name, pretrained=...)`: the named architecture with released or given weights.

    Args:
        cfg: the architecture (the variant's, with the caller's overrides).
        pretrained_cfg: the variant's released weights.
        pretrained: True for the released weights (Hugging Face hub or its cache), or a checkpoint path.
        num_classes: classifier outputs; None keeps the file's head.
        model_name: name.tag to record on the model.
    """
    if pretrained is True:
        path = download_weights(pretrained_cfg.hf_hub_id, official_file=pretrained_cfg.official_file)
    else:
        path = Path(pretrained)
    ckpt = read_checkpoint(path)
    name = model_name if pretrained is True or ckpt.model_name is None else ckpt.model_name
    return build_model(ckpt, cfg, num_classes=num_classes, pretrained_cfg=pretrained_cfg, model_name=name)


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


__all__ = ["build_model", "create_model", "load_model", "load_pretrained", "resolve_model"]
