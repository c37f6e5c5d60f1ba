"""timm's data-config helpers: `resolve_data_config` (a model's preprocessing as timm's dict) and `create_transform`
(a transform from that dict), over this package's `DataConfig` and transforms.

    config = cvt.data.resolve_data_config(model=model)   # {"input_size": (3, 224, 224), "crop_pct": 0.875, ...}
    transform = cvt.data.create_transform(**config)      # the model's evaluation transform
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..config import DataConfig
from .transforms import create_eval_transform, create_train_transform

DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_data_config(
    args: dict[str, Any] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    model: Any = None,
    use_test_size: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """The evaluation preprocessing as timm's dict: input_size (3, H, W), interpolation, mean, std, crop_pct,
    crop_mode.

    As timm: each key from `args` if set there (also `img_size` for a square input_size, `in_chans`), else from
    `pretrained_cfg`, else from `model.pretrained_cfg` (a cvt model's is its `data_config`), else the ImageNet
    defaults (224, bicubic, crop 0.875, center).

    Args:
        args: overrides, e.g. {"input_size": (3, 256, 256)} or {"img_size": 256, "crop_pct": 1.0}.
        pretrained_cfg: a timm-style pretrained_cfg dict to read instead of the model's.
        model: a model with `pretrained_cfg` (any cvt model, or a timm one).
        use_test_size: accepted for timm's signature; cvt models have no separate test size.
        verbose: accepted for timm's signature.
    """
    args = {k: v for k, v in (args or {}).items() if v is not None}
    if pretrained_cfg is None and model is not None:
        pretrained_cfg = getattr(model, "pretrained_cfg", None)
    defaults = DataConfig()
    base = {
        "input_size": (3, *defaults.input_size),
        "interpolation": defaults.interpolation,
        "mean": defaults.mean,
        "std": defaults.std,
        "crop_pct": defaults.crop_pct,
        "crop_mode": defaults.crop_mode,
    }
    source = pretrained_cfg or {}
    config = {key: source.get(key) if source.get(key) is not None else base[key] for key in DATA_KEYS}
    in_chans = args.get("in_chans", config["input_size"][0])
    if "input_size" in args:
        size = args["input_size"]
        config["input_size"] = tuple(size) if len(size) == 3 else (in_chans, *size)
    elif "img_size" in args:
        size = args["img_size"]
        config["input_size"] = (in_chans, size, size) if isinstance(size, int) else (in_chans, *size)
    for key in DATA_KEYS[1:]:
        if key in args:
            config[key] = args[key]
    config["input_size"] = tuple(config["input_size"])
    config["mean"], config["std"] = tuple(config["mean"]), tuple(config["std"])
    return config


def resolve_model_data_config(
    model: Any,
    args: dict[str, Any] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    use_test_size: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """timm's `resolve_model_data_config`: `resolve_data_config` with the model first."""
    return resolve_data_config(args, pretrained_cfg, model, use_test_size, verbose)


def create_transform(
    input_size: int | Sequence[int],
    is_training: bool = False,
    *,
    interpolation: str = "bilinear",
    mean: Sequence[float] = DataConfig.mean,
    std: Sequence[float] = DataConfig.std,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    scale: tuple[float, float] | None = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    **_: Any,
) -> Callable:
    """A transform as timm's `create_transform`: the evaluation transform of (input_size, crop_pct, crop_mode,
    interpolation, mean, std), or with `is_training` the training transform (`create_train_transform`).

    Args:
        input_size: int, (H, W) or timm's (C, H, W).
        is_training: the training transform (RandomResizedCrop `scale`/`ratio`, flip, RandAugment
            `auto_augment`, else colour jitter, random erasing `re_prob`) instead of the evaluation one.
        interpolation: resampling filter ("bilinear", "bicubic", ...; timm's default here is bilinear).
        mean: normalisation mean.
        std: normalisation std.
        crop_pct: evaluation centre-crop fraction (default 0.875).
        crop_mode: evaluation "center" (resize the shorter side to size / crop_pct, centre crop) or "squash"
            (resize the whole image); timm's "border" is not supported.
        scale, ratio, hflip, color_jitter, auto_augment, re_prob: training augmentation, as timm's.
        **_: other timm arguments, ignored (e.g. `use_prefetcher`, `vflip`).
    """
    size = tuple(input_size[-2:]) if isinstance(input_size, (tuple, list)) else (input_size, input_size)
    if is_training:
        return create_train_transform(size, scale=scale, ratio=ratio, hflip=hflip, auto_augment=auto_augment,
                                      color_jitter=color_jitter, re_prob=re_prob, interpolation=interpolation,
                                      mean=mean, std=std)  # fmt: skip
    mode = crop_mode or "center"
    if mode not in ("center", "squash"):
        raise ValueError(f"crop_mode {mode!r} is not supported: use 'center' or 'squash'")
    pct = crop_pct if crop_pct is not None else (1.0 if mode == "squash" else DataConfig.crop_pct)
    data = DataConfig(size, crop_mode=mode, crop_pct=pct, interpolation=interpolation, mean=mean, std=std)
    return create_eval_transform(data)


__all__ = ["create_transform", "resolve_data_config"]
