"""Hugging Face transformers' `CvtConfig` (config.json) to our `CvTConfig` and back, and its class names."""

from __future__ import annotations

import logging
from typing import Any

from ..config import CvTConfig
from .formats import CheckpointError

logger = logging.getLogger(__name__)


def config_from_hf(hf: dict[str, Any]) -> CvTConfig:
    """Our `CvTConfig` from a transformers `CvtConfig` dict (config.json).

    The activation stays QuickGELU, the authors' numerics (transformers computes GELU; pass `act="gelu"` to get
    what it computes). LayerNorm eps is 1e-5: transformers' CvT never reads `layer_norm_eps` (its LayerNorms use
    torch's default 1e-5), so the 1e-12 in its configs has no effect. `num_classes` comes from the weights.
    """

    def uniform(key: str, default: Any) -> Any:
        values = hf.get(key, [default])
        values = values if isinstance(values, list) else [values]
        if len(set(values)) > 1:
            logger.info("Hugging Face config has per-stage %s %s; using the largest, %s", key, values, max(values))
        return max(values)

    base = CvTConfig()
    kernels = hf.get("kernel_qkv", list(base.qkv_kernel))
    for key in ("padding_q", "padding_kv"):
        padding = hf.get(key, [k // 2 for k in kernels])
        if list(padding) != [k // 2 for k in kernels]:
            raise CheckpointError(
                f"Hugging Face config {key}={padding} with kernel_qkv={kernels}: only padding kernel // 2 is supported"
            )
    qkv_bias = hf.get("qkv_bias", [True])
    if len(set(qkv_bias)) > 1:
        raise CheckpointError(f"Hugging Face config qkv_bias={qkv_bias}: per-stage q/k/v bias is not supported")
    return CvTConfig(
        dims=hf.get("embed_dim", base.dims),
        depths=hf.get("depth", base.depths),
        heads=hf.get("num_heads", base.heads),
        mlp_ratio=hf.get("mlp_ratio", base.mlp_ratio),
        embed_kernel=hf.get("patch_sizes", base.embed_kernel),
        embed_stride=hf.get("patch_stride", base.embed_stride),
        embed_padding=hf.get("patch_padding", base.embed_padding),
        qkv_method=hf.get("qkv_projection_method", base.qkv_method),
        qkv_kernel=kernels,
        stride_q=hf.get("stride_q", base.stride_q),
        stride_kv=hf.get("stride_kv", base.stride_kv),
        qkv_bias=bool(qkv_bias[0]),
        cls_token=hf.get("cls_token", base.cls_token),
        drop_path_rate=hf.get("drop_path_rate", base.drop_path_rate),
        drop_rate=uniform("drop_rate", 0.0),
        attn_drop_rate=uniform("attention_drop_rate", 0.0),
        in_chans=hf.get("num_channels", base.in_chans),
    )


def config_to_hf(cfg: CvTConfig, class_names: list[str] | None = None) -> dict[str, Any]:
    """A transformers `CvtConfig` dict (config.json of a `CvtForImageClassification`) for `cfg`.

    Raises:
        CheckpointError: `cfg` uses something transformers' CvT cannot compute (position embeddings, a class token
            before the last stage, "avg"/"linear" projections).
    """
    unsupported = []
    if any(cfg.pos_embed):
        unsupported.append(f"pos_embed={cfg.pos_embed}")
    if any(cfg.cls_token[:-1]):
        unsupported.append(f"cls_token={cfg.cls_token} (transformers sizes the class token for the last stage)")
    if any(m != "dw_bn" for m in cfg.qkv_method):
        unsupported.append(f"qkv_method={cfg.qkv_method} (transformers runs only 'dw_bn')")
    if unsupported:
        raise CheckpointError(f"transformers' CvT cannot express {', '.join(unsupported)}; save with format='cvt'")
    n = cfg.num_stages
    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    return {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        "num_channels": cfg.in_chans,
        "patch_sizes": list(cfg.embed_kernel),
        "patch_stride": list(cfg.embed_stride),
        "patch_padding": list(cfg.embed_padding),
        "embed_dim": list(cfg.dims),
        "num_heads": list(cfg.heads),
        "depth": list(cfg.depths),
        "mlp_ratio": list(cfg.mlp_ratio),
        "attention_drop_rate": [cfg.attn_drop_rate] * n,
        "drop_rate": [cfg.drop_rate] * n,
        "drop_path_rate": list(cfg.drop_path_rate),
        "qkv_bias": [cfg.qkv_bias] * n,
        "cls_token": list(cfg.cls_token),
        "qkv_projection_method": list(cfg.qkv_method),
        "kernel_qkv": list(cfg.qkv_kernel),
        "padding_kv": [k // 2 for k in cfg.qkv_kernel],
        "stride_kv": list(cfg.stride_kv),
        "padding_q": [k // 2 for k in cfg.qkv_kernel],
        "stride_q": list(cfg.stride_q),
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,  # not read by transformers' CvT (it uses 1e-5); recorded for people
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def hf_class_names(hf: dict[str, Any]) -> list[str] | None:
    id2label = hf.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    if len(names) == 1000 and names[0].startswith("tench"):
        return None  # ImageNet-1k with long WordNet names ("tench, Tinca tinca"): the short standard names instead
    return names
