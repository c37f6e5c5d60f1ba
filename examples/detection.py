"""Object detection with transformers' DETR on a CvT backbone, trained from random weights on generated shapes.

    python examples/detection.py                       # 96x96, 300 steps of 8 (about 5 minutes on a shared CPU)
    python examples/detection.py --weights CvT-13-224x224-IN-1k.pth --steps 2000   # any checkpoint cvt reads

DETR is built as transformers documents it for a backbone of its own: `DetrConfig(backbone_config=
cvt.hf_backbone_config(...), use_timm_backbone=False, use_pretrained_backbone=False)`, the CvT's last stage
(stride 16) feeding a small transformer (2 + 2 layers, width 64, 4 queries). Each image is one object of
`cvt.data.synthetic` (its outline is the class) on a cluttered background; its box is the mask's bounding box.

A small-scale check, not a detector: DETR needs hundreds of epochs on COCO, and this run is a few hundred steps on
one object per image. It prints the loss falling and scores the boxes: on 64 held-out images, how often the most
confident query has the right class and a box overlapping the truth by IoU > 0.75, against a baseline that always
answers the average box of the training set. In the runs of docs/dense.md (up to 2,000 steps) the loss falls but
the boxes are not yet better than that baseline.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DetrConfig, DetrForObjectDetection

import cvt
from cvt.data.synthetic import render_with_mask

CLASSES = ("disk", "square", "triangle", "cross")
IOU = 0.75  # a box "found": the objects are large, so the average box alone overlaps most by IoU 0.5
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def make_batch(batch_size: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[dict]]:
    """Images (B, 3, size, size), normalised, and DETR's labels: one class and one box (cx, cy, w, h in [0, 1])."""
    images, labels = [], []
    for _ in range(batch_size):
        label = int(rng.integers(len(CLASSES)))
        image, mask = render_with_mask(CLASSES[label], "solid", size, rng)
        rows, cols = np.nonzero(mask)
        x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
        box = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32) / size
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        labels.append({"class_labels": torch.tensor([label]), "boxes": box[None]})
    return (torch.stack(images) - MEAN) / STD, labels


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (N, 4) tensors of (cx, cy, w, h) boxes."""

    def corners(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2], dim=1)  # (N, 4): x0, y0, x1, y1

    a, b = corners(a), corners(b)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
    union = (a[:, 2:] - a[:, :2]).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1) - inter
    return inter / union


def build(args: argparse.Namespace) -> DetrForObjectDetection:
    if args.weights:
        backbone = cvt.hf_backbone_config(args.weights, out_features=["stage3"])
    else:
        small = {"dims": (32, 64, 128), "depths": (1, 2, 4), "heads": (1, 2, 4)}
        backbone = cvt.hf_backbone_config("cvt_13", out_features=["stage3"], pretrained=False, **small)
    config = DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, num_labels=len(CLASSES),
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=4, dropout=0.0,
    )  # fmt: skip
    return DetrForObjectDetection(config)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="CvT from this checkpoint (any format cvt reads)")
    p.add_argument("--size", type=int, default=96, help="image side (default 96)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, then score the held-out images; returns the figures printed."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a small model: a second thread mostly waits (and the machine is shared)
    model = build(args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    losses, mean_box, start = [], torch.zeros(4), time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = make_batch(args.batch_size, args.size, rng)
        mean_box += torch.cat([t["boxes"] for t in labels]).mean(dim=0) / args.steps
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # DETR's recipe
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f}s)")

    model.eval()
    images, labels = make_batch(64, args.size, np.random.default_rng(args.seed + 1))
    with torch.no_grad():
        out = model(pixel_values=images)
    probs = out.logits.softmax(-1)[..., :-1]  # the last class is "no object"
    best = probs.max(-1).values.argmax(-1)  # the most confident query of each image
    rows = torch.arange(len(best))
    boxes, classes = out.pred_boxes[rows, best], probs[rows, best].argmax(-1)
    truth = torch.cat([t["boxes"] for t in labels])
    true_classes = torch.cat([t["class_labels"] for t in labels])
    iou, baseline = box_iou(boxes, truth), box_iou(mean_box.expand_as(truth), truth)
    found = ((iou > IOU) & (classes == true_classes)).float().mean().item()
    result = {
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "found": found, "mean_iou": iou.mean().item(), "class_acc": (classes == true_classes).float().mean().item(),
        "baseline_found": (baseline > IOU).float().mean().item(), "baseline_mean_iou": baseline.mean().item(),
        "s_per_step": (time.perf_counter() - start) / args.steps,
    }  # fmt: skip
    print(f"loss {result['loss_first10']:.3f} (first 10 steps) -> {result['loss_last10']:.3f} (last 10)")
    print(f"held-out: right class and IoU > {IOU} for {found:.1%} of 64 images (class {result['class_acc']:.1%}, "
          f"mean IoU {result['mean_iou']:.2f}); the average box: IoU > {IOU} for {result['baseline_found']:.1%}, "
          f"mean IoU {result['baseline_mean_iou']:.2f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
