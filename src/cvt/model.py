"""CvT: Convolutional vision Transformer (Wu et al., ICCV 2021), as the authors' code computes it.

Read top to bottom: activation and norm -> token embedding -> convolutional projection -> attention -> MLP ->
block -> stage -> model. Module and parameter names follow the authors' code (`patch_embed.proj`,
`attn.conv_proj_q.conv`, `attn.proj_q`, `mlp.fc1`, `norm1`, ...) so their checkpoints map onto ours with one
rename: `stage{i}.` -> `stages.{i}.`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CvTConfig
from .identity import ModelIdentity
from .shapes import check_size, conv_out_size, stage_grid
from .timm_interface import TimmInterface, run_stages


class _QuickGELUFunction(torch.autograd.Function):
    """x * sigmoid(1.702 x) keeping one tensor for the backward pass instead of two, with a one-kernel backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        z = x * 1.702
        ctx.save_for_backward(z)
        return torch.sigmoid(z).mul_(x)  # the same numbers as x * sigmoid(1.702 x), one buffer fewer

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        # x sigmoid(a x) = silu(a x) / a, so its derivative in x is silu'(a x)
        return torch.ops.aten.silu_backward(grad, z)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the released CvT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFunction.apply(x)
        return (x * 1.702).sigmoid_().mul_(x)  # x * sigmoid(1.702 x) in one buffer instead of three


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype, as in the authors' code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type in ("cpu", "cuda"):
            # these kernels take float32 parameters with a half-precision input and compute in float32:
            # the same numbers without the two casting copies
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ConvEmbed(nn.Module):
    """Convolutional token embedding: overlapping strided conv, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        # channels-last in, channels-last out: the tokens below are then a view, not a transposing copy
        # (a no-op for stages 2-3, whose input maps already are; about 1.5x faster for stage 1 in training)
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        return self.norm(x), (h, w)


class ConvProjection(nn.Module):
    """Spatial part of one of q/k/v: depth-wise conv + BatchNorm ("dw_bn") or average pooling ("avg").

    The point-wise part is the attention's `proj_q/k/v` linear layer.
    """

    def __init__(self, dim: int, kernel: int, stride: int, method: str) -> None:
        super().__init__()
        padding = kernel // 2  # official: padding 1 with kernel 3
        if method == "dw_bn":
            self.conv = nn.Conv2d(dim, dim, kernel, stride, padding, groups=dim, bias=False)
            self.bn = nn.BatchNorm2d(dim)
        elif method == "avg":
            self.avg = nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)
        else:
            raise ValueError(f"no convolutional projection for method {method!r}")
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)) if self.method == "dw_bn" else self.avg(x)
        return x.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'W', C)


def conv_projector(
    x: torch.Tensor, hw: tuple[int, int], num_prefix_tokens: int
) -> Callable[[nn.Module | None], torch.Tensor]:
    """`project(conv)` for tokens x (B, prefix + HW, C): the class tokens followed by `conv` applied to the map of
    the others (the others unchanged for None). The map is made once and shared by q, k and v."""
    prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    if num_prefix_tokens:
        tokens = tokens.contiguous()  # one copy here, not one inside each of the three convolutions
    # (B, HW, C) -> (B, H, W, C) -> (B, C, H, W): a channels-last view. Built this way, not by transposing first,
    # its strides say channels-last even for a batch of 1 (where transpose + unflatten leaves an odd batch stride,
    # and the convolution then runs channels-first with two conversions: 8x slower)
    fmap = tokens.unflatten(1, hw).permute(0, 3, 1, 2)

    def project(conv: nn.Module | None) -> torch.Tensor:
        out = tokens if conv is None else conv(fmap)
        return torch.cat((prefix, out), dim=1) if num_prefix_tokens else out

    return project


class Attention(nn.Module):
    """Multi-head attention over convolutionally projected q, k, v.

    Class tokens (if any) sit in front of the spatial tokens and skip the convolutional projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        method: str = "dw_bn",
        kernel: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = dim**-0.5  # official: full stage width, not head_dim
        self.attn_drop = attn_drop
        # official "avg" pools k and v only; q passes through unchanged
        self.conv_proj_q = ConvProjection(dim, kernel, stride_q, method) if method == "dw_bn" else None
        self.conv_proj_k = ConvProjection(dim, kernel, stride_kv, method) if method != "linear" else None
        self.conv_proj_v = ConvProjection(dim, kernel, stride_kv, method) if method != "linear" else None
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(
        self, x: torch.Tensor, hw: tuple[int, int], prefix_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project tokens (B, N, C) to q, k, v, each (B, heads, N_q or N_kv, head_dim).

        With `prefix_only` the queries are those of the class tokens alone (which skip the convolution).
        """
        if self.conv_proj_k is None:  # "linear": position-wise projections only (crashes in the official code)
            q = k = v = x
        else:
            project = conv_projector(x, hw, self.num_prefix_tokens)
            q = x if prefix_only else project(self.conv_proj_q)
            k, v = project(self.conv_proj_k), project(self.conv_proj_v)
        if prefix_only:
            q = q[:, : self.num_prefix_tokens]  # class tokens skip the convolution: their rows of x in every method

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, heads, N, head_dim)

        return heads(self.proj_q(q)), heads(self.proj_k(k)), heads(self.proj_v(v))

    def forward(self, x: torch.Tensor, hw: tuple[int, int], prefix_only: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C), or (B, prefix, C): the class tokens' rows alone with `prefix_only`."""
        q, k, v = self._qkv(x, hw, prefix_only)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        x = x.transpose(1, 2).flatten(2)  # (B, heads, N, head_dim) -> (B, N, C)
        return self.proj_drop(self.proj(x))

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Softmax attention weights (B, heads, N_q, N_kv) for input tokens x (already normalised by norm1)."""
        q, k, _ = self._qkv(x, hw)
        return torch.softmax((q.float() @ k.float().transpose(-2, -1)) * self.scale, dim=-1)


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, act: str, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with convolutional projection attention."""

    def __init__(self, cfg: CvTConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        dim = cfg.dims[stage]
        self.norm1 = LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(
            dim,
            cfg.heads[stage],
            method=cfg.qkv_method[stage],
            kernel=cfg.qkv_kernel[stage],
            stride_q=cfg.stride_q[stage],
            stride_kv=cfg.stride_kv[stage],
            qkv_bias=cfg.qkv_bias,
            attn_drop=cfg.attn_drop_rate,
            proj_drop=cfg.drop_rate,
            num_prefix_tokens=int(cfg.cls_token[stage]),
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio[stage]), cfg.act, cfg.drop_rate)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], prefix_only: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C); with `prefix_only`, the class tokens' outputs (B, prefix, C) alone."""
        attn = self.attn(self.norm1(x), hw, prefix_only)
        if prefix_only:
            x = x[:, : self.attn.num_prefix_tokens]
        x = x + self.drop_path(attn)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Token embedding, optional class token and position embedding, then `depth` blocks."""

    def __init__(self, cfg: CvTConfig, stage: int, in_chans: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        dim = cfg.dims[stage]
        kernel, stride, padding = cfg.embed_kernel[stage], cfg.embed_stride[stage], cfg.embed_padding[stage]
        self.patch_embed = ConvEmbed(in_chans, dim, kernel, stride, padding, cfg.norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token[stage] else None
        self.pos_embed = None
        if cfg.pos_embed[stage]:
            self.pos_grid = stage_grid(cfg, stage, cfg.pos_embed_size)
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg, stage, rate) for rate in drop_path)
        self.grad_checkpointing = False

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def _resized_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(hw) == self.pos_grid:
            return self.pos_embed
        grid = self.pos_embed.transpose(1, 2).unflatten(2, self.pos_grid)  # (1, HW, C) -> (1, C, H, W)
        grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)  # (1, C, H', W') -> (1, H'W', C)

    def forward(self, x: torch.Tensor, prefix_only: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map (B, C_in, H_in, W_in) -> tokens (B, prefix + HW, C) with the class token first, and (H, W).

        With `prefix_only` the last block computes the class tokens' rows alone: (B, prefix, C).
        """
        x, hw = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self._resized_pos_embed(hw)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows_only = prefix_only and i == last and self.cls_token is not None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, hw, rows_only, use_reentrant=False)
            else:
                x = block(x, hw, rows_only)
        return x, hw

    def to_map(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Drop the class token and fold tokens back into a map: (B, prefix + HW, C) -> (B, C, H, W)."""
        return x[:, self.num_prefix_tokens :].unflatten(1, hw).permute(0, 3, 1, 2)  # channels-last view


def _init_weights(module: nn.Module) -> None:
    # official "trunc_norm" init; convolutions keep PyTorch's default
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CvT(TimmInterface, nn.Module):
    """Convolutional vision Transformer.

    timm's model interface (`group_matcher`, `forward_intermediates`, `prune_intermediate_layers`,
    `pretrained_cfg` as timm's dict) comes from `cvt.timm_interface.TimmInterface`.

    Besides its architecture the model carries its metadata, declared here with defaults so that a plain
    `CvT(cfg)` works everywhere; `cvt.create_model`/`cvt.load_model` and a training run set them, and
    `model_metadata` turns them into what every file written from the model records.

    Args:
        cfg: architecture; see `CvTConfig`.

    Attributes:
        cfg: the architecture.
        identity: who the model is (`cvt.identity.ModelIdentity`, decided by `cvt.variants.identify`): its name,
            the released weights it still is, its evaluation preprocessing and class names; `model_name`,
            `pretrained_entry`, `data_config`, `class_names` and timm's `pretrained_cfg` read it.
    """

    def __init__(self, cfg: CvTConfig) -> None:
        super().__init__()
        check_size(cfg)  # an absurd architecture is refused before any tensor is made (CVT_MAX_PARAMS)
        self.cfg = cfg
        self.identity = ModelIdentity()
        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = cfg.dims[-1]  # timm's names: no pre-logits layer here
        stages, in_chans, reduction = [], cfg.in_chans, 1
        self.feature_info: list[dict[str, Any]] = []
        for i in range(cfg.num_stages):
            # drop-path ramp restarts inside each stage (official), not one schedule over the whole network
            rates = torch.linspace(0, cfg.drop_path_rate[i], cfg.depths[i], device="cpu").tolist()
            stages.append(Stage(cfg, i, in_chans, rates))
            in_chans, reduction = cfg.dims[i], reduction * cfg.embed_stride[i]
            self.feature_info.append({"num_chs": cfg.dims[i], "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.ModuleList(stages)
        self.norm = LayerNorm(cfg.dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        self.stages.apply(_init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)
            if stage.pos_embed is not None:
                nn.init.trunc_normal_(stage.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)  # official: the head bias keeps its default init

    def unused_in_forward(self) -> list[str]:
        """Parameters `forward` never uses: with a head reading the class token, the last block computes the class
        token's query alone, which skips the convolution, so that block's q convolution and BatchNorm drop out
        (distributed training must be told: DDP's `find_unused_parameters`)."""
        last = self.stages[-1]
        token_head = last.cls_token is not None and self.cfg.pool == "token"
        conv = last.blocks[-1].attn.conv_proj_q if token_head and len(last.blocks) else None
        if conv is None:
            return []
        prefix = f"stages.{len(self.stages) - 1}.blocks.{len(last.blocks) - 1}.attn.conv_proj_q."
        return [prefix + name for name, _ in conv.named_parameters()]

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should not get weight decay (besides norms and biases)."""
        names = set()
        for i, stage in enumerate(self.stages):
            for attr in ("cls_token", "pos_embed"):
                if getattr(stage, attr) is not None:
                    names.add(f"stages.{i}.{attr}")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for `num_classes` outputs (0 for none), and its pooling
        if `global_pool` is given ("token", "avg" or "" for none, see `CvTConfig`). `cfg` follows, so what is saved
        from the model records the new head; the old class names are dropped, and with them any claim to released
        weights (the name loses its weights tag: "cvt_13.in1k" -> "cvt_13")."""
        self.num_classes = num_classes
        pool = {"global_pool": global_pool} if global_pool is not None else {}
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes, **pool)
        name = self.identity.name
        if self.identity.weights is not None and name is not None:
            name = name.partition(".")[0]
        self.identity = self.identity.replace(name=name, weights=None, class_names=None)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            self.head.to(self.norm.weight.device, self.norm.weight.dtype)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """timm's method, for the evaluation size the model records (`data_config.input_size`): a CvT runs at any
        size already (no fixed grid; position embeddings, when enabled, are resampled on the fly)."""
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.data_config = dataclasses.replace(self.data_config, input_size=size)

    def forward_features(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised last-stage tokens (B, prefix + HW, C), class token first.

        With `class_token_only` (and a class token in the last stage) the result is (B, 1, C): the last block
        computes the class token's query, attention row and MLP alone, since no other output row reaches it.
        """
        *_, (tokens, _) = run_stages(self.stages, x, prefix_only=class_token_only)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from `forward_features` -> logits (B, classes), or pooled features with `pre_logits`; with
        `global_pool=""` nothing is pooled (timm's): (B, prefix + HW, classes or C)."""
        # official: the class token if the last stage has one, else the mean of the tokens (`cfg.global_pool`
        # chooses); never squeezed, so a batch of 1 stays (1, classes) unlike the official head
        pool, prefix = self.cfg.pool, self.stages[-1].num_prefix_tokens
        if pool:
            x = x[:, 0] if pool == "token" else x[:, prefix:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a head reading the class token only lets the last block skip the other rows: the same logits for
        # ~8% less work in CvT-13 (training too; those rows' q convolution then gets no gradient at all); a model
        # without a class token computes every row (see `Stage.forward`)
        return self.forward_head(self.forward_features(x, class_token_only=self.cfg.pool == "token"))


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """What a file written from `model` (a `CvT` or `CvTFeatures`) records besides its weights, as JSON-ready data.

    The one source of the "model_name", "model_config", "data_config" and "class_names" entries that `save_model`,
    the training checkpoint and the exported files write.
    """
    names = model.class_names
    return {
        "model_name": model.model_name,
        "model_config": model.cfg.to_dict(),
        "data_config": model.data_config.to_dict(),
        "class_names": [str(n) for n in names] if names is not None else None,
    }


__all__ = [
    "CvT",
    "ConvEmbed",
    "ConvProjection",
    "Attention",
    "Mlp",
    "Block",
    "Stage",
    "QuickGELU",
    "LayerNorm",
    "DropPath",
    "conv_out_size",
    "conv_projector",
    "model_metadata",
    "stage_grid",
]
