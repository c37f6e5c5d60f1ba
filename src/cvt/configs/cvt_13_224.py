"""CvT-13 on ImageNet-1k at 224x224: the paper's recipe (Wu et al., ICCV 2021, Sec. 4.1).

    torchrun --nproc-per-node 8 -m cvt train --config cvt_13_224 --data /data/imagenet

Paper: 81.6% top-1 on ImageNet-1k val (20M parameters, 4.5 GFLOPs). 300 epochs, AdamW, global batch 2048
(8 processes x 256), lr 2.5e-4 per 256 images = 2e-3, weight decay 0.05, 5 warm-up epochs from 1e-6, cosine to 1e-5
(stepped per epoch), RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0 with label
smoothing 0.1, drop path 0.1 in stage 3, fp16 mixed precision. On fewer GPUs keep the global batch with
`--set accum_steps=...`, or let the learning rate scale with it.
"""

from cvt.train import TrainConfig

PAPER_RESULT = "81.6% top-1 ImageNet-1k val (20M params, 4.5 GFLOPs)"


def get_config() -> TrainConfig:
    return TrainConfig(
        model="cvt_13",
        input_size=224,
        crop_mode="center",
        crop_pct=0.875,
        batch_size=256,
        lr_per_256=2.5e-4,
        weight_decay=0.05,
        epochs=300,
        warmup_epochs=5,
        warmup_lr=1e-6,
        min_lr=1e-5,
        amp="fp16",
        num_workers=8,
        output="runs/cvt_13_224",
    )
