"""The paper's optimisation recipe: weight-decay groups (and layer-wise learning-rate decay for fine-tuning),
AdamW/SGD, and the warm-up + cosine learning-rate schedule.

The schedule reproduces what the authors' code gets from timm's `CosineLRScheduler` (t_in_epochs=True,
warmup not a prefix): during the first `warmup_epochs` the rate climbs linearly from `warmup_lr`; afterwards it is
`min_lr + (base_lr - min_lr) * (1 + cos(pi * t / epochs)) / 2`, with t counted from the start of training, so the
cosine is already slightly past its top when warm-up ends. In "epoch" mode (the paper's) t is the epoch index and the
rate changes once per epoch; in "step" mode t = epoch + step / steps_per_epoch and the rate changes every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..timm_interface import layer_ids

SCHEDULE_UNITS = ("epoch", "step")


def scaled_lr(lr_per_256: float, global_batch: int, base_batch: int = 256) -> float:
    """Linear scaling rule: the learning rate for `global_batch` given the rate per `base_batch` images.

    The paper's 2.5e-4 per 256 images gives 2e-3 at a global batch of 2048.
    """
    return lr_per_256 * global_batch / base_batch


def param_groups(
    model: nn.Module, weight_decay: float, skip: Iterable[str] | None = None, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and non-decayed groups, per layer with `layer_decay`.

    No decay for every parameter with at most one dimension (LayerNorm/BatchNorm weights and biases, every bias)
    and for the names the model lists in `no_weight_decay()` (the class token); convolution and linear weights,
    depth-wise ones included, are decayed, as in the authors' code.

    Layer-wise learning-rate decay (timm's `param_groups_layer_decay`, after BEiT): the model's
    `group_matcher(coarse=False)` numbers its layers 0 (the stem) to L (the head; see `cvt.timm_interface`), and
    the parameters of layer i get `lr_scale = layer_decay ** (L - i)`, which the schedule multiplies into their
    learning rate: the head trains at the full rate, each layer below it at `layer_decay` times the one above.

    Args:
        model: the model (unwrapped: parameter names must be the model's own).
        weight_decay: decay of the decayed groups.
        skip: extra parameter names without decay; defaults to `model.no_weight_decay()` when the model has it.
        layer_decay: per-layer learning-rate factor (e.g. 0.75), or None for one rate everywhere.

    Returns:
        Param-group dicts, decayed first (per layer, from the stem, with layer decay); each carries the parameter
        names under "names", and with layer decay its "lr_scale".
    """
    if skip is None:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip = set(skip)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    layers: dict[str, int] = {}
    if layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise ValueError(f"layer_decay needs a model with group_matcher(); {type(model).__name__} has none")
        layers = layer_ids((name for name, _ in model.named_parameters()), model.group_matcher(coarse=False))
    last = max(layers.values(), default=0)
    def new_group(layer: int, no_decay: bool) -> dict[str, Any]:
        group: dict[str, Any] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay}
        if layer_decay is not None:
            group["lr_scale"] = layer_decay ** (last - layer)
        return group

    # without layer decay: always the two groups, decayed first, even when one is empty
    groups = {} if layer_decay is not None else {(0, False): new_group(0, False), (0, True): new_group(0, True)}
    for name, param in named:
        no_decay = param.ndim <= 1 or name in skip
        layer = layers.get(name, last)
        group = groups.get((layer, no_decay))
        if group is None:
            group = groups[layer, no_decay] = new_group(layer, no_decay)
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def create_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = False,
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (pre-training) or SGD with Nesterov-free momentum (the paper's fine-tuning), over `param_groups`.

    Args:
        model: the unwrapped model.
        name: "adamw" or "sgd".
        lr: peak learning rate (the schedule overwrites the groups' rate every epoch or step).
        weight_decay: decay of the decayed group.
        momentum: SGD momentum.
        betas: AdamW betas (PyTorch defaults, as the authors' code).
        eps: AdamW epsilon.
        fused: AdamW's fused kernel (CPU and CUDA; the same update, 4x faster than the per-tensor loop for
            CvT-13 on CPU). Not for FSDP's sharded parameters.
        layer_decay: layer-wise learning-rate decay (see `param_groups`), None for none.
    """
    groups = param_groups(model, weight_decay, layer_decay=layer_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


def cosine_lr(
    t: float, *, base_lr: float, epochs: float, warmup_epochs: float = 5, warmup_lr: float = 1e-6, min_lr: float = 1e-5
) -> float:
    """Learning rate at training time `t` (in epochs, fractional in step mode); see the module docstring."""
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


class WarmupCosineSchedule:
    """Sets the optimiser's learning rate from `cosine_lr`, per epoch or per step.

    Call `step(epoch, step_in_epoch)` before every optimiser step; the rate is a pure function of the position,
    so resuming needs nothing but the position (the state dict only records the settings, for checking).

    Args:
        optimizer: the optimiser whose groups get the rate.
        base_lr: peak rate.
        epochs: length of the cosine (the run's epochs).
        steps_per_epoch: optimiser steps per epoch (used in "step" mode).
        warmup_epochs: linear warm-up length.
        warmup_lr: rate at the start of warm-up.
        min_lr: floor of the cosine.
        unit: "epoch" (the paper) or "step".
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 5,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        unit: str = "epoch",
    ) -> None:
        if unit not in SCHEDULE_UNITS:
            raise ValueError(f"unknown schedule unit {unit!r}; known: {', '.join(SCHEDULE_UNITS)}")
        self.optimizer = optimizer
        self.base_lr, self.epochs, self.steps_per_epoch = base_lr, epochs, steps_per_epoch
        self.warmup_epochs, self.warmup_lr, self.min_lr, self.unit = warmup_epochs, warmup_lr, min_lr, unit
        self.last_lr = self.lr_at(0, 0)

    def lr_at(self, epoch: int, step_in_epoch: int = 0) -> float:
        """The rate for optimiser step `step_in_epoch` of `epoch` (both from 0)."""
        t = float(epoch)
        if self.unit == "step":
            t += step_in_epoch / self.steps_per_epoch
        return cosine_lr(
            t,
            base_lr=self.base_lr,
            epochs=self.epochs,
            warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr,
            min_lr=self.min_lr,
        )

    def step(self, epoch: int, step_in_epoch: int = 0) -> float:
        """Write the rate for this position into every param group (times its `lr_scale`, if any); returns it."""
        self.last_lr = self.lr_at(epoch, step_in_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr * group.get("lr_scale", 1.0)
        return self.last_lr

    def state_dict(self) -> dict[str, Any]:
        keys = ("base_lr", "epochs", "steps_per_epoch", "warmup_epochs", "warmup_lr", "min_lr", "unit", "last_lr")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_lr = state.get("last_lr", self.last_lr)
