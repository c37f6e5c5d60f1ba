"""The registered CvT variants and their released weights, reached through one factory."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .config import CvTConfig, DataConfig, PretrainedCfg, check_fields
from .model import CvT

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .features import CvTFeatures

_CVT_13 = CvTConfig()
_CVT_21 = dataclasses.replace(_CVT_13, depths=(1, 4, 16))
_CVT_W24 = dataclasses.replace(
    _CVT_13, dims=(192, 768, 1024), depths=(2, 2, 20), heads=(3, 12, 16), drop_path_rate=(0.0, 0.0, 0.3)
)

_D224 = DataConfig(input_size=(224, 224), crop_mode="center", crop_pct=0.875)
_D384 = DataConfig(input_size=(384, 384), crop_mode="squash", crop_pct=1.0)


def _weights(hub: str, official: str, data: DataConfig, top1: float) -> PretrainedCfg:
    return PretrainedCfg(hf_hub_id=f"microsoft/{hub}", official_file=official, data=data, top1=top1)


# name -> (architecture, {tag: released weights}); the first tag is the default one
VARIANTS: dict[str, tuple[CvTConfig, dict[str, PretrainedCfg]]] = {
    "cvt_13": (
        _CVT_13,
        {
            "in1k": _weights("cvt-13", "CvT-13-224x224-IN-1k.pth", _D224, 81.6),
            "in1k_384": _weights("cvt-13-384", "CvT-13-384x384-IN-1k.pth", _D384, 83.0),
            "in22k_ft_384": _weights("cvt-13-384-22k", "CvT-13-384x384-IN-22k.pth", _D384, 83.3),
        },
    ),
    "cvt_21": (
        _CVT_21,
        {
            "in1k": _weights("cvt-21", "CvT-21-224x224-IN-1k.pth", _D224, 82.5),
            "in1k_384": _weights("cvt-21-384", "CvT-21-384x384-IN-1k.pth", _D384, 83.3),
            "in22k_ft_384": _weights("cvt-21-384-22k", "CvT-21-384x384-IN-22k.pth", _D384, 84.9),
        },
    ),
    "cvt_w24": (
        _CVT_W24,
        {
            "in22k_ft_384": _weights("cvt-w24-384-22k", "CvT-w24-384x384-IN-22k.pth", _D384, 87.7),
        },
    ),
}


def list_models(pretrained: bool = False) -> list[str]:
    """Registered variant names; with `pretrained`, every `name.tag` that has released weights."""
    if not pretrained:
        return list(VARIANTS)
    return [f"{name}.{tag}" for name, (_, tags) in VARIANTS.items() for tag in tags]


def resolve(name: str) -> tuple[str, CvTConfig, str, PretrainedCfg]:
    """Split `name[.tag]` into (variant, its config, tag, its pretrained config); unknown names list the valid ones."""
    arch, _, tag = name.partition(".")
    if arch not in VARIANTS:
        raise ValueError(f"unknown model {arch!r}; known models: {', '.join(VARIANTS)}")
    cfg, tags = VARIANTS[arch]
    tag = tag or next(iter(tags))
    if tag not in tags:
        raise ValueError(f"unknown weights tag {tag!r} for {arch}; known tags: {', '.join(tags)}")
    return arch, cfg, tag, tags[tag]


def model_config(name: str, **overrides: Any) -> CvTConfig:
    """The `CvTConfig` of a registered variant with `overrides` applied (unknown fields are an error)."""
    _, cfg, _, _ = resolve(name)
    check_fields(CvTConfig, overrides, "CvTConfig")
    return dataclasses.replace(cfg, **overrides)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    pretrained: bool | str | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] = (0, 1, 2),
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
        **overrides: `CvTConfig` fields to change, e.g. `act="gelu"`, `qkv_method="linear"`, `drop_path_rate=0.2`.

    Returns:
        The model, with `data_config` (evaluation preprocessing), `class_names` (None for random init),
        `model_name` and `pretrained_cfg` attributes; loaded weights come in eval mode.
    """
    if features_only:
        from .features import CvTFeatures  # noqa: PLC0415

        return CvTFeatures(create_model(name, num_classes=num_classes, pretrained=pretrained, **overrides), out_indices)
    arch, _, tag, pretrained_cfg = resolve(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = model_config(name, **overrides)
    if pretrained:
        from .checkpoint import load_pretrained  # noqa: PLC0415 - weights I/O only when asked for

        return load_pretrained(cfg, pretrained_cfg, pretrained, num_classes=num_classes, model_name=f"{arch}.{tag}")
    model = CvT(cfg)
    model.pretrained_cfg = pretrained_cfg
    model.data_config = pretrained_cfg.data
    model.class_names = None
    model.model_name = f"{arch}.{tag}"
    return model
