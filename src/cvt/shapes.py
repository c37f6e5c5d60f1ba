"""What a `CvTConfig` implies, computed from its numbers alone (no module built, nothing allocated): the token grid
of each stage, the name and shape of every tensor in the model's state dict, the parameter count, and the size guard
that refuses an absurd configuration before `CvT` allocates it.

The state-dict table is the model's (`cvt.model`) written out as arithmetic; tests/test_hostile_configs.py compares
it with `CvT(cfg).state_dict()` over every projection method and option, and the count with the spec's figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

from .config import CvTConfig

MAX_PARAMS_ENV = "CVT_MAX_PARAMS"
# 3.6x CvT-W24 (277,196,392), the largest released model; 4 GB of float32 weights
DEFAULT_MAX_PARAMS = 1_000_000_000

Shapes = dict[str, tuple[int, ...]]


def conv_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """Output length of a convolution (or pooling window) along one axis; `ceil_mode` as `nn.AvgPool2d` has it."""
    if not ceil_mode:
        return (size + 2 * padding - kernel) // stride + 1
    out = -(-(size + 2 * padding - kernel) // stride) + 1  # rounded up ...
    return out - 1 if (out - 1) * stride >= size + padding else out  # ... but the last window starts in the input


def stage_grid(cfg: CvTConfig, stage: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """Token grid of `stage` for an input of `input_size` (H, W)."""
    h, w = input_size
    for i in range(stage + 1):
        k, s, p = cfg.embed_kernel[i], cfg.embed_stride[i], cfg.embed_padding[i]
        h, w = conv_out_size(h, k, s, p), conv_out_size(w, k, s, p)
    return h, w


def _linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (fan_out, fan_in), **({f"{name}.bias": (fan_out,)} if bias else {})}


def _norm(name: str, dim: int) -> Shapes:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _batch_norm(name: str, dim: int) -> Shapes:
    stats = {f"{name}.running_mean": (dim,), f"{name}.running_var": (dim,), f"{name}.num_batches_tracked": ()}
    return {**_norm(name, dim), **stats}


def block_shapes(cfg: CvTConfig, stage: int) -> Shapes:
    """The tensors of one block of `stage` (every block of a stage has the same), keys relative to the block."""
    dim, kernel, method = cfg.dims[stage], cfg.qkv_kernel[stage], cfg.qkv_method[stage]
    shapes = _norm("norm1", dim)
    if method == "dw_bn":  # "avg" pools k and v without parameters; "linear" has no spatial part
        for x in "qkv":
            shapes[f"attn.conv_proj_{x}.conv.weight"] = (dim, 1, kernel, kernel)  # depth-wise
            shapes.update(_batch_norm(f"attn.conv_proj_{x}.bn", dim))
    for x in "qkv":
        shapes.update(_linear(f"attn.proj_{x}", dim, dim, cfg.qkv_bias))
    shapes.update(_linear("attn.proj", dim, dim))
    hidden = int(dim * cfg.mlp_ratio[stage])
    return {**shapes, **_norm("norm2", dim), **_linear("mlp.fc1", dim, hidden), **_linear("mlp.fc2", hidden, dim)}


def stage_shapes(cfg: CvTConfig, stage: int) -> Shapes:
    """The tensors of `stage` outside its blocks (token embedding, class token, position embedding)."""
    dim, kernel = cfg.dims[stage], cfg.embed_kernel[stage]
    in_chans = cfg.in_chans if stage == 0 else cfg.dims[stage - 1]
    shapes = {"patch_embed.proj.weight": (dim, in_chans, kernel, kernel), "patch_embed.proj.bias": (dim,)}
    shapes.update(_norm("patch_embed.norm", dim))
    if cfg.cls_token[stage]:
        shapes["cls_token"] = (1, 1, dim)
    if cfg.pos_embed[stage]:
        h, w = stage_grid(cfg, stage, cfg.pos_embed_size)
        shapes["pos_embed"] = (1, h * w, dim)
    return shapes


def head_shapes(cfg: CvTConfig) -> Shapes:
    """The final LayerNorm and the classifier (none with `num_classes` 0)."""
    head = _linear("head", cfg.dims[-1], cfg.num_classes) if cfg.num_classes else {}
    return {**_norm("norm", cfg.dims[-1]), **head}


def iter_state_dict_shapes(cfg: CvTConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of `CvT(cfg).state_dict()` (parameters and BatchNorm buffers), one at a time."""
    for i in range(cfg.num_stages):
        yield from ((f"stages.{i}.{k}", v) for k, v in stage_shapes(cfg, i).items())
        block = block_shapes(cfg, i)
        for j in range(cfg.depths[i]):
            yield from ((f"stages.{i}.blocks.{j}.{k}", v) for k, v in block.items())
    yield from head_shapes(cfg).items()


def state_dict_shapes(cfg: CvTConfig) -> Shapes:
    """Every key of `CvT(cfg).state_dict()` with its shape."""
    return dict(iter_state_dict_shapes(cfg))


def _numel(shapes: Shapes) -> int:
    """Trainable elements: BatchNorm's statistics are buffers, not parameters."""
    buffers = (".running_mean", ".running_var", ".num_batches_tracked")
    return sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(buffers))


def count_parameters(cfg: CvTConfig) -> int:
    """Trainable parameters of `CvT(cfg)` (BatchNorm statistics excluded), counted per stage: one block's tensors
    times the depth, so a config asking for a million blocks is counted as cheaply as one asking for ten."""
    total = _numel(head_shapes(cfg))
    for i in range(cfg.num_stages):
        total += _numel(stage_shapes(cfg, i)) + cfg.depths[i] * _numel(block_shapes(cfg, i))
    return total


def max_params() -> int:
    """The largest model `check_size` lets through: `CVT_MAX_PARAMS` when set, else `DEFAULT_MAX_PARAMS`."""
    text = os.environ.get(MAX_PARAMS_ENV)
    if text is None:
        return DEFAULT_MAX_PARAMS
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"{MAX_PARAMS_ENV}={text!r} is not a number of parameters (e.g. 2e9)") from None


def check_size(cfg: CvTConfig, limit: int | None = None) -> int:
    """Refuse an architecture too large to build, before anything is allocated.

    Args:
        cfg: the architecture.
        limit: the most parameters allowed; None for `max_params()` (`CVT_MAX_PARAMS`, default 1e9).

    Returns:
        The parameter count.

    Raises:
        ValueError: the model would have more than `limit` parameters, or a position embedding with no tokens.
    """
    for i in range(cfg.num_stages):
        if cfg.pos_embed[i] and min(stage_grid(cfg, i, cfg.pos_embed_size)) < 1:
            raise ValueError(
                f"CvTConfig.pos_embed_size = {cfg.pos_embed_size}: stage {i}'s token grid at that size is empty"
            )
    count = count_parameters(cfg)
    limit = max_params() if limit is None else limit
    if count > limit:
        raise ValueError(
            f"the architecture has {count:,} parameters ({count * 4 / 2**30:,.1f} GiB in float32; dims={cfg.dims}, "
            f"depths={cfg.depths}, mlp_ratio={cfg.mlp_ratio}), over the limit of {limit:,}; for a model this "
            f"large on purpose, raise the limit with the environment variable {MAX_PARAMS_ENV}=N"
        )
    return count
