"""The registered CvT variants and their released weights, as plain data: no model is built here.

`VARIANTS` maps a name to its architecture and its released weights by tag; `resolve` splits "name.tag",
`model_config` applies overrides, `match_variant` recognises a variant's architecture in any config, `identify`
decides a model's identity (its name, the released weights it still is, its preprocessing and class names), and
`imagenet_classes` are the class names of every released 1000-class head. `cvt.factory.create_model` builds them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib.resources
import re
from collections.abc import Sequence
from typing import Any

from .config import TRAINING_FIELDS, CvTConfig, DataConfig, PretrainedCfg, reject_unknown_fields
from .identity import ModelIdentity

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


# name -> (trainable parameters, {square input size: multiply-accumulates per image}), as `cvt.flops.model_cost`
# counts them (torch's FlopCounterMode / 2; the SPEC's table): what `cvt list` prints without building a model.
# tests/test_flops.py recounts one and compares all with the spec figures.
PRECOMPUTED_COSTS: dict[str, tuple[int, dict[int, int]]] = {
    "cvt_13": (19_997_480, {224: 4_566_089_216, 384: 16_269_359_616}),
    "cvt_21": (31_622_696, {224: 7_177_985_024, 384: 24_849_091_584}),
    "cvt_w24": (277_196_392, {224: 60_917_313_536, 384: 194_221_654_016}),
}


def precomputed_cost(name: str, size: int) -> tuple[int, int] | None:
    """(parameters, MACs) of a registered variant (1000 classes) at `size` x `size`, if precomputed."""
    params, macs = PRECOMPUTED_COSTS.get(name, (0, {}))
    return (params, macs[size]) if size in macs else None


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def list_models(
    filter: str | Sequence[str] = "",  # timm's name, though it shadows the builtin
    pretrained: bool = False,
    exclude_filters: str | Sequence[str] = "",
) -> list[str]:
    """Registered model names, as timm's `list_models`: sorted, optionally filtered by fnmatch patterns.

    Args:
        filter: a pattern ("cvt_2*") or a list of them; a name matching any is listed. Empty: every name.
        pretrained: list `name.tag` for every released set of weights instead of the variant names (the
            patterns then apply to those: "cvt_13.*", "*384*").
        exclude_filters: patterns of names to leave out.

    `list_models(True)` (the former signature, `pretrained` first) still means `pretrained=True`.
    """
    if isinstance(filter, bool):
        filter, pretrained = "", filter
    tagged = [f"{name}.{tag}" for name, (_, tags) in VARIANTS.items() for tag in tags]
    names = tagged if pretrained else list(VARIANTS)
    include = [filter] if isinstance(filter, str) else list(filter)
    exclude = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    if any(include):
        names = [n for n in names if any(fnmatch.fnmatchcase(n, f) for f in include if f)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, f) for f in exclude if f)]
    return sorted(names, key=_natural_key)


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


def is_registered(name: str) -> bool:
    """Whether `name` is a registered `arch[.tag]` (rather than, say, a checkpoint path)."""
    try:
        resolve(name)
    except ValueError:
        return False
    return True


def model_config(name: str, **overrides: Any) -> CvTConfig:
    """The `CvTConfig` of a registered variant with `overrides` applied (unknown fields are an error)."""
    _, cfg, _, _ = resolve(name)
    reject_unknown_fields(CvTConfig, overrides, "CvTConfig")
    return dataclasses.replace(cfg, **overrides)


def match_variant(cfg: CvTConfig) -> str | None:
    """The registered variant whose architecture `cfg` is (ignoring classes and training-only rates), if any."""
    for name, (variant, _) in VARIANTS.items():
        same = {f: getattr(variant, f) for f in (*TRAINING_FIELDS, "act")}
        if dataclasses.replace(cfg, **same) == variant:
            return name
    return None


CUSTOM_SUFFIX = "-custom"
# `CvTConfig` fields that only change how a model trains: released weights stay themselves under other values
_TRAINING_ONLY = ("drop_path_rate", "drop_rate", "attn_drop_rate")


def identify(
    cfg: CvTConfig,
    name: str | None = None,
    *,
    data: DataConfig | None = None,
    class_names: Sequence[str] | None = None,
    imagenet_head: bool = False,
) -> ModelIdentity:
    """The identity of a model of architecture `cfg`: the one place that decides a model's name, whether it still is
    released weights, its evaluation preprocessing and its class names.

    A model is the released weights `arch.tag` while it is named so (asked for by that name, or a file recorded it)
    and its architecture, head (1000 classes) and activation are still theirs; it then claims them everywhere (name,
    `pretrained_cfg`, model card, exports). Otherwise it claims them nowhere: with their architecture it is named by
    the variant alone ("cvt_13"), with another architecture "cvt_13-custom".

    Args:
        cfg: the model's architecture, head included.
        name: the registered `arch[.tag]` asked for or named by the authors' file name, the name a file recorded
            (kept as it is when it is not a registered one), or None: the variant `cfg` is, with its default tag
            (a file that records no name: the authors' release, a Hugging Face folder).
        data: the evaluation preprocessing a file recorded; None for that of the weights named (or the default).
        class_names: the class names a file recorded; None for ImageNet-1k's where the head is ImageNet's.
        imagenet_head: whether a 1000-class head is ImageNet-1k's unless its weights are known to be something
            else (a registered model, the authors' or a Hugging Face file); released weights always are.
    """
    variant = match_variant(cfg)
    arch, _, tag = (name or variant or "").partition(".")
    weights = None
    if arch in VARIANTS:
        tags = VARIANTS[arch][1]
        tag = tag if tag in tags else (next(iter(tags)) if name is None else "")
        data = data or tags[tag or next(iter(tags))].data
        same = {f: getattr(cfg, f) for f in _TRAINING_ONLY}
        if variant != arch:
            name = f"{arch}{CUSTOM_SUFFIX}"  # another architecture: never the released weights' tag
        elif tag and cfg == dataclasses.replace(VARIANTS[arch][0], **same):
            name, weights = f"{arch}.{tag}", tags[tag]
        else:
            name = arch  # their architecture with another head or activation: the variant, not its weights
    if class_names is None and cfg.num_classes == 1000 and (imagenet_head or weights is not None):
        class_names = _imagenet_classes()
    return ModelIdentity(name or "cvt_custom", weights, data or DataConfig(), class_names)


def find_official_file(file_name: str) -> tuple[str, PretrainedCfg] | None:
    """`name.tag` and weights entry of one of the authors' release file names (case-insensitive), if it is one."""
    for arch, (_, tags) in VARIANTS.items():
        for tag, weights in tags.items():
            if weights.official_file.lower() == file_name.lower():
                return f"{arch}.{tag}", weights
    return None


@functools.cache
def _imagenet_classes() -> tuple[str, ...]:
    text = importlib.resources.files("cvt").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order ("tench", "goldfish", ...)."""
    return list(_imagenet_classes())


__all__ = [
    "VARIANTS",
    "find_official_file",
    "identify",
    "imagenet_classes",
    "is_registered",
    "list_models",
    "match_variant",
    "model_config",
    "resolve",
]
