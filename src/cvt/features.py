"""CvT as a multi-scale backbone: the stage feature maps for detection and segmentation heads.

`create_model(name, features_only=True, out_indices=(0, 1, 2))` returns a `CvTFeatures`. It keeps the stages up to
the last requested one under their original names (`stages.{i}.…`), so a classifier checkpoint loads into it once
the head keys (`norm.*`, `head.*`) and the unused later stages are dropped (`filter_state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .model import CvT


def _normalise_indices(out_indices: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Resolve negative indices, an int n meaning the last n stages; sorted, unique, range-checked."""
    if isinstance(out_indices, int):
        out_indices = range(num_stages - out_indices, num_stages)
    indices = []
    for i in out_indices:
        if not -num_stages <= i < num_stages:
            raise ValueError(f"out_indices {tuple(out_indices)} out of range for a model with {num_stages} stages")
        indices.append(i % num_stages)
    if not indices:
        raise ValueError("out_indices is empty: select at least one stage")
    return tuple(sorted(set(indices)))


class CvTFeatures(nn.Module):
    """The stages of a CvT returning their feature maps, with no final norm and no classifier.

    Args:
        model: the classifier to take the stages from (the modules are shared with it, not copied).
        out_indices: stages whose maps to return (0-based; negative counts from the end; an int n means the last
            n stages). Stages after the last selected one are dropped.

    Attributes:
        out_indices: the selected stages, sorted.
        feature_info: one dict per selected stage: `num_chs` (channels), `reduction` (stride relative to the
            input), `module` (its name) and `index`.
        cfg: the architecture of the source model.
        model_name, data_config, pretrained_cfg: the source model's (see `CvT`); `class_names` is None, since a
            backbone has no classes.
    """

    def __init__(self, model: CvT, out_indices: int | Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.out_indices = _normalise_indices(out_indices, len(model.stages))
        self.stages = model.stages[: max(self.out_indices) + 1]
        self.feature_info: list[dict[str, Any]] = [{**model.feature_info[i], "index": i} for i in self.out_indices]
        self.model_name, self.data_config = model.model_name, model.data_config
        self.pretrained_cfg = model.pretrained_cfg
        self.class_names: list[str] | None = None

    def channels(self) -> list[int]:
        """Channels of each returned map."""
        return [info["num_chs"] for info in self.feature_info]

    def reduction(self) -> list[int]:
        """Stride of each returned map relative to the input."""
        return [info["reduction"] for info in self.feature_info]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) -> the selected stage maps, each (B, C_i, H_i, W_i) with H_i ≈ H / reduction_i."""
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage.to_map(*stage(x))  # (B, prefix + HW, C) -> (B, C, H, W); the class token is dropped
            if i in self.out_indices:
                maps.append(x)
        return maps


def filter_state_dict(state_dict: dict[str, torch.Tensor], features: CvTFeatures) -> dict[str, torch.Tensor]:
    """Keep the entries of a full-model state dict (our key layout) that `features` holds.

    Drops `norm.*`, `head.*` and the stages after the last selected one; `features.load_state_dict(result)`
    is then strict.
    """
    num_kept = len(features.stages)
    kept = {}
    for key, value in state_dict.items():
        if key.startswith("stages."):
            stage = int(key.split(".", 2)[1])
            if stage < num_kept:
                kept[key] = value
    return kept


__all__ = ["CvTFeatures", "filter_state_dict"]
