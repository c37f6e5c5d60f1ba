"""Images per second per loader worker: decoding, the evaluation transform and the training transform.

    .venv/bin/python benchmarks/bench_data.py            # about a minute on 2 CPU cores

Each row times `dataset[i]` in one process (what one DataLoader worker does: read the file, decode, transform),
on the generated shapes dataset at the demo's 64x64 and, drawn at 256x256, at the paper's 224 input. A loader
with W workers delivers at most W times the per-worker rate (fewer when the cores are shared with training).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cvt.config import DataConfig
from cvt.data import create_eval_transform, create_train_transform, make_dataset, open_dataset


def rate(dataset, count: int) -> float:
    """Images per second over `count` consecutive samples (after two warm-up samples)."""
    dataset[0], dataset[1]
    start = time.perf_counter()
    for i in range(count):
        dataset[i % len(dataset)]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where to generate the datasets (default: a temporary folder)")
    parser.add_argument("--images", type=int, default=400, help="images timed per row (default 400)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        print("| images | input | pipeline | images/s per worker | ms/image |\n|---|---|---|---|---|", flush=True)
        for image_size, input_size, crop_mode in ((64, 64, "squash"), (256, 224, "center")):
            data = make_dataset(
                root / f"shapes{image_size}", num_classes=10, train_per_class=40, val_per_class=0, image_size=image_size
            )
            cfg = DataConfig(input_size=(input_size, input_size), crop_mode=crop_mode, crop_pct=0.875)
            pipelines = {
                "decode only": None,
                f"eval ({crop_mode})": create_eval_transform(cfg),
                "train: crop, flip": create_train_transform(
                    input_size, auto_augment=None, color_jitter=None, re_prob=0
                ),
                "train: crop, flip, colour jitter": create_train_transform(input_size, auto_augment=None, re_prob=0),
                "train: paper recipe (RandAugment, erasing)": create_train_transform(input_size),
            }
            for name, transform in pipelines.items():
                per_second = rate(open_dataset(data, split="train", transform=transform), args.images)
                cells = [
                    f"{image_size}x{image_size}",
                    str(input_size),
                    name,
                    f"{per_second:,.0f}",
                    f"{1000 / per_second:.2f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
