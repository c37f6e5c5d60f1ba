"""Checkpoints in and out: the authors' `.pth`, Hugging Face CvT, and this project's own formats.

Reading turns any supported file into a `Checkpoint`: a state dict in our key layout plus whatever the file says
about the architecture, the evaluation preprocessing and the class names. The format is detected from the content,
never from the file name:

- the authors' release: a bare state dict with keys `stage{i}.…` (also wrapped in {"state_dict": …} or
  {"model": …}, or with DistributedDataParallel's `module.` prefix);
- Hugging Face transformers: a `CvtForImageClassification` / `CvtModel` folder (config.json + model.safetensors
  or pytorch_model.bin), or the weights file alone;
- ours: a folder with `model.safetensors` and a `config.json` {"format": "cvt", "version": 1, …}, or a training
  checkpoint {"format": "cvt.train", "version": 1, "model": …} written by `cvt.train`.

Key conversion is a pure dict -> dict function per foreign layout (a handful of regex rules); every historical
quirk gets one small named repair function. Loading is strict and names every missing, unexpected or mis-shaped
key; only a head of another size (fine-tuning) is re-initialised. Pickles are read with `weights_only=True`, so a
file that carries code is refused before any of it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CvTConfig, DataConfig, PretrainedCfg, check_fields
from .fileio import atomic_save, atomic_write
from .model import CvT
from .registry import VARIANTS, create_model, resolve

logger = logging.getLogger(__name__)

FORMAT = "cvt"  # a saved model folder
TRAIN_FORMAT = "cvt.train"  # a training checkpoint file
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAVE_FORMATS = ("cvt", "hf", "official")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file and the fix."""


