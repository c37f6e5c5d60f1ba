"""Who a model is: its name, the released weights it still is (if any), its evaluation preprocessing and its class
names, as one frozen record.

`cvt.variants.identify` decides a model's `ModelIdentity` once, from its architecture, its head and what a file
recorded; the model carries it (`CvT.identity`), and its name, timm's `pretrained_cfg`, the model card, the files
it is saved or exported to and the training log all read it from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import DataConfig, PretrainedCfg


@dataclass(frozen=True)
class ModelIdentity:
    """A model's identity.

    Attributes:
        name: "cvt_13.in1k" (variant and weights tag) while the model is those released weights; the variant
            alone ("cvt_13") when it has their architecture but another head, activation or training; "cvt_13-custom"
            when its architecture departs from the variant's; or the name a file recorded. None when unknown.
        weights: the released weights the model still is (their hub id, file and licence), or None.
        data: the evaluation preprocessing the model expects.
        class_names: one name per class, or None when unknown.
    """

    name: str | None = None
    weights: PretrainedCfg | None = None
    data: DataConfig = field(default_factory=DataConfig)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))

    def replace(self, **changes: object) -> ModelIdentity:
        """A copy with `changes` (the record is frozen)."""
        return dataclasses.replace(self, **changes)


__all__ = ["ModelIdentity"]
