"""Parameter and multiply-accumulate counts, counted the way the spec's table was."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .config import CvTConfig
from .eval_mode import eval_mode
from .model import CvT


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: tuple[int, int] = (224, 224), in_chans: int = 3) -> int:
    """Multiply-accumulates for one image: convolutions, linear layers and both attention matmuls.

    Counted with torch's FlopCounterMode (FLOPs / 2) under the MATH attention backend, because the fused CPU
    attention kernel is not counted. Runs on whatever device the model is on; use the meta device for big models.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *input_size, device=device)
    with eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if isinstance(model, CvT):  # the whole network, as the paper counts it (`forward` skips some rows)
            model.forward_head(model.forward_features(x))
        else:
            model(x)
    return counter.get_total_flops() // 2


def model_cost(cfg: CvTConfig, input_size: tuple[int, int] = (224, 224)) -> tuple[int, int]:
    """(parameters, MACs per image) of an architecture, built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model = CvT(cfg)
    return count_params(model), count_macs(model, input_size, cfg.in_chans)
