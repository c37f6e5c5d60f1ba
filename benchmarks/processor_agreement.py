"""Top-1 agreement of transformers' `pipeline("image-classification")` on our Hugging Face export with `cvt predict`
on crops of real photographs, where transformers' image processor centre-crops differently (floor, not round).

    .venv/bin/python benchmarks/processor_agreement.py                     # tiny model, 224 protocol, 104 crops
    .venv/bin/python benchmarks/processor_agreement.py --model cvt_13      # CvT-13 (random init), GELU

The crops are random boxes (40-100% of the side, any aspect ratio) of scikit-learn's two sample photos. The model
computes GELU, as transformers' CvT does, so the preprocessing is the only difference. Prints the agreement of the
top-1 and of the top-5 order over all crops and over those whose resized margin is 3 (mod 4) in some direction
(where the crops differ by one pixel). Without released weights at hand, the models are random: a trained model's
decision is far less sensitive to a one-pixel shift, so these figures bound the disagreement from above.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import pipeline

import cvt
from cvt.config import DataConfig
from cvt.predict import predict_images

TINY = {"dims": (16, 32, 48), "depths": (1, 2, 3), "heads": (1, 2, 3), "num_classes": 10}


def build(name: str, data: DataConfig) -> cvt.CvT:
    torch.manual_seed(0)
    if name == "tiny":  # weights spread out so that its probabilities are far from uniform (as tests/test_hf_interop)
        model = cvt.create_model("cvt_13", act="gelu", **TINY)
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                if key.endswith("running_var"):
                    tensor.uniform_(0.5, 1.5)
                elif tensor.is_floating_point():
                    tensor.normal_(0.0, 0.3)
            model.head.weight.mul_(10)
    else:
        model = cvt.create_model(name, act="gelu")
    model.data_config, model.class_names = data, [f"class {i}" for i in range(model.num_classes)]
    return model.eval()


def crops(folder: Path, count: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        h, w = int(height * rng.uniform(0.4, 1.0)), int(width * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        paths.append(folder / f"crop{i:03d}.png")
        Image.fromarray(photo[top : top + h, left : left + w]).save(paths[-1])
    return paths


def odd_margin(size: tuple[int, int], data: DataConfig) -> bool:
    """Whether our resize leaves a margin of 3 (mod 4) pixels, where floor and round-half-even crops differ."""
    width, height = size
    short = int(data.input_size[0] / data.crop_pct)
    resized = (short, int(short * width / height)) if height < width else (int(short * height / width), short)
    return any((r - s) % 4 == 3 for r, s in zip(resized, data.input_size, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a registered variant (random init)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--count", type=int, default=104)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = DataConfig(args.input_size, crop_mode="center", crop_pct=args.crop_pct)
    model = build(args.model, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cvt.save_model(model, folder / "hf", format="hf")
        paths = crops(folder, args.count, args.seed)
        ours = predict_images(model, paths, topk=5, optimize=False)
        classify = pipeline("image-classification", model=str(folder / "hf"))
        rows = []
        for path, mine in zip(paths, ours, strict=True):
            theirs = [p["label"] for p in classify(str(path), top_k=5)]
            labels = [p["label"] for p in mine["predictions"]]
            rows.append((odd_margin(Image.open(path).size, data), theirs[0] == labels[0], theirs == labels))
    for title, subset in (("all crops", rows), ("margin 3 (mod 4)", [r for r in rows if r[0]])):
        n = len(subset)
        top1, top5 = sum(r[1] for r in subset), sum(r[2] for r in subset)
        share = [f"{k}/{n} ({100 * k / max(n, 1):.1f}%)" for k in (top1, top5)]
        print(f"{args.model} @{args.input_size} {title}: {n} crops, top-1 agrees {share[0]}, top-5 order {share[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
