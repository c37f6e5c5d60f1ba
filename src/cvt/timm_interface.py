"""timm's model interface, for `CvT`: parameter groups for layer-wise learning rates (`group_matcher`, `layer_ids`),
`forward_intermediates` with timm's options, `prune_intermediate_layers`, and `pretrained_cfg` as timm's dict.

Kept apart from cvt/model.py, which holds the architecture alone; `CvT` inherits `TimmInterface`'s methods (and a
backbone, `cvt.features.CvTFeatures`, the `pretrained_cfg` of `PretrainedCfgMixin`). The conventions are timm's, as
its models document them:

- `group_matcher(coarse)` returns a dict of regular expressions, in order: a parameter belongs to the first entry
  that matches it; the captured numbers (and a suffix) order the groups; a suffix of `MATCH_PREV_GROUP` puts a
  parameter in the group before it; unmatched parameters (the head) form the last group. `coarse=True` gives one
  group per stage, `coarse=False` one per block. As in timm's hierarchical models (ConvNeXt's downsampling), a
  stage's token embedding (and class token) shares the group of its first block; the first stage's embedding is
  the stem, a group of its own, and the final norm joins the last block.
- `layer_ids` numbers those groups 0, 1, ... in that order (timm's `group_parameters(..., reverse=True)`), which is
  what layer-wise learning-rate decay scales by (`cvt.train.optimizer.param_groups`).
- `indices` of `forward_intermediates` / `prune_intermediate_layers`: None for every stage, an int n for the last
  n, a sequence for those stages (negative counts from the end); out of range is an error (timm's
  `feature_take_indices`).
- `pretrained_cfg` (and its alias `default_cfg`) is a dict with timm's keys, describing this model as its
  `identity` says: its evaluation protocol, its head, and the released weights it still is (none once its head,
  activation or architecture departs from theirs: no hub id, file, tag or licence of theirs then).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import DataConfig, PretrainedCfg
from .identity import ModelIdentity

MATCH_PREV_GROUP = 99999  # a group suffix meaning "the same group as the one before"
OUTPUT_FORMATS = ("NCHW", "NLC")
PAPER = {
    "paper_ids": "arXiv:2103.15808",
    "paper_name": "CvT: Introducing Convolutions to Vision Transformers",
    "origin_url": "https://github.com/microsoft/CvT",
}


def take_indices(num_stages: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """(the absolute stage indices selected by `indices`, the largest), as timm's `feature_take_indices`."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the last n stages needs 1 <= n <= {num_stages}")
        taken = list(range(num_stages - indices, num_stages))
    else:
        taken = []
        for i in indices:
            if not -num_stages <= i < num_stages:
                raise ValueError(f"indices={tuple(indices)}: stage {i} is out of range for {num_stages} stages")
            taken.append(i % num_stages)
        if not taken:
            raise ValueError("indices is empty: select at least one stage")
    return taken, max(taken)


def run_stages(
    stages: Sequence[nn.Module], x: torch.Tensor, prefix_only: bool = False
) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """Images (B, C, H, W) through `stages` in order: yields each stage's tokens (B, prefix + HW, C) and grid (H, W);
    the next stage reads their map (`Stage.to_map`, class token dropped). With `prefix_only` the last stage
    computes its class tokens' rows alone, (B, prefix, C). The one stage loop of the model, its backbone and
    `forward_intermediates`."""
    last = len(stages) - 1
    for i, stage in enumerate(stages):
        tokens, hw = stage(x, prefix_only=prefix_only and i == last)
        yield tokens, hw
        if i < last:
            x = stage.to_map(tokens, hw)


def pretrained_cfg_dict(identity: ModelIdentity, num_classes: int) -> dict[str, Any]:
    """timm's pretrained_cfg dict for a model of this identity (see the module docstring)."""
    architecture, _, tag = (identity.name or "cvt_custom").partition(".")
    weights, data, names = identity.weights, identity.data, identity.class_names
    return {
        "architecture": architecture,
        "tag": (tag or None) if weights else None,
        "hf_hub_id": weights.hf_hub_id if weights else None,
        "file": weights.official_file if weights else None,
        "url": None,
        "input_size": (3, *data.input_size),
        "interpolation": data.interpolation,
        "crop_pct": data.crop_pct,
        "crop_mode": data.crop_mode,
        "mean": data.mean,
        "std": data.std,
        "num_classes": num_classes,
        "label_names": list(names) if names is not None else None,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head",
        "license": weights.license if weights else None,
        **PAPER,
    }


