"""Key layouts, as pure dict -> dict functions, and one small named repair per historical quirk.

Our keys (`stages.{i}.…`) follow the authors' leaf names, so their layout is one rename (`stage{i}.` <->
`stages.{i}.`) and transformers' a handful of fragment rules applied in order. `load_state_dict_strict` copies a
state dict in our layout into a model, naming every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

from .formats import CheckpointError

logger = logging.getLogger(__name__)

_QKV = (("q", "query"), ("k", "key"), ("v", "value"))
_HF_CONV = "convolution_projection"

# (ours, Hugging Face) key fragments; "^" anchors at the start. Applied in this order in either direction.
_HF_FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("^stages.", "^cvt.encoder.stages."),
    (".patch_embed.proj.", ".embedding.convolution_embeddings.projection."),
    (".patch_embed.norm.", ".embedding.convolution_embeddings.normalization."),
    (".blocks.", ".layers."),
    *(
        (f".attn.conv_proj_{x}.{ours}.", f".attention.attention.{_HF_CONV}_{name}.{_HF_CONV}.{hf}.")
        for x, name in _QKV
        for ours, hf in (("conv", "convolution"), ("bn", "normalization"))
    ),
    *((f".attn.proj_{x}.", f".attention.attention.projection_{name}.") for x, name in _QKV),
    (".attn.proj.", ".attention.output.dense."),  # before mlp.fc2 <- output.dense
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    ("^norm.", "^layernorm."),
    ("^head.", "^classifier."),
)


def _rules(pairs: tuple[tuple[str, str], ...], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        anchor = "^" if src.startswith("^") else ""
        rules.append((re.compile(anchor + re.escape(src.removeprefix("^"))), dst.removeprefix("^")))
    return rules


_TO_HF = _rules(_HF_FRAGMENTS, reverse=False)
_FROM_HF = _rules(_HF_FRAGMENTS, reverse=True)
_TO_OFFICIAL = [(re.compile(r"^stages\.(\d+)\."), r"stage\1.")]
_FROM_OFFICIAL = [(re.compile(r"^stage(\d+)\."), r"stages.\1.")]


def _rename(state_dict: dict[str, Any], rules: list[tuple[re.Pattern[str], str]]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in rules:
            new = pattern.sub(repl, new, count=1)
        if new in out:
            raise CheckpointError(f"keys collide after renaming: two keys map to {new!r} (one is {key!r})")
        out[new] = value
    return out


def official_to_cvt(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The authors' keys (`stage{i}.…`) -> ours (`stages.{i}.…`); every leaf name is already the same."""
    return _rename(state_dict, _FROM_OFFICIAL)


def cvt_to_official(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Our keys -> the authors' layout, as their released `.pth` files have it."""
    return _rename(state_dict, _TO_OFFICIAL)


def hf_to_cvt(state_dict: dict[str, Any]) -> dict[str, Any]:
    """transformers' `CvtForImageClassification` keys (`cvt.encoder.stages.{i}.layers.{j}.…`) -> ours."""
    return _rename(state_dict, _FROM_HF)


def cvt_to_hf(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Our keys -> transformers' `CvtForImageClassification` layout."""
    return _rename(state_dict, _TO_HF)


def detect_layout(state_dict: dict[str, Any]) -> str:
    """Which key layout a (repaired) state dict uses: "official", "hf" or "cvt"; CheckpointError if none."""
    keys = list(state_dict)
    if any(k.startswith("cvt.encoder.stages.") for k in keys):
        return "hf"
    if any(re.match(r"stage\d+\.", k) for k in keys):
        return "official"
    if any(k.startswith("stages.") for k in keys):
        return "cvt"
    raise CheckpointError(f"no CvT weights recognised; the first keys are {keys[:5]}")


TO_CVT = {"official": official_to_cvt, "hf": hf_to_cvt, "cvt": dict}


# --- repairs: one per historical quirk -------------------------------------------------------------------------


def repair_wrapper(obj: Any) -> Any:
    """Training scripts save the weights under "state_dict" or "model" (with epoch, optimiser, ...): unwrap."""
    while isinstance(obj, dict) and not is_state_dict(obj):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return state_dict


def repair_ddp_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A model saved while wrapped in (Distributed)DataParallel has every key prefixed with `module.`."""
    return _strip_prefix(state_dict, "module.")


def repair_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A model saved after `torch.compile` has every key prefixed with `_orig_mod.`."""
    return _strip_prefix(state_dict, "_orig_mod.")


def repair_hf_base_model(state_dict: dict[str, Any]) -> dict[str, Any]:
    """transformers' `CvtModel` (no head) saves `encoder.…` where `CvtForImageClassification` saves `cvt.encoder.…`."""
    if any(k.startswith("encoder.stages.") for k in state_dict):
        return {("cvt." + k if k.startswith("encoder.") else k): v for k, v in state_dict.items()}
    return state_dict


def repair_bn_counters(state_dict: dict[str, Any], expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Files from PyTorch < 0.4.1 lack BatchNorm's `num_batches_tracked`; it does not affect the outputs: zero it."""
    missing = [k for k in expected if k.endswith(".num_batches_tracked") and k not in state_dict]
    if not missing:
        return state_dict
    logger.debug("filling %d missing BatchNorm num_batches_tracked counters with 0", len(missing))
    return {**state_dict, **{k: torch.zeros_like(expected[k], device="cpu") for k in missing}}


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def check_fits(
    expected: Iterable[tuple[str, tuple[int, ...]]],
    state_dict: dict[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    allow_missing: Collection[str] = (),
) -> None:
    """Compare the keys and shapes of `state_dict` (our layout) with what a model holds, streamed (key, shape) as
    `cvt.shapes.iter_state_dict_shapes` gives them before the model is built; missing BatchNorm counters are fine
    (`repair_bn_counters` fills them).

    Raises:
        CheckpointError: naming the first few missing, unexpected and mis-shaped keys.
    """
    missing: list[str] = []
    misshaped: list[str] = []
    seen: set[str] = set()
    for key, shape in expected:
        tensor = state_dict.get(key)
        if tensor is None:
            if key not in allow_missing and not key.endswith(".num_batches_tracked"):
                missing.append(key)
        elif tuple(tensor.shape) != tuple(shape):
            misshaped.append(f"{key} {tuple(tensor.shape)} (model {tuple(shape)})")
        seen.add(key)
    unexpected = [k for k in state_dict if k not in seen]
    if missing or unexpected or misshaped:

        def few(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:4]}{' ...' if len(keys) > 4 else ''}"

        raise CheckpointError(
            f"{source} does not fit the model: missing {few(missing)}, unexpected {few(unexpected)}, "
            f"mis-shaped {few(misshaped)}. Pass the architecture the weights were trained with (model name or config "
            "fields), or num_classes=... to re-initialise just the head."
        )


def load_state_dict_strict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    allow_missing: Collection[str] = (),
) -> None:
    """Copy `state_dict` (our layout) into `model`; every key must match in name and shape (`check_fits`).

    Raises:
        CheckpointError: naming the first few missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    state_dict = repair_bn_counters(state_dict, expected)
    shapes = ((k, tuple(v.shape)) for k, v in expected.items())
    check_fits(shapes, state_dict, source=source, allow_missing=allow_missing)
    model.load_state_dict(state_dict, strict=False)
