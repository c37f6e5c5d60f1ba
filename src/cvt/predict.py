"""Prediction on image files with the model's own protocol, and the model as evaluation and prediction run it.

Images are preprocessed with `create_eval_transform(model.data_config)`: the evaluation protocol the weights were
made for (resize 256 + centre crop 224 for the 224 models, squash to 384x384 for the 384 ones, or what a training
run recorded). Evaluation on a dataset is `cvt.evaluate`.

One bad file does not spoil the rest: an image that cannot be read (corrupt, not an image, a FIFO or device named
like one, too large) is listed with its reason, and every other image is predicted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import UnreadableImageError, create_eval_transform, is_image_file, load_image
from .inference import is_optimized, optimize_for_inference
from .model import CvT


def _class_names(model: nn.Module) -> list[str] | None:
    names = getattr(model, "class_names", None)
    return [str(n) for n in names] if names else None


def inference_model(
    model: nn.Module,
    device: str | torch.device = "cpu",
    optimize: bool = True,
    backend: str = "auto",
    batch_size: int | None = None,
    images: int | None = None,
) -> nn.Module:
    """`model` on `device` in eval mode, as `cvt eval` and `cvt predict` run it.

    A `CvT` goes through `cvt.optimize_for_inference(model, backend=backend, batch_size=batch_size, images=images)`
    unless `optimize` is False: the same outputs (float32, 1e-4 relative at most), faster, and less memory.
    `batch_size` is the largest batch that will be passed and `images` how many in all ("auto" decides by them).
    Other modules are used as they are.
    """
    model = model.to(device).eval()
    if optimize and isinstance(model, CvT) and not is_optimized(model):
        return optimize_for_inference(model, backend=backend, batch_size=batch_size, images=images)
    return model


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named in `inputs`; a directory contributes its entries with an image ending, recursively, sorted.

    Entries are listed by name, not opened: one that is not a regular file (a FIFO or a device named x.jpg) is
    listed too, so that reading it reports it instead of leaving it out without a word.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if is_image_file(p) and not p.is_dir()))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no image or directory at {path}")
    if not files:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, inputs))}")
    return files


@torch.no_grad()
def predict_images(
    model: nn.Module,
    images: Sequence[str | os.PathLike],
    *,
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    optimize: bool = True,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """Top-k labels and softmax probabilities for each image file; a file that cannot be read does not stop the
    others.

    `optimize`: run a `CvT` through `cvt.optimize_for_inference` with `backend` (see `inference_model`); False
    runs it as it is.

    Returns:
        One dict per image, in the order given: {"path", "predictions": [{"label", "index", "probability"}, ...]}
        (best first), or {"path", "error"} for a file that cannot be read (see `cvt.data.load_image`).
    """
    transform = create_eval_transform(model.data_config)
    names = _class_names(model)
    paths = [Path(p) for p in images]
    model = inference_model(model, device, optimize, backend, min(batch_size, len(paths)), len(paths))
    k = min(topk, model.num_classes)
    out: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk, tensors = [], []
        for path in paths[start : start + batch_size]:
            entry: dict[str, Any] = {"path": str(path)}
            out.append(entry)
            try:
                tensors.append(transform(load_image(path)))
            except UnreadableImageError as err:
                entry["error"] = err.reason
                continue
            chunk.append(entry)
        if not chunk:
            continue
        probs = model(torch.stack(tensors).to(device)).float().softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for entry, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            entry["predictions"] = [
                {"label": names[i] if names else str(i), "index": i, "probability": p}
                for p, i in zip(values, indices, strict=True)
            ]
    return out
