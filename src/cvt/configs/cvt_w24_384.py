"""CvT-W24 at 384x384, sharded with FSDP2: the recipe with weight decay 0.1 and drop path 0.3 (the variant's).

    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m cvt train --config cvt_w24_384 --data /data/imagenet-22k

Paper: 87.7% top-1 on ImageNet-1k val, after pre-training on ImageNet-22k and fine-tuning on ImageNet-1k at 384
(277M parameters, 193.2 GFLOPs at 384). This config is the pre-training stage (point --data at ImageNet-22k; the
head takes its size from the data); finetune_384 with `--set init=runs/cvt_w24_384/best.pt` is the second
stage. 32 processes x 64 images = global batch 2048; activation
checkpointing keeps a 384x384 batch of 64 in memory.
"""

import dataclasses

from cvt.train import TrainConfig

PAPER_RESULT = "87.7% top-1 ImageNet-1k val, pre-trained on ImageNet-22k (277M params, 193.2 GFLOPs at 384)"


def get_config() -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model="cvt_w24",
        input_size=384,
        crop_mode="squash",
        crop_pct=1.0,
        batch_size=64,
        weight_decay=0.1,
        amp="fp16",
        fsdp=True,
        grad_checkpointing=True,
        save_every_steps=2000,
        output="runs/cvt_w24_384",
    )
