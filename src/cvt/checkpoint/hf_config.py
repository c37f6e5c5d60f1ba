"""Hugging Face transformers' `CvtConfig` (config.json) to our `CvTConfig` and back, its class names, and its image
processor (preprocessor_config.json) to our `DataConfig` and back."""

from __future__ import annotations

import logging
import math
import reprlib
from typing import Any

from PIL import Image

from ..config import ConfigError, CvTConfig, DataConfig
from .formats import CheckpointError

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
DATA_CONFIG_KEY = "cvt_data_config"  # our DataConfig, verbatim, in a Hugging Face config.json
NAME_KEY = "cvt_model_name"  # and the model's name
ACT_KEY = "cvt_act"  # and the activation the weights were trained with
CONVNEXT_WARP_SIZE = 384  # ConvNextImageProcessor resizes the whole image (no crop) from this size up


# transformers' CvtConfig key -> our CvTConfig field, for the fields both hold as one list entry per stage
HF_PER_STAGE = {
    "embed_dim": "dims",
    "depth": "depths",
    "num_heads": "heads",
    "mlp_ratio": "mlp_ratio",
    "patch_sizes": "embed_kernel",
    "patch_stride": "embed_stride",
    "patch_padding": "embed_padding",
    "qkv_projection_method": "qkv_method",
    "kernel_qkv": "qkv_kernel",
    "stride_q": "stride_q",
    "stride_kv": "stride_kv",
    "cls_token": "cls_token",
    "drop_path_rate": "drop_path_rate",
}
# and the keys read into one value of ours (transformers lists the rates and qkv_bias per stage)
HF_SCALARS = {
    "qkv_bias": "qkv_bias",
    "drop_rate": "drop_rate",
    "attention_drop_rate": "attn_drop_rate",
    "num_channels": "in_chans",
    ACT_KEY: "act",
}


