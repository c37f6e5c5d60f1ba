"""Evaluation of a trained model on a dataset with the model's own protocol, and its confusion-matrix plot.

The dataset is preprocessed with `create_eval_transform(model.data_config)` (the evaluation protocol the weights
were made for, or what a training run recorded) and labelled in the model's class order. An image that cannot be
read (corrupt, not an image, a FIFO or device named like one, too large) is left out of every figure and listed
with its reason; every other image is evaluated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import ImageDataset, create_eval_transform, open_dataset
from .engine import evaluate, per_class_accuracy
from .fileio import atomic_write
from .predict import _class_names, inference_model

logger = logging.getLogger(__name__)


def open_eval_dataset(model: nn.Module, data: str | os.PathLike, *, split: str | None = None) -> Any:
    """The dataset at `data` with the model's evaluation transform and the model's class order.

    Args:
        model: the model (its `data_config`, `class_names` and `num_classes` are used).
        data: a dataset `cvt.data.open_dataset` reads; a directory with a `val/` split uses it when `split` is None.
        split: the split to evaluate.

    Raises:
        ValueError: the dataset's class names differ from the model's (or their number, when the model records
            no names).
    """
    path = Path(data)
    if split is None and path.is_dir() and ((path / "val").is_dir() or (path / "val.csv").is_file()):
        split = "val"
    transform = create_eval_transform(model.data_config)
    dataset = open_dataset(data, split=split, transform=transform)
    classes = [str(c) for c in dataset.classes]
    names = _class_names(model)
    if names is None:
        if len(classes) != model.num_classes:
            raise ValueError(
                f"the dataset has {len(classes)} classes, the model {model.num_classes} (and records no class names)"
            )
        logger.warning("the model records no class names: assuming the dataset's sorted classes are its classes")
        return dataset
    if set(classes) != set(names):
        only_data = sorted(set(classes) - set(names))
        only_model = sorted(set(names) - set(classes))
        raise ValueError(
            f"the dataset's class names differ from the model's: only in the data {only_data[:5]}"
            f"{' ...' if len(only_data) > 5 else ''}, only in the model {only_model[:5]}"
            f"{' ...' if len(only_model) > 5 else ''} ({len(classes)} vs {len(names)} classes)"
        )
    if classes != names:  # same names, another order: label the data in the model's order
        dataset = open_dataset(data, split=split, transform=transform, classes=names)
    return dataset


def evaluate_model(
    model: nn.Module,
    data: str | os.PathLike,
    *,
    split: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    optimize: bool = True,
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, top-1/top-5, per-class accuracy and confusion matrix of `model` on the readable images at `data`.

    `optimize`: run a `CvT` through `cvt.optimize_for_inference` with `backend` (see `inference_model`); False
    runs it as it is. `progress`: a progress bar on stderr. Unreadable images are left out of every figure and
    listed under "skipped" (tar shards read by loader workers: counted out exactly, but listed in the log only).

    Returns:
        A JSON-serialisable dict: "count" (readable images evaluated), "loss", "top1", "top5" (percent),
        "classes", "per_class" ({name: {"count", "top1"}}), "confusion" (rows = true class, columns = predicted
        class) and "skipped" ([{"path", "reason"}] of the images that could not be read).
    """
    dataset = open_eval_dataset(model, data, split=split)
    batches = _ReadableBatches(dataset, batch_size=batch_size, num_workers=num_workers)
    model = inference_model(model, device, optimize, backend, min(batch_size, len(dataset)), len(dataset))
    res = evaluate(model, batches, num_classes=model.num_classes, device=device, progress=progress)
    confusion = res["confusion"]
    names = _class_names(model) or [str(c) for c in dataset.classes]
    per_class = {
        name: {"count": int(confusion[i].sum()), "top1": acc}
        for i, (name, acc) in enumerate(zip(names, per_class_accuracy(confusion), strict=True))
    }
    return {
        "count": res["count"],
        "loss": res["loss"],
        "top1": res["top1"],
        "top5": res["top5"],
        "classes": names,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "skipped": [{"path": path, "reason": reason} for path, reason in sorted(batches.skipped.items())],
    }


class _Masked(Dataset):
    """(image, label, readable, path, reason) of a map-style `ImageDataset`: an unreadable image's slot holds the next
    readable one, which keeps the batch's shape, with readable False, so `evaluate` leaves it out."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, bool, str, str]:
        image, label = self.dataset[index]
        path = self.dataset.samples[index][0]
        reason = self.dataset.skipped.get(path)  # this process's record: the worker that decoded it
        return image, label, reason is None, path, reason or ""


class _ReadableBatches:
    """Evaluation batches (images, targets, readable) of `dataset`, collecting the unreadable images' reasons in
    `skipped` ({path: reason}) from whichever loader worker met them. A tar dataset drops them itself."""

    def __init__(self, dataset: Any, *, batch_size: int, num_workers: int) -> None:
        self.dataset = dataset
        self.masked = isinstance(dataset, ImageDataset)
        source = _Masked(dataset) if self.masked else dataset
        self.loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for batch in self.loader:
            if self.masked:
                self.skipped.update((path, why) for path, why in zip(batch[3], batch[4], strict=True) if why)
            yield batch[:3]
        if not self.masked:
            self.skipped.update(getattr(self.dataset, "skipped", {}))


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Write the confusion matrix (rows true, columns predicted, counts in the cells) as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    matrix = torch.as_tensor(confusion)
    n = len(class_names)
    side = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if n <= 50:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 30:
        peak = int(matrix.max()) if matrix.numel() else 0
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                if value:
                    colour = "white" if value > peak / 2 else "black"
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
