"""Scan a dataset: decode every image once, list the unreadable ones with the reason, summarise the rest."""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import SPLITS, ImageDataset, open_dataset
from .decode import DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_file, load_image
from .shards import TarShardDataset

logger = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """What a scan found in one split (or the whole dataset when it has no splits).

    Attributes:
        name: the split ("" for none).
        kind: "folder", "csv" or "tar".
        classes: class names in label order.
        per_class: readable images per class name.
        sizes: (width, height) of every readable image.
        unreadable: (file, reason) of every image that failed to decode.
        ignored: files without an image ending inside the class folders.
        stray: image files beside the class folders, in no class (a folder of loose images is not a dataset).
    """

    name: str
    kind: str
    classes: list[str]
    per_class: Counter = field(default_factory=Counter)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return len(self.sizes)

    def layout_problems(self) -> list[str]:
        """Why this does not look like a classification dataset (empty when it does)."""
        problems = []
        if self.stray:
            problems.append(
                f"{len(self.stray)} image file(s) lie outside any class folder, e.g. {self.stray[0]}: a class-folder "
                "dataset keeps every image in ROOT/<class>/ (move them into one, or point at the right folder)"
            )
        if len(self.classes) < 2:
            problems.append(f"only {len(self.classes)} class ({', '.join(self.classes)}): classification needs two")
        return problems

    def size_summary(self) -> str:
        if not self.sizes:
            return "no readable images"
        sizes = np.array(self.sizes)
        area = sizes[:, 0] * sizes[:, 1]
        order = np.argsort(area, kind="stable")
        small, median, large = (sizes[order[i]] for i in (0, len(order) // 2, -1))
        return (
            f"sizes (WxH) smallest {small[0]}x{small[1]}, median {median[0]}x{median[1]}, largest {large[0]}x{large[1]}"
        )


def _decode(job: tuple[str, int | None]) -> tuple[str, tuple[int, int] | None, str]:
    path, max_pixels = job
    try:
        return path, load_image(path, max_pixels=max_pixels).size, ""
    except UnreadableImageError as err:
        return path, None, err.reason


def check_dataset(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 0,
) -> list[SplitReport]:
    """Decode every image of a dataset (every split, unless `split` names one).

    Args:
        source: anything `open_dataset` accepts.
        split: only this split.
        strict: stop at the first unreadable file (raising `UnreadableImageError`).
        max_pixels: decompression-bomb guard.
        workers: decoding processes for folder and CSV datasets (0 or 1: this process).

    Returns:
        One report per split scanned.
    """
    path = Path(source)
    if split is None and path.is_dir():
        splits = [s for s in SPLITS if (path / s).is_dir() or (path / f"{s}.csv").is_file()] or [None]
    else:
        splits = [split]
    reports = []
    for name in splits:
        dataset = open_dataset(source, split=name, strict=strict, max_pixels=max_pixels)
        if isinstance(dataset, TarShardDataset):
            reports.append(_check_tar(dataset, name or ""))
        else:
            reports.append(_check_map(dataset, name or "", strict=strict, workers=workers))
    return reports


def _check_map(dataset: ImageDataset, name: str, *, strict: bool, workers: int) -> SplitReport:
    kind = "csv" if str(dataset.source).endswith(".csv") else "folder"
    report = SplitReport(name, kind, dataset.classes, ignored=list(getattr(dataset, "ignored", [])))
    root = getattr(dataset, "root", None)  # a FolderDataset's: images directly in it belong to no class
    if root is not None:
        report.stray = sorted(str(e.path) for e in os.scandir(root) if e.is_file() and is_image_file(e.name))
    jobs = [(path, dataset.max_pixels) for path, _ in dataset.samples]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_decode, jobs, chunksize=64) if pool else map(_decode, jobs)
        for (file, size, reason), (_, label) in zip(results, dataset.samples, strict=True):
            if size is None:
                if strict:
                    raise UnreadableImageError(file, reason)
                report.unreadable.append((file, reason))
            else:
                report.sizes.append(size)
                report.per_class[dataset.classes[label]] += 1
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return report


def _check_tar(dataset: TarShardDataset, name: str) -> SplitReport:
    report = SplitReport(name, "tar", dataset.classes)
    dataset.verify()  # the manifest's counts and the labels against the shards: an error names the shard
    for image, label in dataset:
        report.sizes.append(image.size)
        report.per_class[report.classes[label] if label < len(report.classes) else str(label)] += 1
    report.unreadable = sorted(dataset.skipped.items())
    return report
