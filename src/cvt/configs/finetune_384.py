"""Fine-tuning at 384x384 on ImageNet-1k with SGD momentum 0.9 and batch 512, from any checkpoint.

    torchrun --nproc-per-node 8 -m cvt train --config finetune_384 --data /data/imagenet \
        --set init=runs/cvt_13_224/best.pt          # or a registered name.tag, or any checkpoint cvt.load_model reads

Paper: "fine-tuning ... SGD with momentum 0.9, batch size 512, on ImageNet-1k at 384"; from ImageNet-22k
pre-training this gives CvT-13 83.3%, CvT-21 84.9%, CvT-W24 87.7% top-1. The paper gives no other fine-tuning
hyper-parameters: the learning rate (0.01 at batch 512), no weight decay, 30 epochs with 1 warm-up epoch, and
the unchanged augmentation recipe are our choices. A head of another size than the data's classes is
re-initialised.
"""

import dataclasses

from cvt.train import TrainConfig

PAPER_RESULT = "from ImageNet-22k: CvT-13 83.3%, CvT-21 84.9%, CvT-W24 87.7% top-1 ImageNet-1k val"


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model="cvt_13",
        init=None,  # required: --set init=PATH_OR_NAME
        input_size=384,
        crop_mode="squash",
        crop_pct=1.0,
        batch_size=64,  # x 8 processes = 512
        optimizer="sgd",
        momentum=0.9,
        lr_per_256=0.005,  # 0.01 at 512
        weight_decay=0.0,
        epochs=30,
        warmup_epochs=1,
        amp="fp16",
        output="runs/finetune_384",
    )
