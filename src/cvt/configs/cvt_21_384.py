"""CvT-21 on ImageNet-1k at 384x384: the same recipe at 384 with weight decay 0.1, evaluated squashed to 384x384.

    torchrun --nproc-per-node 8 -m cvt train --config cvt_21_384 --data /data/imagenet

Paper: 83.3% top-1 on ImageNet-1k val (32M parameters, 24.9 GFLOPs at 384).
"""

import dataclasses

from cvt.train import TrainConfig

PAPER_RESULT = "83.3% top-1 ImageNet-1k val (32M params, 24.9 GFLOPs at 384)"


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model="cvt_21",
        input_size=384,
        crop_mode="squash",
        crop_pct=1.0,
        batch_size=128,
        accum_steps=2,
        weight_decay=0.1,
        amp="fp16",
        output="runs/cvt_21_384",
    )
