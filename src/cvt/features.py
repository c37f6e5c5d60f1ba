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
from .timm_interface import PretrainedCfgMixin, run_stages, take_indices


def _normalise_indices(out_indices: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Resolve negative indices, an int n meaning the last n stages (`take_indices`); sorted, unique."""
    try:
        taken, _ = take_indices(num_stages, out_indices)
    except ValueError as err:
        raise ValueError(f"out_indices: {err}") from None
    return tuple(sorted(set(taken)))


class FeatureInfo:
    """What a backbone's maps are, as timm's `FeatureInfo`: one dict per stage kept (`num_chs`, `reduction`,
    `module`, `index`), and the selected ones (`out_indices`).

    The accessors answer for the selected stages by default (`channels()` -> [64, 192, 384]), for stage `idx`
    with an int, or for each stage of a list; `info[i]` and `len(info)` are over every stage kept.
    """

    def __init__(self, info: list[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [{**entry, "index": i} for i, entry in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """`key` of each selected stage (None), of stage `idx`, or of each stage in a list."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """The info dicts (only `keys`, if given) of the selected stages, of stage `idx`, or of a list of them."""

        def pick(i: int) -> dict[str, Any]:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        return [pick(i) for i in idx] if isinstance(idx, (tuple, list)) else pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels of the maps."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Strides of the maps relative to the input."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Names of the modules whose outputs the maps are."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class CvTFeatures(PretrainedCfgMixin, nn.Module):
    """The stages of a CvT returning their feature maps, with no final norm and no classifier.

    Args:
        model: the classifier to take the stages from (the modules are shared with it, not copied).
        out_indices: stages whose maps to return (0-based; negative counts from the end; an int n means the last
            n stages). Stages after the last selected one are dropped.

    Attributes:
        out_indices: the selected stages, sorted.
        feature_info: a `FeatureInfo` (timm's): `channels()`, `reduction()`, `module_name()`, `get_dicts()` of the
            selected stages; one dict per stage kept (`num_chs`, `reduction`, `module`, `index`).
        cfg: the architecture of the source model.
        identity: the source model's (see `CvT`), without class names, since a backbone has no classes.
    """

    def __init__(self, model: CvT, out_indices: int | Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.out_indices = _normalise_indices(out_indices, len(model.stages))
        self.stages = model.stages[: max(self.out_indices) + 1]
        self.feature_info = FeatureInfo(model.feature_info[: len(self.stages)], self.out_indices)
        self.identity = model.identity.replace(class_names=None)

    def channels(self) -> list[int]:
        """Channels of each returned map."""
        return self.feature_info.channels()

    def reduction(self) -> list[int]:
        """Stride of each returned map relative to the input."""
        return self.feature_info.reduction()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) -> the selected stage maps, each (B, C_i, H_i, W_i) with H_i ≈ H / reduction_i."""
        outputs = enumerate(zip(self.stages, run_stages(self.stages, x), strict=True))
        # (B, prefix + HW, C) -> (B, C, H, W); the class token is dropped
        return [stage.to_map(tokens, hw) for i, (stage, (tokens, hw)) in outputs if i in self.out_indices]


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


__all__ = ["CvTFeatures", "FeatureInfo", "filter_state_dict"]
