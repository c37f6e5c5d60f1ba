"""The demo: a small CvT trained on the generated shapes dataset on 2 CPU cores in about ten minutes.

    cvt demo        # or: make demo; or: cvt train --config configs/demo.py --data data/demo

Result to expect: >= 90% top-1 on the generated validation set (placeholder until tuned).
"""

from cvt.train import TrainConfig


def get_dataset() -> dict:
    """Arguments of `cvt.data.make_dataset` for the demo's data (written to data/demo when absent)."""
    return {"num_classes": 10, "train_per_class": 300, "val_per_class": 50, "image_size": 64, "seed": 0}


def get_config() -> TrainConfig:
    return TrainConfig(
        model="cvt_13",
        model_kwargs={"dims": [32, 64, 128], "depths": [1, 1, 2], "heads": [1, 2, 2]},
        data="data/demo",
        input_size=64,
        batch_size=64,
        num_workers=0,
        epochs=30,
        warmup_epochs=2,
        lr=1e-3,
        weight_decay=0.05,
        amp="none",
        output="runs/demo",
    )