def config_from_hf(hf: dict[str, Any]) -> CvTConfig:
    """Our `CvTConfig` from a transformers `CvtConfig` dict (config.json), every value checked (`CvTConfig`).

    The activation stays QuickGELU, the authors' numerics (transformers computes GELU; pass `act="gelu"` to get
    what it computes), unless the folder was written by `save_model`, which records the model's ("cvt_act").
    LayerNorm eps is 1e-5: transformers' CvT never reads `layer_norm_eps` (its LayerNorms use torch's default
    1e-5), so the 1e-12 in its configs has no effect. `num_classes` comes from the weights.

    Raises:
        CheckpointError: a value of the wrong type or range, or one our model cannot compute; the message names
            the config.json key (the caller adds the file).
    """
    fields = {field: hf[key] for key, field in HF_PER_STAGE.items() if key in hf}
    for key, field in HF_SCALARS.items():
        values = hf.get(key)
        if isinstance(values, list):
            if key == "qkv_bias" and len(set(map(repr, values))) > 1:
                raise CheckpointError(f"qkv_bias = {reprlib.repr(values)}: per-stage q/k/v bias is not supported")
            values = _largest(key, values) if values else None
        if values is not None:
            fields[field] = values
    try:
        cfg = CvTConfig(**fields)
    except ConfigError as err:
        names = {field: key for key, field in {**HF_PER_STAGE, **HF_SCALARS}.items()}
        raise CheckpointError(f"{names.get(err.field, err.field)}{err.detail}") from None
    for key in ("padding_q", "padding_kv"):
        padding = hf.get(key, [k // 2 for k in cfg.qkv_kernel])
        if padding != [k // 2 for k in cfg.qkv_kernel]:
            raise CheckpointError(
                f"{key} = {reprlib.repr(padding)} with kernel_qkv = {list(cfg.qkv_kernel)}: only padding kernel // 2 "
                "is supported"
            )
    return cfg


def _largest(key: str, values: list[Any]) -> Any:
    """One value for a per-stage list of transformers' that our model holds once (the dropout rates): the largest."""
    try:
        largest = max(values)
    except TypeError:
        raise CheckpointError(f"{key} = {reprlib.repr(values)}: must be a list of numbers") from None
    if any(v != largest for v in values):
        logger.info("Hugging Face config has per-stage %s %s; using the largest, %s", key, values, largest)
    return largest


def config_to_hf(
    cfg: CvTConfig,
    class_names: list[str] | None = None,
    data_config: DataConfig | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """A transformers `CvtConfig` dict (config.json of a `CvtForImageClassification`) for `cfg`.

    `data_config` and `model_name`, when given, are recorded under "cvt_data_config" and "cvt_model_name", and
    the activation under "cvt_act" (transformers keeps unknown keys), so that our loader recovers them exactly.

    Raises:
        CheckpointError: `cfg` uses something transformers' CvT cannot compute (position embeddings, a class token
            before the last stage, "avg"/"linear" projections, a stage i with i or fewer blocks).
    """
    unsupported = []
    if any(cfg.pos_embed):
        unsupported.append(f"pos_embed={cfg.pos_embed}")
    if any(cfg.cls_token[:-1]):
        unsupported.append(f"cls_token={cfg.cls_token} (transformers sizes the class token for the last stage)")
    if any(m != "dw_bn" for m in cfg.qkv_method):
        unsupported.append(f"qkv_method={cfg.qkv_method} (transformers runs only 'dw_bn')")
    if cfg.global_pool not in (None, "token" if cfg.cls_token[-1] else "avg"):
        unsupported.append(
            f"global_pool={cfg.global_pool!r} (transformers' head reads the class token if there is one)"
        )
    short = [i for i, depth in enumerate(cfg.depths) if depth <= i]
    if short:
        unsupported.append(
            f"depths={cfg.depths} (transformers' CvT indexes each stage's drop-path list by the stage number, so "
            f"stage i needs more than i blocks: stage(s) {short} would raise IndexError in CvtForImageClassification)"
        )
    if unsupported:
        raise CheckpointError(f"transformers' CvT cannot express {', '.join(unsupported)}; save with format='cvt'")
    n = cfg.num_stages
    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    return {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        "num_channels": cfg.in_chans,
        **{key: list(getattr(cfg, field)) for key, field in HF_PER_STAGE.items()},
        "attention_drop_rate": [cfg.attn_drop_rate] * n,
        "drop_rate": [cfg.drop_rate] * n,
        "qkv_bias": [cfg.qkv_bias] * n,
        "padding_kv": [k // 2 for k in cfg.qkv_kernel],
        "padding_q": [k // 2 for k in cfg.qkv_kernel],
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,  # not read by transformers' CvT (it uses 1e-5); recorded for people
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        **({DATA_CONFIG_KEY: data_config.to_dict()} if data_config is not None else {}),
        **({NAME_KEY: model_name} if model_name else {}),
        ACT_KEY: cfg.act,  # not read by transformers, which computes GELU
    }


def hf_class_names(hf: dict[str, Any]) -> list[str] | None:
    id2label = hf.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    if len(names) == 1000 and names[0].startswith("tench"):
        return None  # ImageNet-1k with long WordNet names ("tench, Tinca tinca"): the short standard names instead
    return names


def preprocessor_to_hf(data: DataConfig) -> dict[str, Any]:
    """The preprocessor_config.json that makes transformers' `AutoImageProcessor` (and `pipeline`) prepare images
    as `data` does.

    transformers' CvT checkpoints use `ConvNextImageProcessor`: below 384 px it resizes the shorter side to
    int(size / crop_pct) and centre-crops the size (our "center"), from 384 px up it resizes the whole image to the
    size (our "squash"). The two cases it cannot express get the processor that does exactly ours:
    `ViTImageProcessor` (a plain resize) for "squash" below 384 px, `BitImageProcessor` (resize, then centre crop)
    for "center" from 384 px up or at a non-square size.
    """
    height, width = data.input_size
    common = {
        "do_resize": True,
        "resample": int(Image.Resampling[data.interpolation.upper()]),  # PIL's code, as transformers records it
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(data.mean),
        "image_std": list(data.std),
    }
    square, small = height == width, max(height, width) < CONVNEXT_WARP_SIZE
    if square and (small == (data.crop_mode == "center")):
        size = {"shortest_edge": height}
        return {"image_processor_type": "ConvNextImageProcessor", "size": size, "crop_pct": data.crop_pct, **common}
    if data.crop_mode == "squash":
        return {"image_processor_type": "ViTImageProcessor", "size": {"height": height, "width": width}, **common}
    if square:
        size = {"shortest_edge": math.floor(height / data.crop_pct)}
    else:  # as our transform: both sides resized to side / crop_pct
        size = {"height": math.floor(height / data.crop_pct), "width": math.floor(width / data.crop_pct)}
    return {
        "image_processor_type": "BitImageProcessor",
        "size": size,
        "do_center_crop": True,
        "crop_size": {"height": height, "width": width},
        "do_convert_rgb": True,
        **common,
    }


def data_config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None) -> DataConfig | None:
    """Our `DataConfig` from a Hugging Face folder: the verbatim copy we record in config.json, else what a
    `ConvNextImageProcessor` or `ViTImageProcessor` preprocessor_config.json says (the released CvT checkpoints
    have the former); None when neither says it."""
    if hf.get(DATA_CONFIG_KEY):
        return DataConfig.from_dict(hf[DATA_CONFIG_KEY])
    if not preprocessor:
        return None
    kind = str(preprocessor.get("image_processor_type") or preprocessor.get("feature_extractor_type") or "")
    code = preprocessor.get("resample", Image.Resampling.BICUBIC)
    resample = Image.Resampling(code).name.lower() if code in set(Image.Resampling) else "bicubic"
    common = {
        "interpolation": resample,
        "mean": tuple(preprocessor.get("image_mean", DataConfig.mean)),
        "std": tuple(preprocessor.get("image_std", DataConfig.std)),
    }
    size = preprocessor.get("size")
    if kind.startswith("ConvNext"):
        edge = size.get("shortest_edge") if isinstance(size, dict) else size
        if not isinstance(edge, int):
            return None
        if edge < CONVNEXT_WARP_SIZE:
            return DataConfig(edge, crop_mode="center", crop_pct=preprocessor.get("crop_pct") or 224 / 256, **common)
        return DataConfig(edge, crop_mode="squash", crop_pct=1.0, **common)
    if kind.startswith("ViT") and isinstance(size, dict) and {"height", "width"} <= set(size):
        return DataConfig((size["height"], size["width"]), crop_mode="squash", crop_pct=1.0, **common)
    logger.debug("image processor %r: its preprocessing is not read; the defaults apply", kind)
    return None
