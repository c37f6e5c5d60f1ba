"""The demo: a narrow CvT-13-shaped model trained on the generated shapes dataset on 2 CPU cores.

    cvt demo                      # = make demo; or: cvt train --config demo --data data/demo

Result to expect: >= 90% top-1 on the 500 generated validation images (10 classes); measured 92.6% in 4.4 min of
training on two idle CPU cores (the README has the measured figure). The paper's 81.6% (CvT-13, ImageNet-1k) is not
comparable.

What differs from the paper's recipe, and why:
- model: CvT-13's three stages and embedding strides (4, 2, 2) with widths 32/64/128, depths 1/1/2 and 1/2/2
  heads: a 64x64 image gives 16x16, 8x8 and 4x4 token grids (0.6M parameters);
- data: 800 + 50 generated 64x64 images per class; evaluation squashes the whole image to 64x64 (no crop);
- augmentation: RandomResizedCrop (scale 0.85-1) and flips only. RandAugment, random erasing and Mixup/CutMix
  regularise 300 ImageNet epochs; on a clean toy set and a 2000-step budget they only slow learning down. Crops
  down to 35% of the image cut the shapes apart: 67.6% top-1 after 9 epochs against 89.2% with 85%;
- optimisation: AdamW with weight decay 0.05 and label smoothing 0.1 as in the paper, but a peak learning rate of
  1e-3 at batch 64 (16x the paper's rate per image, which a 0.6M-parameter model tolerates), one warm-up epoch,
  and the cosine stepped every optimiser step instead of every epoch (16 epochs are too few for an epoch staircase);
- one compute thread plus one data-loading worker: the two cores work in parallel instead of contending.
"""

from cvt.train import TrainConfig

PAPER_RESULT = "not a paper setup: >= 90% top-1 on the generated shapes (measured 92.6%)"


def get_dataset() -> dict:
    """Arguments of `cvt.data.make_dataset` for the demo's data (written to data/demo when absent)."""
    return {"num_classes": 10, "train_per_class": 800, "val_per_class": 50, "image_size": 64, "seed": 0,
            "num_workers": 2}  # fmt: skip


def get_config() -> TrainConfig:
    return TrainConfig(
        model="cvt_13",
        model_kwargs={"dims": [32, 64, 128], "depths": [1, 1, 2], "heads": [1, 2, 2]},
        data="data/demo",
        input_size=64,
        crop_mode="squash",
        crop_pct=1.0,
        scale=(0.85, 1.0),
        auto_augment=None,
        re_prob=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.1,
        batch_size=64,
        num_workers=1,
        num_threads=1,
        lr=1e-3,
        weight_decay=0.05,
        epochs=16,
        warmup_epochs=1,
        sched_unit="step",
        amp="none",
        output="runs/demo",
    )
