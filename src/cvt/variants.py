"""The registered CvT variants and their released weights, as plain data: no model is built here.

`VARIANTS` maps a name to its architecture and its released weights by tag; `resolve` splits "name.tag",
`model_config` applies overrides, `match_variant` recognises a variant's architecture in any config,
`variant_model_name` names a model whose architecture departs from its variant's (`cvt_13-custom`), and
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

from .config import TRAINING_FIELDS, CvTConfig, DataConfig, PretrainedCfg, check_fields

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


def model_config(name: str, **overrides: Any) -> CvTConfig:
    """The `CvTConfig` of a registered variant with `overrides` applied (unknown fields are an error)."""
    _, cfg, _, _ = resolve(name)
    check_fields(CvTConfig, overrides, "CvTConfig")
    return dataclasses.replace(cfg, **overrides)


def match_variant(cfg: CvTConfig) -> str | None:
    """The registered variant whose architecture `cfg` is (ignoring classes and training-only rates), if any."""
    for name, (variant, _) in VARIANTS.items():
        same = {f: getattr(variant, f) for f in (*TRAINING_FIELDS, "act")}
        if dataclasses.replace(cfg, **same) == variant:
            return name
    return None


CUSTOM_SUFFIX = "-custom"


def variant_model_name(name: str, cfg: CvTConfig) -> str:
    """The name a model of architecture `cfg` carries when built or loaded as `name` (a registered `arch[.tag]`
    or whatever a checkpoint recorded): `name` itself while `cfg` is that variant's architecture (classes, drop
    rates and the activation aside), else `arch-custom`, so that a narrowed or deepened model is never labelled
    with the tag of released weights it does not have. Its config records what changed."""
    arch = name.partition(".")[0]
    if arch not in VARIANTS or match_variant(cfg) == arch:
        return name
    return f"{arch}{CUSTOM_SUFFIX}"


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
    "imagenet_classes",
    "list_models",
    "match_variant",
    "model_config",
    "resolve",
]