@functools.cache
def _imagenet_classes() -> tuple[str, ...]:
    text = importlib.resources.files("cvt").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order ("tench", "goldfish", ...)."""
    return list(_imagenet_classes())


# --- key layouts: pure dict -> dict ----------------------------------------------------------------------------

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


_TO_CVT = {"official": official_to_cvt, "hf": hf_to_cvt, "cvt": dict}


# --- repairs: one per historical quirk -------------------------------------------------------------------------


def repair_wrapper(obj: Any) -> Any:
    """Training scripts save the weights under "state_dict" or "model" (with epoch, optimiser, ...): unwrap."""
    while isinstance(obj, dict) and not _is_state_dict(obj):
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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


# --- configs: from Hugging Face, to Hugging Face, from the weights alone ---------------------------------------

# fields that do not change which weights fit or what the model computes in eval mode
_TRAINING_FIELDS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "num_classes")


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


def _hf_class_names(hf: dict[str, Any]) -> list[str] | None:
    id2label = hf.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    if len(names) == 1000 and names[0].startswith("tench"):
        return None  # ImageNet-1k with long WordNet names ("tench, Tinca tinca"): the short standard names instead
    return names


def _match_variant(cfg: CvTConfig) -> str | None:
    """The registered variant whose architecture `cfg` is (ignoring classes and training-only rates), if any."""
    for name, (variant, _) in VARIANTS.items():
        same = {f: getattr(variant, f) for f in (*_TRAINING_FIELDS, "act")}
        if dataclasses.replace(cfg, **same) == variant:
            return name
    return None


def infer_config(
    state_dict: dict[str, torch.Tensor], known: dict[str, Any] | None = None
) -> tuple[CvTConfig, str | None, bool]:
    """The architecture of a state dict in our layout, read from its keys and shapes.

    Widths, depths, kernels, MLP ratio, class tokens and classes are in the weights; heads and strides are not.
    When the weights fit a registered variant, its config is used whole; otherwise heads assume 64 channels per
    head (as in every released model) and strides the CvT defaults.

    Args:
        state_dict: weights in our layout (shapes suffice: meta tensors work).
        known: `CvTConfig` fields the caller knows, taken instead of inferred (e.g. heads, qkv_method).

    Returns:
        (config, registered variant name or None, whether the heads were guessed).
    """
    known = {k: v for k, v in (known or {}).items() if k not in (*_TRAINING_FIELDS, "act")}
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"stages\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"cannot tell the stages of the model from keys {list(state_dict)[:5]}")
    fields: dict[str, Any] = {f: [] for f in ("dims", "depths", "embed_kernel", "mlp_ratio", "qkv_kernel")}
    fields.update(qkv_method=[], cls_token=[])
    for i in stages:
        proj = state_dict.get(f"stages.{i}.patch_embed.proj.weight")
        if proj is None or proj.ndim != 4:
            raise CheckpointError(f"stages.{i}.patch_embed.proj.weight is missing or not a conv weight")
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
                f"stage {i} has no convolutional projection weights: 'avg' and 'linear' cannot be told apart from "
                "the weights; pass the architecture (a model name, or qkv_method=...)"
            )
        fields["qkv_method"].append("dw_bn")
        fields["qkv_kernel"].append(conv.shape[-1] if conv is not None else 3)
        fields["cls_token"].append(f"stages.{i}.cls_token" in state_dict)
        if f"stages.{i}.pos_embed" in state_dict and not {"pos_embed", "pos_embed_size"} <= set(known):
            raise CheckpointError(
                "the weights have position embeddings, whose input size is not in the weights; "
                "pass the architecture (pos_embed=..., pos_embed_size=...)"
            )
    fields["qkv_bias"] = any(k.endswith(".attn.proj_q.bias") for k in state_dict) or not any(
        k.endswith(".attn.proj_q.weight") for k in state_dict
    )
    head = state_dict.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    fields.update(known)
    for name, (variant, _) in VARIANTS.items():
        with contextlib.suppress(ValueError):  # a variant's heads may not divide these widths
            if dataclasses.replace(variant, **fields) == variant:
                return dataclasses.replace(variant, num_classes=num_classes), name, False
    try:
        guessed = "heads" not in fields
        if guessed:
            fields["heads"] = tuple(d // 64 if d % 64 == 0 else 1 for d in fields["dims"])
        return CvTConfig(**fields, num_classes=num_classes), None, guessed
    except ValueError as err:
        raise CheckpointError(f"cannot build a config from the weights ({err}); pass the architecture") from None


# --- reading files ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What a checkpoint file holds, in our key layout.

    Attributes:
        state_dict: the weights, keys as in `CvT.state_dict()`.
        format: "official", "hf", "cvt" (a saved model folder or a bare state dict of ours) or "cvt.train".
        source: the file or folder read.
        config: the architecture if the file records it (ours, Hugging Face), else None.
        data_config: evaluation preprocessing if the file records it.
        class_names: class names if the file records them.
        model_name: the model name the file records.
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    source: Path
    config: CvTConfig | None = None
    data_config: DataConfig | None = None
    class_names: list[str] | None = None
    model_name: str | None = None


def _numpy_safe_globals() -> list[Any]:
    """numpy arrays/scalars of plain numeric dtypes (e.g. RNG states): data, not code, so allowed in weights_only."""
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    kinds += (np.float16, np.float32, np.float64)
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype] + [
        type(np.dtype(k)) for k in kinds
    ]


def _sniff(path: Path) -> str:
    """'torch' (zip or legacy pickle) or 'safetensors', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a PyTorch or safetensors file ({size} bytes, starting {head[:8]!r}); "
        "it may be truncated, or not a checkpoint"
    )


