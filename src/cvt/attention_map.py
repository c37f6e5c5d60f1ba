"""Where the class token looks: its attention in the last block of the last stage, per head, over the image.

The class token joins only in the last stage. In the last block its query attends to 1 + Hk * Wk keys: its own
key first, then the spatial keys, which come from the stride-2 depth-wise projection, so the key grid is
ceil(H/2) x ceil(W/2) of the stage's H x W token grid (7 x 7 at 224). `class_token_attention` returns those
weights as maps on the key grid; `plot_attention` upsamples them and overlays them on the input image.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .eval_mode import eval_mode
from .fileio import atomic_write
from .model import Attention, CvT, conv_out_size


@dataclasses.dataclass
class ClassTokenAttention:
    """The last block's attention from the class-token query.

    Attributes:
        maps: weights on the spatial keys, (B, heads, Hk, Wk).
        to_class_token: weight on the class token's own key, (B, heads); with `maps` it sums to one per head.
        logits: the model's output for the same images, (B, classes).
        token_grid: (H, W) of the last stage's tokens.
    """

    maps: torch.Tensor
    to_class_token: torch.Tensor
    logits: torch.Tensor
    token_grid: tuple[int, int]

    @property
    def key_grid(self) -> tuple[int, int]:
        """(Hk, Wk) of the spatial keys."""
        return tuple(self.maps.shape[-2:])

    @property
    def mean(self) -> torch.Tensor:
        """The maps averaged over heads, (B, Hk, Wk)."""
        return self.maps.mean(dim=1)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def key_grid(attn: Attention, hw: tuple[int, int]) -> tuple[int, int]:
    """Grid (Hk, Wk) of the spatial keys an `Attention` makes from an H x W token grid."""
    proj = attn.conv_proj_k
    if proj is None:  # "linear": keys are the tokens themselves
        return tuple(hw)
    layer = proj.conv if proj.method == "dw_bn" else proj.avg
    kernel, stride, padding = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
    ceil_mode = proj.method == "avg"  # AvgPool2d(ceil_mode=True) rounds up
    h, w = (
        conv_out_size(size, k, s, p, ceil_mode=ceil_mode)
        for size, k, s, p in zip(hw, kernel, stride, padding, strict=True)
    )
    return h, w


@torch.no_grad()
def class_token_attention(model: CvT, images: torch.Tensor) -> ClassTokenAttention:
    """Run `model` on `images` and return its class token's attention in the last block of the last stage.

    Args:
        model: a CvT classifier whose last stage has a class token (run in eval mode; its mode is restored).
        images: normalised images (B, C, H, W) on the model's device.

    Returns:
        The per-head maps on the key grid, the weight on the class token's own key, and the logits.
    """
    stage = model.stages[-1]
    if stage.cls_token is None:
        raise ValueError("the model's last stage has no class token, so there is no class-token attention to show")
    block = stage.blocks[-1]
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured["x"], captured["hw"] = args[0], tuple(args[1])  # the block's input tokens and token grid

    handle = block.register_forward_pre_hook(hook)
    try:
        with eval_mode(model):
            logits = model(images)
            weights = block.attn.attention_weights(block.norm1(captured["x"]), captured["hw"])
    finally:
        handle.remove()
    prefix = stage.num_prefix_tokens
    row = weights[:, :, 0]  # (B, heads, N_q, N_kv) -> (B, heads, N_kv): the class-token query (token 0)
    hk, wk = key_grid(block.attn, captured["hw"])
    if row.shape[-1] != prefix + hk * wk:
        raise RuntimeError(f"expected {prefix} + {hk}x{wk} keys, the attention has {row.shape[-1]}")
    maps = row[..., prefix:].unflatten(-1, (hk, wk))  # (B, heads, HkWk) -> (B, heads, Hk, Wk)
    return ClassTokenAttention(maps, row[..., 0], logits, captured["hw"])


def top_predictions(
    logits: torch.Tensor, class_names: Sequence[str] | None = None, k: int = 5
) -> list[tuple[str, float]]:
    """(label, softmax probability) of the `k` best classes of one image's logits (classes,), best first.

    Labels come from `class_names` when given, else they are the class indices.
    """
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(min(k, probs.numel()))
    return [
        (class_names[i] if class_names is not None else str(i), p)
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalisation of one image (3, H, W) for display: values in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0, 1)


def plot_attention(
    image: torch.Tensor,
    maps: torch.Tensor,
    path: str | os.PathLike,
    *,
    title: str = "",
    alpha: float = 0.55,
) -> Path:
    """Save a figure of the input and the attention maps (their mean, then each head) overlaid on it.

    Each map is upsampled bilinearly from the key grid to the image size and shown on its own colour scale, from
    its smallest to its largest weight (both given in the panel title).

    Args:
        image: the image the model saw, (3, H, W) with values in [0, 1].
        maps: one image's per-head maps (heads, Hk, Wk).
        path: the image file to write (format from its suffix, e.g. .png).
        title: figure title (e.g. the top predictions).
        alpha: opacity of the attention overlay.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: no global state, no GUI backend

    h, w = image.shape[-2:]
    maps = maps.detach().float().cpu()
    panels = [("mean of heads", maps.mean(dim=0))] + [(f"head {i}", m) for i, m in enumerate(maps)]
    upsampled = F.interpolate(
        torch.stack([m for _, m in panels])[:, None], size=(h, w), mode="bilinear", align_corners=False
    )[:, 0]
    picture = image.detach().float().cpu().permute(1, 2, 0).numpy()

    count = len(panels) + 1
    cols = min(count, 4 if count <= 8 else 6)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows + (0.6 if title else 0.0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    axes[0].imshow(picture)
    axes[0].set_title(f"input {h}x{w}", fontsize=9)
    for ax, (name, raw), heat in zip(axes[1:], panels, upsampled, strict=False):
        ax.imshow(picture)
        ax.imshow(heat.numpy(), cmap="inferno", alpha=alpha, vmin=float(raw.min()), vmax=float(raw.max()))
        ax.set_title(f"{name} ({float(raw.min()):.3g}-{float(raw.max()):.3g})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=100)
    return path


def attention_overlay(image: torch.Tensor, attention: torch.Tensor, *, alpha: float = 0.55) -> torch.Tensor:
    """One picture of a map over the image it came from, as `plot_attention` draws each panel, without the figure.

    Args:
        image: the image the model saw, (3, H, W) with values in [0, 1].
        attention: one map on the key grid, (Hk, Wk); upsampled bilinearly and coloured ("inferno") from its
            smallest to its largest weight.
        alpha: opacity of the map.

    Returns:
        The blend as 8-bit RGB, (H, W, 3) uint8, on the CPU.
    """
    from matplotlib import colormaps  # noqa: PLC0415

    h, w = image.shape[-2:]
    heat = attention.detach().float().cpu()[None, None]  # (Hk, Wk) -> (1, 1, Hk, Wk)
    heat = F.interpolate(heat, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colours = torch.from_numpy(colormaps["inferno"](heat.numpy())[..., :3]).float()  # (H, W, RGBA) -> (H, W, 3)
    picture = image.detach().float().cpu().permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return ((1 - alpha) * picture + alpha * colours).mul(255).round().clamp(0, 255).to(torch.uint8)


__all__ = [
    "ClassTokenAttention",
    "attention_overlay",
    "class_token_attention",
    "denormalize",
    "key_grid",
    "plot_attention",
    "top_predictions",
]
