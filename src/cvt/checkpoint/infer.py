"""The architecture of a state dict that records none (the authors' files), read from its keys and shapes; and
whether a state dict fits an architecture, decided from the numbers before a model is built."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch

from ..config import TRAINING_FIELDS, CvTConfig
from ..shapes import check_size, iter_state_dict_shapes
from .formats import CheckpointError
from .layouts import check_fits


def infer_config(
    state_dict: dict[str, torch.Tensor],
    known: dict[str, Any] | None = None,
    variants: Mapping[str, CvTConfig] | None = None,
    *,
    source: str | os.PathLike = "weights",
) -> tuple[CvTConfig, str | None, bool]:
    """The architecture of a state dict in our layout, read from its keys and shapes.

    Widths, depths, kernels, MLP ratio, class tokens and classes are in the weights; heads and strides are not.
    When the weights fit a registered variant, its config is used whole; otherwise heads assume 64 channels per
    head (as in every released model) and strides the CvT defaults.

    Args:
        state_dict: weights in our layout (shapes suffice: meta tensors work).
        known: `CvTConfig` fields the caller knows, taken instead of inferred (e.g. heads, qkv_method).
        variants: {name: architecture} of the registered variants to recognise (`cvt.factory.infer_config` passes
            the registry's; this package does not know it).
        source: the file the weights come from, for messages.

    Returns:
        (config, registered variant name or None, whether the heads were guessed).
    """
    known = {k: v for k, v in (known or {}).items() if k not in (*TRAINING_FIELDS, "act")}
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"stages\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"{source}: cannot tell the stages of the model from keys {list(state_dict)[:5]}")
    fields: dict[str, Any] = {f: [] for f in ("dims", "depths", "embed_kernel", "mlp_ratio", "qkv_kernel")}
    fields.update(qkv_method=[], cls_token=[])
    for i in stages:
        proj = state_dict.get(f"stages.{i}.patch_embed.proj.weight")
        if proj is None or proj.ndim != 4:
            raise CheckpointError(f"{source}: stages.{i}.patch_embed.proj.weight is missing or not a conv weight")
        dim = proj.shape[0]
        fields["dims"].append(dim)
        fields["embed_kernel"].append(proj.shape[-1])
        if i == 0:
            fields["in_chans"] = proj.shape[1]
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        fields["depths"].append(max(blocks) + 1 if blocks else 0)
        fc1 = state_dict.get(f"stages.{i}.blocks.0.mlp.fc1.weight")
        fields["mlp_ratio"].append(fc1.shape[0] / dim if fc1 is not None else 4.0)
        conv = state_dict.get(f"stages.{i}.blocks.0.attn.conv_proj_q.conv.weight")
        if conv is None and blocks and "qkv_method" not in known:
            raise CheckpointError(
                f"{source}: stage {i} has no convolutional projection weights: 'avg' and 'linear' cannot be told "
                "apart from the weights; pass the architecture (a model name, or qkv_method=...)"
            )
        fields["qkv_method"].append("dw_bn")
        fields["qkv_kernel"].append(conv.shape[-1] if conv is not None else 3)
        fields["cls_token"].append(f"stages.{i}.cls_token" in state_dict)
        if f"stages.{i}.pos_embed" in state_dict and not {"pos_embed", "pos_embed_size"} <= set(known):
            raise CheckpointError(
                f"{source}: the weights have position embeddings, whose input size is not in the weights; "
                "pass the architecture (pos_embed=..., pos_embed_size=...)"
            )
    fields["qkv_bias"] = any(k.endswith(".attn.proj_q.bias") for k in state_dict) or not any(
        k.endswith(".attn.proj_q.weight") for k in state_dict
    )
    head = state_dict.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    fields.update(known)
    for name, variant in (variants or {}).items():
        with contextlib.suppress(ValueError):  # a variant's heads may not divide these widths
            if dataclasses.replace(variant, **fields) == variant:
                return dataclasses.replace(variant, num_classes=num_classes), name, False
    try:
        guessed = "heads" not in fields
        if guessed:
            fields["heads"] = tuple(d // 64 if d % 64 == 0 else 1 for d in fields["dims"])
        return CvTConfig(**fields, num_classes=num_classes), None, guessed
    except ValueError as err:
        raise CheckpointError(
            f"{source}: cannot build a config from the weights ({err}); pass the architecture"
        ) from None


def check_config_fits(
    cfg: CvTConfig, state_dict: dict[str, torch.Tensor], *, source: str, allow_missing: Collection[str] = ()
) -> None:
    """Refuse, before `CvT(cfg)` allocates anything, an architecture too large to build (`cvt.shapes.check_size`)
    or one the weights do not fit (compared key by key with the shapes `cfg` implies).

    Args:
        cfg: the architecture the model would be built with.
        state_dict: the weights in our layout.
        source: the file, for messages.
        allow_missing: keys the model may keep from its initialisation (a re-initialised head).

    Raises:
        CheckpointError: naming `source` and what does not fit.
    """
    try:
        check_size(cfg)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    check_fits(iter_state_dict_shapes(cfg), state_dict, source=source, allow_missing=allow_missing)
