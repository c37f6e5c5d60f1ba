"""CvT-21 on ImageNet-1k at 224x224: the paper's recipe with weight decay 0.1.

    torchrun --nproc-per-node 8 -m cvt train --config cvt_21_224 --data /data/imagenet

Paper: 82.5% top-1 on ImageNet-1k val (32M parameters, 7.1 GFLOPs). As cvt_13_224 except the model
(depths 1, 4, 16) and weight decay 0.1.
"""

import dataclasses

from cvt.train import TrainConfig

PAPER_RESULT = "82.5% top-1 ImageNet-1k val (32M params, 7.1 GFLOPs)"


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model="cvt_21",
        batch_size=256,
        weight_decay=0.1,
        amp="fp16",
        output="runs/cvt_21_224",
    )
