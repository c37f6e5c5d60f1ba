"""Inference-only rewrites of a CvT model: module swaps that keep its outputs.

`fold_batchnorm` folds each eval-mode BatchNorm of the convolutional projection into the depth-wise convolution
before it. Everything here is traceable (`torch.jit.trace`, `torch.onnx.export`): no Python control flow depends
on tensor values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .model import ConvProjection


@torch.no_grad()
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing `bn(conv(x))` with `bn` in eval mode (running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every "dw_bn" projection's BatchNorm into its depth-wise convolution (inference only).

    The convolution gains a bias and the BatchNorm becomes `nn.Identity`, so the model computes what it computed
    in eval mode, with the running statistics, one pass fewer over each feature map. The result is put in eval
    mode: a folded model cannot be trained as the original one would be.

    Args:
        model: a `CvT` or any module containing `ConvProjection`s.
        inplace: modify `model` itself instead of a deep copy.

    Returns:
        The folded model (in eval mode).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvProjection) and isinstance(getattr(module, "bn", None), nn.BatchNorm2d):
            module.conv = _fold_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


__all__ = ["fold_batchnorm"]
