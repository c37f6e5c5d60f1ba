"""`cvt demo`: what the model does, on a generated image (the training issue turns this into the full demo)."""

from __future__ import annotations

import argparse
import time

import torch

from cvt.cli.info import model_table
from cvt.registry import create_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the main job on a generated dataset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("Registered models (parameters exact; GMACs counted as in the paper's code):\n")
    print(model_table([224, 384]))
    torch.manual_seed(0)
    model = create_model("cvt_13").eval()
    # a generated image: smooth colour gradients plus a bright square
    y, x = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2])
    image[:, 80:140, 80:140] = 1.0
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = model.forward_features(image[None])
        logits = model.forward_head(tokens)
        maps = model.forward_intermediates(image[None], intermediates_only=True)
    elapsed = time.perf_counter() - start
    print(f"\ncvt_13 (random weights) on one generated 224x224 image: logits {tuple(logits.shape)} in {elapsed:.2f}s")
    print("stage maps: " + ", ".join(f"{tuple(m.shape)}" for m in maps))
    return 0
