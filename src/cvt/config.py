"""Model and data configuration: frozen dataclasses with one tuple entry per stage."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import reprlib
from dataclasses import dataclass, field
from typing import Any

QKV_METHODS = ("dw_bn", "avg", "linear")
ACTIVATIONS = ("quick_gelu", "gelu")
GLOBAL_POOLS = (None, "token", "avg", "")
# `CvTConfig` fields that do not change which weights fit or what the model computes in eval mode
TRAINING_FIELDS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "num_classes")

# Fields that hold one value per stage; a scalar given for one of them is repeated for every stage.
_PER_STAGE = (
    "dims",
    "depths",
    "heads",
    "mlp_ratio",
    "embed_kernel",
    "embed_stride",
    "embed_padding",
    "qkv_method",
    "qkv_kernel",
    "stride_q",
    "stride_kv",
    "cls_token",
    "pos_embed",
    "drop_path_rate",
)
MAX_STAGES = 16
MAX_INPUT_SIZE = 8192  # pixels per side of an evaluation input; a larger one in a file is a mistake or an attack
# The integers a sane architecture holds, (smallest, largest) per entry: far beyond every released model (CvT-W24:
# width 1024, 20 blocks, kernel 7) and beyond what any real one needs, so that a mistyped or hostile file is refused
# by its numbers before anything is allocated. What these bounds still allow is capped by the parameter count
# (`cvt.shapes.check_size`).
INT_RANGES = {
    "dims": (1, 65536),
    "depths": (1, 1024),
    "heads": (1, 65536),
    "embed_kernel": (1, 64),
    "embed_stride": (1, 64),
    "embed_padding": (0, 63),
    "qkv_kernel": (1, 64),
    "stride_q": (1, 64),
    "stride_kv": (1, 64),
    "pos_embed_size": (1, 65536),
    "in_chans": (1, 4096),
    "num_classes": (0, 1 << 24),
}
# The real-valued fields, (low, high, whether high is allowed); low is never allowed except for the rates (0)
FLOAT_RANGES = {
    "mlp_ratio": (0.0, 64.0, True),
    "drop_path_rate": (0.0, 1.0, False),
    "drop_rate": (0.0, 1.0, False),
    "attn_drop_rate": (0.0, 1.0, False),
    "norm_eps": (0.0, 1.0, False),
}
_RATES = ("drop_path_rate", "drop_rate", "attn_drop_rate")
_TUPLE_FIELDS = (*_PER_STAGE, "pos_embed_size")


@dataclass(frozen=True)
class CvTConfig:
    """Architecture of a CvT model. Defaults are CvT-13 as the authors released it.

    Per-stage fields are tuples with one entry per stage; a scalar is broadcast to every stage, so
    `CvTConfig(qkv_method="linear")` switches all stages at once. Every value is checked on construction (type,
    `INT_RANGES`, `FLOAT_RANGES`, widths divisible by the heads): a `ConfigError` names the field and the value.

    Attributes:
        dims: embedding width per stage.
        depths: number of transformer blocks per stage.
        heads: attention heads per stage.
        mlp_ratio: hidden width of the MLP as a multiple of the stage width.
        embed_kernel: kernel of the convolutional token embedding per stage.
        embed_stride: stride of the token embedding per stage.
        embed_padding: padding of the token embedding per stage (0 with kernel == stride gives ViT-style patches).
        qkv_method: "dw_bn" (depth-wise conv + BatchNorm), "avg" (average pooling of k/v) or "linear" (none).
        qkv_kernel: kernel of the convolutional projection per stage.
        stride_q: stride of the q projection per stage.
        stride_kv: stride of the k and v projections per stage.
        qkv_bias: bias on the point-wise q/k/v linear layers.
        cls_token: which stages carry a class token (the official models: only the last).
        pos_embed: which stages add a learned position embedding after the token embedding.
        pos_embed_size: input size the position embeddings are laid out for; resampled for other sizes.
        drop_path_rate: stochastic-depth rate per stage, ramped linearly from 0 inside each stage.
        drop_rate: dropout after the embedding, in the MLP and after the attention output.
        attn_drop_rate: dropout on the attention weights.
        act: MLP activation, "quick_gelu" (official) or "gelu" (what the Hugging Face port computes).
        norm_eps: LayerNorm epsilon.
        in_chans: input channels.
        num_classes: classifier outputs; 0 for no head.
        global_pool: what the head reads: "token" (the class token) or "avg" (the mean of the spatial tokens),
            or "" for no pooling (timm's: the head applies to every token); None for the official choice, "token"
            with a class token in the last stage, else "avg".
    """

    dims: tuple[int, ...] = (64, 192, 384)
    depths: tuple[int, ...] = (1, 2, 10)
    heads: tuple[int, ...] = (1, 3, 6)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    embed_kernel: tuple[int, ...] = (7, 3, 3)
    embed_stride: tuple[int, ...] = (4, 2, 2)
    embed_padding: tuple[int, ...] = (2, 1, 1)
    qkv_method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    qkv_kernel: tuple[int, ...] = (3, 3, 3)
    stride_q: tuple[int, ...] = (1, 1, 1)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    qkv_bias: bool = True
    cls_token: tuple[bool, ...] = (False, False, True)
    pos_embed: tuple[bool, ...] = (False, False, False)
    pos_embed_size: tuple[int, int] = (224, 224)
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str | None = None

    def __post_init__(self) -> None:
        num_stages = _num_stages(self)
        for name in _PER_STAGE:
            value = getattr(self, name)
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_stages
            if len(value) != num_stages:
                raise ConfigError(name, f" has {len(value)} entries but the model has {num_stages} stages")
            object.__setattr__(self, name, value)
        size = self.pos_embed_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if len(size) != 2:
            raise ConfigError("pos_embed_size", f" has {len(size)} entries: it is (height, width)")
        object.__setattr__(self, "pos_embed_size", size)
        _check_types_and_ranges(self)
        for method in self.qkv_method:
            if method not in QKV_METHODS:
                raise ConfigError("qkv_method", f" {method!r} is not one of {QKV_METHODS}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError("global_pool", f" {self.global_pool!r} is not one of {GLOBAL_POOLS}")
        if self.global_pool == "token" and not self.cls_token[-1]:
            raise ConfigError("global_pool", "='token' needs a class token in the last stage (cls_token)")
        if self.act not in ACTIVATIONS:
            raise ConfigError("act", f" {self.act!r} is not one of {ACTIVATIONS}")
        for i, (dim, heads) in enumerate(zip(self.dims, self.heads, strict=True)):
            if dim % heads:
                raise _bad("heads", heads, f"stage {i}'s width {dim} is not divisible by {heads} heads", i)
            if int(dim * self.mlp_ratio[i]) < 1:
                raise _bad("mlp_ratio", self.mlp_ratio[i], f"gives stage {i} (width {dim}) an MLP of no units", i)
            if self.embed_padding[i] >= self.embed_kernel[i]:
                reason = f"stage {i}'s token embedding pads at least its kernel ({self.embed_kernel[i]})"
                raise _bad("embed_padding", self.embed_padding[i], reason, i)

    @property
    def num_stages(self) -> int:
        return len(self.dims)

    @property
    def pool(self) -> str:
        """The head's pooling: `global_pool`, or the official choice when it is None."""
        if self.global_pool is not None:
            return self.global_pool
        return "token" if self.cls_token[-1] else "avg"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CvTConfig:
        """Build from `to_dict` output; unknown keys are an error naming them and the valid ones."""
        reject_unknown_fields(cls, data, "CvTConfig")
        return cls(**data)


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model at evaluation time.

    Attributes:
        input_size: (height, width) the model is evaluated at.
        crop_mode: "center" (resize the shorter side to size / crop_pct, then centre crop) or
            "squash" (resize the whole image to the input size, no crop).
        crop_pct: fraction of the resized image kept by the centre crop.
        interpolation: resampling filter name ("bicubic", "bilinear").
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation for normalisation.
    """

    input_size: tuple[int, int] = (224, 224)
    crop_mode: str = "center"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        bad = functools.partial(_bad, owner="DataConfig")
        size = self.input_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if len(size) != 2 or not all(_is_int(v) and 1 <= v <= MAX_INPUT_SIZE for v in size):
            raise bad("input_size", size, f"must be (height, width), ints from 1 to {MAX_INPUT_SIZE}")
        object.__setattr__(self, "input_size", tuple(map(int, size)))
        for name in ("mean", "std"):
            value = getattr(self, name)
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if not 1 <= len(value) <= INT_RANGES["in_chans"][1] or not all(map(_is_number, value)):
                raise bad(name, value, "must be one number per input channel")
            object.__setattr__(self, name, tuple(map(float, value)))
        if not all(v > 0 for v in self.std):
            raise bad("std", self.std, "must be > 0 (it divides)")
        if not _is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise bad("crop_pct", self.crop_pct, "must be a number in (0, 1]")
        if not isinstance(self.interpolation, str):
            raise bad("interpolation", self.interpolation, "must be a name such as 'bicubic'")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"DataConfig.crop_mode {self.crop_mode!r} is not 'center' or 'squash'")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        reject_unknown_fields(cls, data, "DataConfig")
        return cls(**data)


class ConfigError(ValueError):
    """A `CvTConfig` or `DataConfig` field whose value has the wrong type, length or range.

    Attributes:
        field: the field's name, so that a reader of a file can name the file's own key instead.
        detail: the rest of the message (an index, the value and what is wrong).
        owner: "CvTConfig" or "DataConfig".
    """

    def __init__(self, field: str, detail: str, owner: str = "CvTConfig") -> None:
        super().__init__(f"{owner}.{field}{detail}")
        self.field = field
        self.detail = detail
        self.owner = owner


def _bad(name: str, value: Any, reason: str, index: int | None = None, owner: str = "CvTConfig") -> ConfigError:
    return ConfigError(name, f"{'' if index is None else f'[{index}]'} = {reprlib.repr(value)}: {reason}", owner)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _num_stages(cfg: CvTConfig) -> int:
    """The number of stages: the length of the first per-stage field given as a tuple."""
    for name in ("dims", "depths", "heads"):
        value = getattr(cfg, name)
        if isinstance(value, (tuple, list)):
            if not 1 <= len(value) <= MAX_STAGES:
                raise ConfigError(name, f" has {len(value)} entries: a model has 1 to {MAX_STAGES} stages")
            return len(value)
    raise _bad("dims", cfg.dims, "must be a tuple with one width per stage")


def _entries(cfg: CvTConfig, name: str) -> list[tuple[int | None, Any]]:
    """(index, value) of each entry of a field: one per stage (or per side), or (None, value) for a scalar field."""
    value = getattr(cfg, name)
    return list(enumerate(value)) if name in _TUPLE_FIELDS else [(None, value)]


def _check_types_and_ranges(cfg: CvTConfig) -> None:
    """Every number of `cfg` against its type and range (`INT_RANGES`, `FLOAT_RANGES`), every flag a bool, every
    name a string. An int must be an int: a string, bool or float is refused, not converted."""
    for name, (low, high) in INT_RANGES.items():
        for i, value in _entries(cfg, name):
            if not _is_int(value):
                raise _bad(name, value, f"must be an int from {low} to {high}", i)
            if not low <= value <= high:
                raise _bad(name, value, f"is out of range: must be from {low} to {high}", i)
        _normalise(cfg, name, int)
    for name, (low, high, high_ok) in FLOAT_RANGES.items():
        low_ok = name in _RATES
        interval = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        for i, value in _entries(cfg, name):
            if not _is_number(value):
                raise _bad(name, value, f"must be a number in {interval}", i)
            if not ((value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)):
                raise _bad(name, value, f"is out of range: must be in {interval}", i)
        _normalise(cfg, name, float)
    for name in ("cls_token", "pos_embed", "qkv_bias"):
        for i, value in _entries(cfg, name):
            if not isinstance(value, bool):
                raise _bad(name, value, "must be true or false", i)
    for name in ("qkv_method", "act", "global_pool"):
        for i, value in _entries(cfg, name):
            if not isinstance(value, str) and not (name == "global_pool" and value is None):
                raise _bad(name, value, "must be a string", i)


def _normalise(cfg: CvTConfig, name: str, kind: type) -> None:
    """Store a checked numeric field as plain Python `kind` (numpy ints, or a 4 for a ratio, become int/float)."""
    values = tuple(kind(value) for _, value in _entries(cfg, name))
    object.__setattr__(cfg, name, values if name in _TUPLE_FIELDS else values[0])


def reject_unknown_fields(cls: type, data: dict[str, Any], what: str) -> None:
    """Raise a ValueError naming any key of `data` that is not a field of dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(names)}")


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a released set of weights lives and how it expects its input.

    Attributes:
        hf_hub_id: Hugging Face hub repository holding the weights (CvtForImageClassification layout).
        official_file: file name of the authors' release.
        data: evaluation data config of these weights.
        top1: ImageNet-1k top-1 the paper reports for these weights.
        license: licence of the weights (the authors' repository's, MIT).
    """

    hf_hub_id: str
    official_file: str
    data: DataConfig = field(default_factory=DataConfig)
    top1: float | None = None
    license: str | None = "mit"
