"""Model and data configuration: frozen dataclasses with one tuple entry per stage."""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class CvTConfig:
    """Architecture of a CvT model. Defaults are CvT-13 as the authors released it.

    Per-stage fields are tuples with one entry per stage; a scalar is broadcast to every stage, so
    `CvTConfig(qkv_method="linear")` switches all stages at once.

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
        num_stages = len(self.dims) if isinstance(self.dims, (tuple, list)) else len(self.depths)
        for name in _PER_STAGE:
            value = getattr(self, name)
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * num_stages
            if len(value) != num_stages:
                raise ValueError(f"CvTConfig.{name} has {len(value)} entries but the model has {num_stages} stages")
            object.__setattr__(self, name, value)
        size = self.pos_embed_size
        object.__setattr__(self, "pos_embed_size", tuple(size) if isinstance(size, (tuple, list)) else (size, size))
        for method in self.qkv_method:
            if method not in QKV_METHODS:
                raise ValueError(f"CvTConfig.qkv_method {method!r} is not one of {QKV_METHODS}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"CvTConfig.global_pool {self.global_pool!r} is not one of {GLOBAL_POOLS}")
        if self.global_pool == "token" and not self.cls_token[-1]:
            raise ValueError("CvTConfig.global_pool='token' needs a class token in the last stage (cls_token)")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"CvTConfig.act {self.act!r} is not one of {ACTIVATIONS}")
        for i, (dim, heads) in enumerate(zip(self.dims, self.heads, strict=True)):
            if dim % heads:
                raise ValueError(f"stage {i}: width {dim} is not divisible by {heads} heads")

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
        size = self.input_size
        object.__setattr__(self, "input_size", tuple(size) if isinstance(size, (tuple, list)) else (size, size))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"DataConfig.crop_mode {self.crop_mode!r} is not 'center' or 'squash'")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        reject_unknown_fields(cls, data, "DataConfig")
        return cls(**data)


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
