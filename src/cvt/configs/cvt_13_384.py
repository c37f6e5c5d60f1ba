"""CvT-13 on ImageNet-1k at 384x384: the same recipe at 384, evaluated by squashing to 384x384 (no crop).

    torchrun --nproc-per-node 8 -m cvt train --config cvt_13_384 --data /data/imagenet

Paper: 83.0% top-1 on ImageNet-1k val (20M parameters, 16.3 GFLOPs at 384). Per-process batch 128 with 2 steps of
gradient accumulation keeps the global batch at 2048 on 8 GPUs.
"""

import dataclasses

from cvt.train import TrainConfig

PAPER_RESULT = "83.0% top-1 ImageNet-1k val (20M params, 16.3 GFLOPs at 384)"


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model="cvt_13",
        input_size=384,
        crop_mode="squash",
        crop_pct=1.0,
        batch_size=128,
        accum_steps=2,
        weight_decay=0.05,
        amp="fp16",
        output="runs/cvt_13_384",
    )
