"""Semantic segmentation with transformers' UperNet on a CvT backbone, beside ConvNeXt, Swin and ResNet backbones of
about the same size, all from random weights, trained on generated shapes.

    python examples/segmentation.py                                  # the four backbones, 64x64, 300 steps of 8
    python examples/segmentation.py --backbones cvt --picture docs/dense_masks.png
    python examples/segmentation.py --backbones cvt --weights CvT-13-224x224-IN-1k.pth   # any checkpoint cvt reads

Every run builds `UperNetForSemanticSegmentation(UperNetConfig(backbone_config=...))` with the same head, steps,
batches and learning rate; only the backbone changes: `cvt.hf_backbone_config(...)` (its four levels: the three
stages and the stride-32 `extra_level`) or transformers' own `ConvNextConfig`, `SwinConfig`, `ResNetConfig`, sized to
1.2-1.5M parameters. The images are `cvt.data.synthetic`'s (one object on a cluttered background, colours at
random) with the object's mask; the class is its outline. Prints a table: backbone parameters and MACs at the input
size, seconds per step, the training loss at the start and the end, and pixel accuracy and mean IoU (over the
background and the four shapes) on 64 held-out images. docs/dense.md has the figures of a run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoBackbone,
    ConvNextConfig,
    ResNetConfig,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import cvt
from cvt.data.synthetic import render_with_mask

CLASSES = ("background", "disk", "square", "triangle", "cross")  # the shapes: outlines of cvt.data.synthetic
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
LEVELS = ["stage1", "stage2", "stage3", "stage4"]  # strides 4, 8, 16, 32 in every backbone


def make_batch(batch_size: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated images (B, 3, size, size), normalised, and their masks (B, size, size) of class indices."""
    images, masks = [], []
    for _ in range(batch_size):
        label = int(rng.integers(1, len(CLASSES)))
        image, mask = render_with_mask(CLASSES[label], "solid", size, rng)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        masks.append(torch.from_numpy(mask.astype(np.int64) * label))
    return (torch.stack(images) - MEAN) / STD, torch.stack(masks)


def backbone_config(name: str, size: int, weights: str | None = None):
    """The backbone's transformers configuration: random init, ~1.2-1.5M parameters, four levels."""
    if name == "cvt":
        if weights:
            return cvt.hf_backbone_config(weights, extra_level=True)
        small = {"dims": (32, 64, 128), "depths": (1, 2, 4), "heads": (1, 2, 4)}
        return cvt.hf_backbone_config("cvt_13", pretrained=False, extra_level=True, **small)
    if name == "convnext":
        return ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 3, 1], out_features=LEVELS)
    if name == "swin":
        return SwinConfig(
            image_size=size, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4,
            out_features=LEVELS,
        )  # fmt: skip
    if name == "resnet":
        return ResNetConfig(
            embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], layer_type="basic",
            out_features=LEVELS,
        )  # fmt: skip
    raise ValueError(f"unknown backbone {name!r}; choose from cvt, convnext, swin, resnet")


def backbone_cost(config, size: int) -> tuple[float, float]:
    """(parameters in millions, GMACs for one image of `size`) of the backbone alone."""
    backbone = AutoBackbone.from_config(config).eval()
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(torch.zeros(1, 3, size, size))
    return params, counter.get_total_flops() / 2e9


def scores(predicted: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """(pixel accuracy, mean IoU over the classes present in either)."""
    ious = []
    for c in range(len(CLASSES)):
        union = ((predicted == c) | (masks == c)).sum().item()
        if union:
            ious.append(((predicted == c) & (masks == c)).sum().item() / union)
    return (predicted == masks).float().mean().item(), sum(ious) / len(ious)


def train(name: str, args: argparse.Namespace) -> dict:
    """Train UperNet with backbone `name`; returns its row of the table (and the model)."""
    torch.manual_seed(args.seed)
    config = backbone_config(name, args.size, args.weights)
    params, gmacs = backbone_cost(config, args.size)
    head = {"hidden_size": 64, "auxiliary_channels": 32, "pool_scales": [1, 2]}
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=config, num_labels=len(CLASSES), **head))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)  # the same batches for every backbone
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        images, masks = make_batch(args.batch_size, args.size, rng)
        loss = model(pixel_values=images, labels=masks).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps:
            print(f"  {name} step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f}s)")
    seconds = (time.perf_counter() - start) / args.steps
    model.eval()
    images, masks = make_batch(64, args.size, np.random.default_rng(args.seed + 1))
    with torch.no_grad():
        predicted = model(pixel_values=images).logits.argmax(dim=1)
    accuracy, miou = scores(predicted, masks)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    row = {"backbone": name, "params_m": params, "gmacs": gmacs, "s_per_step": seconds, "loss_first10": first,
           "loss_last10": last, "pixel_acc": accuracy, "miou": miou}  # fmt: skip
    return {**row, "model": model, "held_out": (images, masks, predicted)}


def save_picture(path: str, held_out: tuple[torch.Tensor, ...], count: int = 6) -> None:
    """Images, true masks and predicted masks of the first `count` held-out images, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, masks, predicted = held_out
    fig, axes = plt.subplots(3, count, figsize=(1.3 * count, 4.1))
    for i in range(count):
        pixels = (images[i] * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy()
        for row, (title, shown) in enumerate((("image", pixels), ("truth", masks[i]), ("UperNet+CvT", predicted[i]))):
            kwargs = {} if row == 0 else {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}
            axes[row, i].imshow(shown, **kwargs)
            axes[row, i].set_axis_off()
            if i == 0:
                axes[row, i].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=["cvt", "convnext", "swin", "resnet"])
    p.add_argument("--weights", default=None, help="CvT from this checkpoint (any format cvt reads) instead")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", default=None, help="write the first backbone's held-out masks to this PNG")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Train each backbone and print the table; returns its rows."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: a second thread mostly waits (and the machine is shared)
    rows = [train(name, args) for name in args.backbones]
    print(f"\nUperNet, {args.steps} steps of {args.batch_size} images {args.size}x{args.size}, random init:")
    print("| backbone | params (M) | GMACs | s/step | loss (first 10 -> last 10) | pixel acc | mIoU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['loss_first10']:.3f} -> {r['loss_last10']:.3f}"
        print(f"| {r['backbone']} | {r['params_m']:.2f} | {r['gmacs']:.3f} | {r['s_per_step']:.2f} | {loss} | "
              f"{r['pixel_acc']:.1%} | {r['miou']:.1%} |")  # fmt: skip
    if args.picture:
        save_picture(args.picture, rows[0]["held_out"])
        print(f"wrote {args.picture}")
    return [{k: v for k, v in r.items() if k not in ("model", "held_out")} for r in rows]


if __name__ == "__main__":
    main()
