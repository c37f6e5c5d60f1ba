"""Fine-tuning defaults: the `TrainConfig` that `cvt train --model NAME_OR_PATH --data DIR` runs.

The paper fine-tunes with SGD, momentum 0.9, batch 512 (at 384, on ImageNet-1k) and gives nothing else; the rest
is sized to the dataset here, with every choice resolved into the returned config (and so into the run's
config.json, which a resume reads back):

- model: the checkpoint (`init`), at its own evaluation protocol (input size, crop, interpolation, mean, std),
  with its own drop-path rates; the head is re-initialised when the data's classes differ (`cvt.train.build`);
- optimiser, by what the start is (its identity, `cvt.variants.identify`):
  - released ImageNet weights (a registered name, or a file that still is them): the paper's SGD, momentum 0.9,
    no weight decay, 0.005 per 256 images (0.01 at the paper's batch 512, as in the shipped finetune_384 config:
    20x below the pre-training AdamW rate per image, since the SGD update is not normalised); `--set
    optimizer=adamw` switches to AdamW at 2.5e-5 per 256 images (a tenth of pre-training), weight decay 0.05;
  - anything else (a small model's own pre-training, `--set pretrained=false`): AdamW at 4e-3 per 256 images
    (1e-3 at batch 64), weight decay 0.05; SGD, if asked, at 0.04 per 256. The paper's rate, scaled down to the
    small batches of a small dataset, left such a start far from trained (docs/transfer.md: 70.6% on the digits
    where AdamW at 1e-3 reached 97.6%);
- batch: 64 per process (the paper's 512 over 8 GPUs), smaller for a dataset under 256 images (a power of two,
  at most a quarter of the training set, at least 2);
- length, from BiT's rule for transfer (Kolesnikov et al. 2020, "BiT-HyperRule"): 500 optimiser steps for a
  training set under 20,000 images, 10,000 under 500,000, 20,000 above, rounded to whole epochs; the schedule
  is stepped every optimiser step, with a linear warm-up over the first 5% of the run and a cosine to 1e-5;
- augmentation: light, as BiT's: RandomResizedCrop (area 0.5-1) and flips, no RandAugment, random erasing or
  colour jitter; label smoothing 0.1 as in the paper; Mixup alpha 0.1 from 20,000 images up (BiT), none below;
- mixed precision: bf16 autocast on a GPU, none on a CPU (most CPUs have no native bf16 kernels).

`--set key=value` overrides any of it; a batch size, epoch count or warm-up set that way is kept, and the fields
derived from it follow (the epochs from the batch size, the warm-up from the epochs).

Planning reads the checkpoint once and lists the training split once; `plan_finetune` hands both to
`train(cfg, start=...)` (a `FineTuneStart`), which builds the model and the training set from them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import Checkpoint, read_checkpoint
from ..config import DataConfig
from ..data import ImageDataset, open_dataset
from ..factory import checkpoint_identity
from ..variants import is_registered, resolve
from .config import TrainConfig, apply_overrides, parse_overrides

# BiT-HyperRule: (training images below, optimiser steps); the last entry covers every larger set
SCHEDULE_STEPS = ((20_000, 500), (500_000, 10_000), (None, 20_000))
# {released start: ({optimizer: rate per 256 images}, default optimizer)}; see the module docstring
LR_PER_256 = {True: ({"sgd": 0.005, "adamw": 2.5e-5}, "sgd"), False: ({"sgd": 0.04, "adamw": 4e-3}, "adamw")}
WEIGHT_DECAY = {"sgd": 0.0, "adamw": 0.05}
BATCH_SIZE = 64
WARMUP_FRACTION = 0.05
MIXUP_FROM = 20_000  # images; BiT's Mixup 0.1 for medium and large datasets


def schedule_steps(num_images: int) -> int:
    """Optimiser steps of a fine-tuning run on `num_images` training images (BiT-HyperRule)."""
    for below, steps in SCHEDULE_STEPS:
        if below is None or num_images < below:
            return steps
    raise AssertionError("unreachable: the last rule has no bound")


def default_batch_size(num_images: int) -> int:
    """64, or for a small set the largest power of two up to a quarter of it (at least 2)."""
    quarter = max(2, num_images // 4)
    return min(BATCH_SIZE, 2 ** int(math.log2(quarter)))


@dataclass(frozen=True)
class FineTuneStart:
    """What planning a fine-tuning run read, for `train(cfg, start=...)` to build from instead of reading it again.

    Attributes:
        init: the checkpoint or registered name it starts from (`TrainConfig.init`).
        data: the dataset (`TrainConfig.data`).
        train_split: the split listed (`TrainConfig.train_split`).
        checkpoint: the checkpoint read; None for a registered name (nothing was read).
        train_set: the training split, listed without a transform; None for tar shards (opened per rank).
    """

    init: str
    data: str
    train_split: str
    checkpoint: Checkpoint | None
    train_set: ImageDataset | None

    def fits(self, cfg: TrainConfig) -> bool:
        """Whether `cfg` starts from this checkpoint and trains on this split."""
        return (cfg.init, cfg.data, cfg.train_split) == (self.init, self.data, self.train_split)


def _start(model: str, pretrained: bool) -> tuple[DataConfig, bool, Checkpoint | None]:
    """(the evaluation protocol of `model`, whether it starts from released weights, the checkpoint read): a
    registered name's from the registry (nothing read or downloaded), a checkpoint's from its identity (the file
    read once, no model built)."""
    if is_registered(model):
        return resolve(model)[3].data, pretrained, None
    ckpt = read_checkpoint(model)
    identity = checkpoint_identity(ckpt)
    return identity.data, identity.weights is not None, ckpt


def finetune_config(model: str, data: str, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """The fine-tuning `TrainConfig` for checkpoint or registered name `model` on dataset `data`.

    Args:
        model: anything `cvt.resolve_model` takes: a checkpoint in any supported format, or "name[.tag]".
        data: the dataset (as `TrainConfig.data`: a folder with train/ and val/, a CSV list or tar shards).
        overrides: `key=value` strings or typed {key: value}, applied after the defaults (see the module docstring).

    Returns:
        A config with every field resolved: `init=model`, the model's evaluation protocol, and the schedule
        sized to the training set.
    """
    return plan_finetune(model, data, overrides)[0]


def plan_finetune(
    model: str, data: str, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> tuple[TrainConfig, FineTuneStart]:
    """`finetune_config`'s config, and what it read to decide it (the checkpoint, the training split's listing)
    for `train(cfg, start=...)`, so that a run reads each once."""
    overrides = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    keys = {key.partition(".")[0] for key in overrides}
    probe = apply_overrides(TrainConfig(data=data), overrides)  # the split, the start, the device
    data_config, released, ckpt = _start(model, probe.pretrained)
    height, width = data_config.input_size
    if height != width and "input_size" not in keys:
        raise ValueError(f"{model} is evaluated at {height}x{width}; fine-tuning trains square inputs: "
                         "--set input_size=N")  # fmt: skip
    rates, optimizer = LR_PER_256[released]
    optimizer = overrides.get("optimizer", optimizer)
    num_images, train_set = _training_split(probe.data, probe.train_split)
    cfg = TrainConfig(
        init=model,
        data=data,
        input_size=height,
        crop_mode=data_config.crop_mode,
        crop_pct=data_config.crop_pct,
        interpolation=data_config.interpolation,
        mean=data_config.mean,
        std=data_config.std,
        scale=(0.5, 1.0),
        auto_augment=None,
        color_jitter=0.0,
        re_prob=0.0,
        mixup_alpha=0.1 if num_images >= MIXUP_FROM else 0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.1,
        batch_size=default_batch_size(num_images),
        num_workers=min(8, os.cpu_count() or 1),
        optimizer=optimizer,
        lr_per_256=rates.get(optimizer, rates["sgd"]),
        weight_decay=WEIGHT_DECAY.get(optimizer, 0.0),
        momentum=0.9,
        sched_unit="step",
        amp="bf16" if probe.device == "cuda" or probe.device == "auto" and torch.cuda.is_available() else "none",
        output="runs/finetune",
    )
    cfg = apply_overrides(cfg, overrides)
    derived: dict[str, Any] = {}
    if "epochs" not in keys:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        steps_per_epoch = max(1, num_images // (cfg.batch_size * cfg.accum_steps * world))
        derived["epochs"] = max(1, round(schedule_steps(num_images) / steps_per_epoch))
    if "warmup_epochs" not in keys:
        derived["warmup_epochs"] = WARMUP_FRACTION * derived.get("epochs", cfg.epochs)
    cfg = dataclasses.replace(cfg, **derived)
    return cfg, FineTuneStart(model, probe.data, probe.train_split, ckpt, train_set)


def _training_split(data: str, split: str) -> tuple[int, ImageDataset | None]:
    """(images in the training split, the split listed, or None for tar shards: each rank opens its own)."""
    dataset = open_dataset(data, split=split)
    try:
        num_images = len(dataset)
    except TypeError as err:
        raise ValueError(f"{data}: the training split has no length; pass --set epochs=N") from err
    return num_images, dataset if isinstance(dataset, ImageDataset) else None


__all__ = ["FineTuneStart", "finetune_config", "plan_finetune", "schedule_steps", "default_batch_size"]