class PretrainedCfgMixin:
    """A model's identity (`cvt.identity.ModelIdentity`, in `identity`) and the attributes that read it:
    `model_name`, `data_config`, `class_names`, `pretrained_entry` (the released weights it still is), and
    `pretrained_cfg` / `default_cfg` as timm's dict. Assigning one of them replaces that part of `identity`;
    assigning `pretrained_cfg` a `PretrainedCfg` (or None) sets `pretrained_entry`."""

    # TorchScript compiles a module's properties and types its annotated attributes: it can type none of these
    # (before: `torch.jit.script(model)` failed on the annotation `PretrainedCfg | None`)
    __jit_unused_properties__ = [
        "model_name", "data_config", "class_names", "pretrained_entry", "pretrained_cfg", "default_cfg"
    ]  # fmt: skip
    __jit_ignored_attributes__ = ["identity"]
    identity = ModelIdentity()

    @property
    def model_name(self) -> str | None:
        return self.identity.name

    @model_name.setter
    def model_name(self, name: str | None) -> None:
        self.identity = self.identity.replace(name=name)

    @property
    def data_config(self) -> DataConfig:
        return self.identity.data

    @data_config.setter
    def data_config(self, data: DataConfig) -> None:
        self.identity = self.identity.replace(data=data)

    @property
    def class_names(self) -> list[str] | None:
        names = self.identity.class_names
        return list(names) if names is not None else None

    @class_names.setter
    def class_names(self, names: Sequence[str] | None) -> None:
        self.identity = self.identity.replace(class_names=names)

    @property
    def pretrained_entry(self) -> PretrainedCfg | None:
        return self.identity.weights

    @pretrained_entry.setter
    def pretrained_entry(self, weights: PretrainedCfg | None) -> None:
        self.identity = self.identity.replace(weights=weights)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return pretrained_cfg_dict(self.identity, getattr(self, "num_classes", 0))

    @pretrained_cfg.setter
    def pretrained_cfg(self, entry: PretrainedCfg | None) -> None:
        if entry is not None and not isinstance(entry, PretrainedCfg):
            raise TypeError(f"pretrained_cfg is derived from the model; set pretrained_entry, not {type(entry)}")
        self.pretrained_entry = entry

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg


def layer_ids(names: Iterable[str], matcher: dict[str, Any]) -> dict[str, int]:
    """The group number of each parameter name under a timm-style `group_matcher` dict (see the module docstring).

    Args:
        names: parameter names, e.g. `name for name, _ in model.named_parameters()`.
        matcher: {group: regex or [(regex, suffix tuple or None), ...] or None}.

    Returns:
        {name: group number}, numbered from 0 in the order the matcher sorts the groups.
    """
    rules = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for pattern, suffix in [(spec, None)] if isinstance(spec, str) else spec:
            rules.append((re.compile(pattern), ordinal, tuple(suffix or ())))

    def key(name: str) -> tuple[float, ...]:
        for pattern, ordinal, suffix in rules:
            found = pattern.match(name)
            if found:
                return (ordinal, *map(float, found.groups()), *suffix)
        return (float("inf"),)  # unmatched (the head): the last group

    keys = {name: key(name) for name in names}
    number, numbers = -1, {}
    for k in sorted(set(keys.values())):
        if number < 0 or k[-1] != MATCH_PREV_GROUP:
            number += 1
        numbers[k] = number
    return {name: numbers[k] for name, k in keys.items()}


class TimmInterface(PretrainedCfgMixin):
    """timm's model methods over a CvT's `stages` (stage i: `stages.{i}.patch_embed`, `.cls_token`, `.blocks.{j}`),
    `norm` and `head`."""

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regular expressions grouping the parameters by stage (`coarse`) or by block, in timm's format."""
        if coarse:
            blocks: Any = r"^stages\.(\d+)"
        else:
            blocks = [
                (r"^stages\.(\d+)\.(?:patch_embed|cls_token|pos_embed)", (0,)),  # with the stage's first block
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm\.", (MATCH_PREV_GROUP,)),  # the final norm: with the last block
            ]
        return {"stem": r"^stages\.0\.patch_embed", "blocks": blocks}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """The stage outputs, as timm's `forward_intermediates`.

        Args:
            x: images (B, C, H, W).
            indices: stages to return (see the module docstring); None for all.
            norm: apply the final LayerNorm to the last stage's output (the only one it fits; none once that stage
                is pruned).
            stop_early: run no stage after the last one requested (also done with `intermediates_only`, whose
                result does not depend on the later stages).
            output_fmt: "NCHW", maps (B, C_i, H_i, W_i) at the strides of `feature_info`; or "NLC", the spatial
                tokens (B, H_i W_i, C_i). The class token is never part of them.
            intermediates_only: return the intermediates alone.
            output_dict: return {"image_intermediates": [...], "image_features": final} instead (no
                "image_features" with `intermediates_only`).

        Returns:
            The intermediates; or (final, intermediates), where final is the normalised last-stage tokens
            (B, prefix + HW, C) as from `forward_features` (the tokens of the last stage run, unnormalised, when
            stopped early or pruned).
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt {output_fmt!r} is not one of {OUTPUT_FORMATS}")
        num_stages = len(self.stages)
        taken, last = take_indices(num_stages, indices)
        stages = self.stages[: last + 1] if stop_early or intermediates_only else self.stages
        # the final norm fits the last stage only, and none after `prune_intermediate_layers` cut that one
        normed = num_stages - 1 if num_stages == self.cfg.num_stages else None
        out = []
        for i, (stage, (tokens, hw)) in enumerate(zip(stages, run_stages(stages, x), strict=True)):
            if i == normed and norm:
                tokens = self.norm(tokens)
            if i in taken:
                out.append(stage.to_map(tokens, hw) if output_fmt == "NCHW" else tokens[:, stage.num_prefix_tokens :])
        final = self.norm(tokens) if i == normed and not norm else tokens
        if output_dict:
            return {"image_intermediates": out, **({} if intermediates_only else {"image_features": final})}
        return out if intermediates_only else (final, out)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of `indices` (and the final norm and the head, if asked), as timm.

        The pruned model is for `forward_intermediates`: its `cfg` still names the whole architecture.

        Returns:
            The kept stage indices.
        """
        taken, last = take_indices(len(self.stages), indices)
        self.stages = self.stages[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return taken


__all__ = [
    "MATCH_PREV_GROUP",
    "PretrainedCfgMixin",
    "TimmInterface",
    "layer_ids",
    "pretrained_cfg_dict",
    "run_stages",
    "take_indices",
]
