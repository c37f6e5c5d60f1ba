"""CvT as a backbone of transformers' dense-prediction models (UperNet, Mask2Former, DETR, anything on `load_backbone`).

    import cvt
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    backbone = cvt.hf_backbone_config("CvT-13-224x224-IN-1k.pth", norm_eval=True)   # any checkpoint cvt reads
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, num_labels=150))
    model.save_pretrained("upernet-cvt13")
    # in another process: cvt.register_transformers(), then UperNetForSemanticSegmentation.from_pretrained(...)

`hf_backbone_config` returns a `CvtBackboneConfig` (model type "cvt_backbone"; transformers' own "cvt" is its
classifier, which has no backbone) and registers it with `AutoConfig` and `AutoBackbone`. The backbone,
`CvtBackbone`, follows transformers' backbone API: `stage_names` ("stage1".."stage3", and "stage4" with
`extra_level`), `out_features`/`out_indices` (positions in `stage_names`), `channels`, and a `BackboneOutput` whose
`feature_maps` are the maps `CvT.forward_intermediates` returns. It loads its weights (`weights`: a checkpoint path
of any format `cvt.load_model` reads, or a registered name such as "cvt_13.in1k") when it is built, except inside
`from_pretrained`, which builds on the meta device and loads the composite model's own file.

Sizes: there is no position embedding, so any input size runs. The maps are what the convolutions give, with no
padding of the input: stage 1 (kernel 7, stride 4, padding 2) has floor((H + 1) / 4) rows, each later stage and the
extra level (kernel 3, stride 2, padding 1) ceil(H_prev / 2); an input whose sides are multiples of 16 (32 with
the extra level) gives maps of exactly H / stride. The heads of transformers resize by target size, not by factor,
so other sizes work too (tests run 61 x 75).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._optional import require
from .checkpoint import read_checkpoint
from .config import CvTConfig
from .factory import load_model, model_from_checkpoint
from .features import CvTFeatures
from .hub import download_weights
from .model import ConvEmbed, CvT
from .variants import model_config, resolve

require("transformers", package="transformers", extra="hf", purpose="CvT as a transformers backbone (cvt.hf_backbone)")

from transformers import AutoBackbone, AutoConfig, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin  # noqa: E402
from transformers.modeling_outputs import BackboneOutput  # noqa: E402

MODEL_TYPE = "cvt_backbone"  # not "cvt": transformers registers that name for its CvT classifier


class CvtBackboneConfig(BackboneConfigMixin, PretrainedConfig):
    """transformers configuration of a `CvtBackbone`.

    Args:
        cvt_config: the architecture, `CvTConfig.to_dict()`; None for CvT-13's.
        weights: a checkpoint path (any format `cvt.load_model` reads) or a registered name with released weights
            ("cvt_13", "cvt_21.in22k_ft_384") loaded when the backbone is built; None for random init.
        frozen_stages: the first n stages get no gradient and stay in eval mode (0: none).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) while training.
        extra_level: add a stride-32 level ("stage4"): a convolutional token embedding (3x3, stride 2, LayerNorm)
            of the last stage's map, as CvT joins its stages, for heads that expect four levels (Mask2Former).
        out_features / out_indices: the levels returned, as names in `stage_names` or positions in it.
    """

    model_type = MODEL_TYPE

    cvt_config: dict[str, Any] | None = None
    weights: str | None = None
    frozen_stages: int = 0
    norm_eval: bool = False
    extra_level: bool = False
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        cfg = self.architecture
        if not 0 <= self.frozen_stages <= cfg.num_stages:
            raise ValueError(f"frozen_stages={self.frozen_stages}: choose 0 (none) to {cfg.num_stages} (every stage)")
        self.num_channels = cfg.in_chans
        self.stage_names = [f"stage{i + 1}" for i in range(cfg.num_stages + int(self.extra_level))]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        kwargs.pop("stage_names", None)  # derived above; a saved config repeats it
        super().__post_init__(**kwargs)

    @property
    def architecture(self) -> CvTConfig:
        """The `CvTConfig` of the backbone."""
        return CvTConfig.from_dict(self.cvt_config) if self.cvt_config else CvTConfig()

    @property
    def channels_of_levels(self) -> list[int]:
        """Channels of every level in `stage_names`."""
        dims = list(self.architecture.dims)
        return dims + dims[-1:] * int(self.extra_level)

    @property
    def strides_of_levels(self) -> list[int]:
        """Stride of every level in `stage_names` relative to the input."""
        strides, stride = [], 1
        for s in self.architecture.embed_stride:
            stride *= s
            strides.append(stride)
        return strides + [stride * 2] * int(self.extra_level)


def _build_cvt(config: CvtBackboneConfig) -> CvT:
    """The CvT of `config`: with its `weights` loaded, except on the meta device (inside `from_pretrained`)."""
    cfg = config.architecture
    if not config.weights or torch.empty(0).is_meta:  # from_pretrained builds under `torch.device("meta")`
        return CvT(dataclasses.replace(cfg, num_classes=0))
    path = Path(config.weights).expanduser()
    if path.exists():
        return model_from_checkpoint(read_checkpoint(path), cfg)
    try:
        arch, _, tag, entry = resolve(config.weights)
    except ValueError:
        raise FileNotFoundError(
            f"CvtBackboneConfig.weights={config.weights!r} is neither an existing checkpoint nor a registered model; "
            "set weights=None to build with random weights"
        ) from None
    local = download_weights(entry.hf_hub_id, official_file=entry.official_file)
    return model_from_checkpoint(read_checkpoint(local), cfg, name=f"{arch}.{tag}", data=entry.data)


class CvtBackbone(BackboneMixin, PreTrainedModel):
    """CvT's stage maps behind transformers' backbone API; see the module docstring.

    Args:
        config: a `CvtBackboneConfig` (from `cvt.hf_backbone_config`).
    """

    config_class = CvtBackboneConfig
    config: CvtBackboneConfig
    base_model_prefix = "cvt"
    main_input_name = "pixel_values"
    has_attentions = False
    supports_gradient_checkpointing = True

    def __init__(self, config: CvtBackboneConfig) -> None:
        super().__init__(config)
        model = _build_cvt(config)
        self.cvt = CvTFeatures(model, out_indices=tuple(range(len(model.stages))))
        self.extra = None
        if config.extra_level:
            dim = model.cfg.dims[-1]
            self.extra = ConvEmbed(dim, dim, kernel=3, stride=2, padding=1, eps=model.cfg.norm_eps)
        self.num_features = config.channels_of_levels
        for stage in self.cvt.stages[: config.frozen_stages]:
            stage.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: CvT initialised its weights (or loaded them) when built, and `from_pretrained` loads them all."""

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None) -> None:
        self.cvt.set_grad_checkpointing(enable)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute block activations in the backward pass (CvT's own checkpointing)."""
        self.cvt.set_grad_checkpointing(True)

    def train(self, mode: bool = True) -> CvtBackbone:
        """As `nn.Module.train`, keeping the frozen stages, and with `norm_eval` every BatchNorm, in eval mode."""
        super().train(mode)
        if mode:
            for stage in self.cvt.stages[: self.config.frozen_stages]:
                stage.eval()
            if self.config.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def levels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Every level's map (B, C_i, H_i, W_i), in `stage_names` order."""
        maps = self.cvt(pixel_values)
        if self.extra is not None:
            tokens, hw = self.extra(maps[-1])
            maps.append(tokens.unflatten(1, hw).permute(0, 3, 1, 2))  # (B, HW, C) -> (B, C, H, W)
        return maps

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput | tuple:
        """Images (B, C, H, W) -> `BackboneOutput(feature_maps=...)` of the `out_features` levels; every level as
        `hidden_states` when asked."""
        if output_attentions:
            raise ValueError("CvtBackbone returns no attention maps (cvt.attention_map computes them)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        maps = self.levels(pixel_values)
        num_levels = len(maps)
        feature_maps = tuple(maps[i % num_levels] for i in self.out_indices)
        hidden_states = tuple(maps) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


def register_transformers() -> None:
    """Register "cvt_backbone" with transformers' `AutoConfig` and `AutoBackbone` (again is a no-op), so that a saved
    model with a CvT backbone loads with `from_pretrained` in a new process."""
    AutoConfig.register(MODEL_TYPE, CvtBackboneConfig)  # raises if transformers itself ever takes the name
    AutoBackbone.register(CvtBackboneConfig, CvtBackbone, exist_ok=True)


def hf_backbone_config(
    name_or_path: str | os.PathLike,
    out_features: Sequence[str] | None = None,
    *,
    pretrained: bool = True,
    frozen_stages: int = 0,
    norm_eval: bool = False,
    extra_level: bool = False,
    **overrides: Any,
) -> CvtBackboneConfig:
    """A transformers backbone configuration of CvT, for `backbone_config=` of UperNet, Mask2Former, DETR
    (`use_timm_backbone=False`) and other models built on `load_backbone`; registers it (`register_transformers`).

    Args:
        name_or_path: a checkpoint (the authors' `.pth`, a Hugging Face CvT folder, a folder of `cvt.save_model`, a
            training checkpoint), whose architecture and weights the backbone takes; or a registered name
            ("cvt_13", "cvt_21.in22k_ft_384") with its released weights (downloaded when the backbone is built).
        out_features: the levels to return, from "stage1".."stage3" (strides 4, 8, 16) and, with `extra_level`,
            "stage4" (stride 32); None for all.
        pretrained: with a registered name, False builds random weights.
        frozen_stages: the first n stages get no gradient and stay in eval mode.
        norm_eval: every BatchNorm stays in eval mode while training.
        extra_level: add a stride-32 level (see `CvtBackboneConfig`).
        **overrides: `CvTConfig` fields to change, e.g. `drop_path_rate=0.2`, or `depths=(1, 1, 1)` for a new model.

    Returns:
        The configuration; `AutoBackbone.from_config(config)` builds the backbone with its weights.
    """
    register_transformers()
    path = Path(name_or_path).expanduser()
    if path.exists():
        cfg, weights = load_model(path, **overrides).cfg, str(path.resolve())
    else:
        cfg = model_config(str(name_or_path), **overrides)  # an unknown name: an error listing the known ones
        weights = str(name_or_path) if pretrained else None
    num_levels = cfg.num_stages + int(extra_level)
    names = [f"stage{i + 1}" for i in range(num_levels)]
    return CvtBackboneConfig(
        cvt_config=dataclasses.replace(cfg, num_classes=0).to_dict(),
        weights=weights,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        extra_level=extra_level,
        out_features=list(out_features) if out_features is not None else names,
    )


__all__ = ["MODEL_TYPE", "CvtBackbone", "CvtBackboneConfig", "hf_backbone_config", "register_transformers"]