def read_weights_file(path: str | os.PathLike) -> Any:
    """The object in a `torch.save` or safetensors file, read without running any code from it.

    Raises:
        CheckpointError: the file carries Python objects other than tensors and plain containers (refused, nothing
            of it runs), or it is truncated or corrupt.
    """
    path = Path(path)
    if _sniff(path) == "safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(f"cannot read {path}: {err}; the file is truncated or corrupt") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        found = re.search(r"(Unsupported global: GLOBAL \S+|Can only build [^\n]*)", detail)
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects that are not weights "
                f"({found.group(1)}); unpickling them could run arbitrary code, so nothing of it was run. If you "
                "trust the file, re-save only its tensors (a state dict) with torch.save or safetensors."
            ) from None
        found = re.search(r"Unsupported operand [^\n]*", detail)
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it is a plain Python pickle, not a torch.save or safetensors file "
                f"({found.group(0)}); unpickling it could run arbitrary code, so nothing of it was run"
            ) from None
        found = re.search(r"WeightsUnpickler error: *([^\n]+)", detail)
        reason = found.group(1) if found else (detail.splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {reason}; the file is truncated or corrupt") from None
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, zip errors, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {path}: {reason}; the file is truncated or corrupt") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _check_version(meta: dict[str, Any], where: Path) -> None:
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: {meta.get('format')!r} version {version!r} is not supported (this cvt reads version "
            f"{FORMAT_VERSION}); upgrade cvt or re-save the model"
        )


def _own_meta(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """config, data config, class names and name from a "cvt" config.json or a "cvt.train" checkpoint."""
    _check_version(meta, where)
    try:
        config = CvTConfig.from_dict(meta["model_config"])
        data = meta.get("data_config")
        data_config = DataConfig.from_dict(data) if data else None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: bad model_config/data_config: {err}") from None
    names = meta.get("class_names")
    return {
        "config": config,
        "data_config": data_config,
        "class_names": list(names) if names else None,
        "model_name": meta.get("model_name"),
    }


def _read_weights_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder: `model.safetensors`, `pytorch_model.bin`, or shards listed in an index file."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return repair_wrapper(read_weights_file(folder / name))
        index = folder / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
                state.update(read_weights_file(folder / shard))
            return state
    raise CheckpointError(f"{folder} has a config.json but no weights ({' or '.join(HF_WEIGHT_FILES)})")


def _from_state_dict(state: Any, source: Path, meta: dict[str, Any] | None) -> Checkpoint:
    """Repair, detect and convert a state dict; `meta` is a config.json found with it."""
    state = repair_compile_prefix(repair_ddp_prefix(repair_wrapper(state)))
    if not _is_state_dict(state):
        raise CheckpointError(f"{source} holds no state dict (a dict of tensors) that this loader recognises")
    state = repair_hf_base_model(state)
    try:
        layout = detect_layout(state)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    ckpt = Checkpoint(_TO_CVT[layout](state), layout, source)
    if meta is not None and meta.get("format") == FORMAT and layout == "cvt":
        return dataclasses.replace(ckpt, **_own_meta(meta, source), format=FORMAT)
    if meta is not None and meta.get("model_type") == "cvt" and layout == "hf":
        try:
            config = config_from_hf(meta)
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from None
        return dataclasses.replace(ckpt, config=config, class_names=_hf_class_names(meta))
    return ckpt


def read_checkpoint(path: str | os.PathLike, *, ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint file or folder (see the module docstring) into our layout.

    Args:
        path: a file or folder.
        ema: from a training checkpoint, take the EMA weights instead of the model's.

    Raises:
        FileNotFoundError: nothing at `path`.
        CheckpointError: unreadable, unsafe or unrecognised content; the message names the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        if ema:
            raise CheckpointError(f"{path} is a model folder, not a training checkpoint: it has no EMA weights")
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f"{path} is a folder without {CONFIG_FILE}: not a saved cvt or Hugging Face model")
        meta = _read_json(config_file)
        if meta.get("format") != FORMAT and meta.get("model_type") != "cvt":
            raise CheckpointError(
                f'{config_file} is neither a cvt model config ("format": "cvt") nor a Hugging Face CvT config '
                f'("model_type": "cvt"; found {meta.get("model_type")!r})'
            )
        ckpt = _from_state_dict(_read_weights_folder(path), path, meta)
    else:
        obj = read_weights_file(path)
        if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
            info = _own_meta(obj, path)
            key = "ema" if ema else "model"
            if obj.get(key) is None:
                raise CheckpointError(f"{path} is a training checkpoint without {key!r} weights")
            inner = _from_state_dict(obj[key], path, None)
            return dataclasses.replace(inner, format=TRAIN_FORMAT, **info)
        if ema:
            raise CheckpointError(f"{path} is not a training checkpoint: it has no EMA weights")
        sidecar = path.parent / CONFIG_FILE
        ckpt = _from_state_dict(obj, path, _read_json(sidecar) if sidecar.is_file() else None)
    return ckpt


# --- building the model ----------------------------------------------------------------------------------------


def load_state_dict_strict(
    model: CvT, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint", allow_missing: Collection[str] = ()
) -> None:
    """Copy `state_dict` (our layout) into `model`; every key must match in name and shape.

    Raises:
        CheckpointError: naming the first few missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    state_dict = repair_bn_counters(state_dict, expected)
    missing = [k for k in expected if k not in state_dict and k not in allow_missing]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:

        def few(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:4]}{' ...' if len(keys) > 4 else ''}"

        raise CheckpointError(
            f"{source} does not fit the model: missing {few(missing)}, unexpected {few(unexpected)}, "
            f"mis-shaped {few(misshaped)}. Pass the architecture the weights were trained with (model name or config "
            "fields), or num_classes=... to re-initialise just the head."
        )
    model.load_state_dict(state_dict, strict=False)


def _official_file_tag(source: Path) -> tuple[str, PretrainedCfg] | None:
    """name.tag and weights config of an authors' file name; used only for its evaluation preprocessing."""
    for arch, (_, tags) in VARIANTS.items():
        for tag, weights in tags.items():
            if weights.official_file.lower() == source.name.lower():
                return f"{arch}.{tag}", weights
    return None


def _check_same_architecture(file_cfg: CvTConfig, cfg: CvTConfig, ckpt: Checkpoint) -> None:
    ignore = set(_TRAINING_FIELDS) | ({"act"} if ckpt.format == "hf" else set())
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
        cfg, inferred_name, guessed = infer_config(ckpt.state_dict, overrides)
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

    model = CvT(cfg)
    load_state_dict_strict(model, state, source=f"{ckpt.source} ({ckpt.format} format)", allow_missing=allow_missing)
    model.eval()

    variant = _match_variant(cfg)
    found = _official_file_tag(ckpt.source) if ckpt.format == "official" else None
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
    model.pretrained_cfg = pretrained_cfg
    model.data_config = ckpt.data_config or (pretrained_cfg.data if pretrained_cfg else DataConfig())
    model.class_names = class_names
    model.model_name = model_name or ckpt.model_name or inferred_name or "cvt_custom"
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
        from .hub import download_weights  # noqa: PLC0415

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


# --- writing ---------------------------------------------------------------------------------------------------


def _tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save  # noqa: PLC0415

    with atomic_write(path) as f:
        f.write(save(tensors, metadata={"format": "pt"}))  # "pt": what transformers expects


def _write_json(data: dict[str, Any], path: Path) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def save_model(
    model: CvT, path: str | os.PathLike, class_names: list[str] | None = None, *, format: str = "cvt"
) -> Path:
    """Write `model` atomically (each file appears whole or not at all).

    Args:
        model: the model; its `data_config`, `class_names` and `model_name` attributes are recorded when present.
        path: a folder for "cvt" and "hf", a file for "official".
        class_names: one name per class; default `model.class_names`.
        format: "cvt" (model.safetensors + config.json with the architecture, preprocessing and class names),
            "hf" (a transformers `CvtForImageClassification` folder) or "official" (the authors' bare state dict,
            which records no architecture).

    Returns:
        `path`.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {SAVE_FORMATS}")
    path = Path(path)
    cfg: CvTConfig = model.cfg
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != cfg.num_classes:
            raise ValueError(f"{len(names)} class names for a model with {cfg.num_classes} classes")
    state = _tensors(model.state_dict())
    if format == "official":
        if _match_variant(cfg) is None:
            logger.warning("%s records no architecture; load it with the same config fields you built it with", path)
        atomic_save(cvt_to_official(state), path)
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; format {format!r} writes a folder")
    if format == "hf":
        hf_config = config_to_hf(cfg, names)
        if cfg.act != "gelu":
            logger.warning("transformers' CvT computes GELU where this model computes QuickGELU: logits will differ")
        _write_safetensors(cvt_to_hf(state), path / WEIGHTS_FILE)
        _write_json(hf_config, path / CONFIG_FILE)
        return path
    data_config = getattr(model, "data_config", None) or DataConfig()
    _write_safetensors(state, path / WEIGHTS_FILE)
    _write_json(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_name": getattr(model, "model_name", None),
            "model_config": cfg.to_dict(),
            "data_config": data_config.to_dict(),
            "class_names": names,
        },
        path / CONFIG_FILE,
    )
    return path


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "cvt_to_hf",
    "cvt_to_official",
    "detect_layout",
    "hf_to_cvt",
    "imagenet_classes",
    "infer_config",
    "load_model",
    "load_pretrained",
    "load_state_dict_strict",
    "official_to_cvt",
    "read_checkpoint",
    "read_weights_file",
    "resolve_model",
    "save_model",
]
