"""scikit-learn's handwritten digits as an image dataset: class folders with a fixed stratified 80/20 split.

`sklearn.datasets.load_digits` holds 1,797 real 8x8 scans of handwritten digits (grey levels 0-16, 10 classes,
bundled with scikit-learn: nothing is downloaded). `make_digits` writes each one as a greyscale PNG, its grey level
scaled to 0-255 and the image upscaled to `image_size` pixels with PIL's bilinear filter (by default), under
`root/train/<digit>/` and `root/val/<digit>/`, each file named by the image's index in `load_digits` (`00042.png`).

The split is a rule, not a random draw, so it is the same on every machine and every library version: within each
class, in `load_digits` order, every fifth image (the class's 5th, 10th, 15th, ...) goes to val and the rest to
train. That is `n // 5` val images of a class of `n`: 355 val and 1,442 train images in all.

    cvt make-dataset --kind digits data/digits     # a second or two; needs scikit-learn (the `digits` extra)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .._optional import require
from ..fileio import write_json
from .manifest import MANIFEST, prepare_tree
from .transforms import pil_interpolation

logger = logging.getLogger(__name__)

VERSION = 1  # bumped whenever the files change (split rule, scaling): older trees are rewritten
VAL_EVERY = 5  # every fifth image of a class goes to val: a fixed 80/20 split
MAX_LEVEL = 16  # load_digits' grey levels are 0..16 (ink counts of the 4x4 blocks of a 32x32 bitmap)
RESAMPLE = ("nearest", "bilinear", "bicubic")  # the filters offered here (`pil_interpolation` maps them)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) of grey levels 0-16 and their labels (1797,).

    Raises:
        MissingExtraError: scikit-learn is not installed; the message names the extra that installs it.
    """
    datasets = require("sklearn.datasets", package="scikit-learn", extra="digits", purpose="the digits dataset")
    bunch = datasets.load_digits()
    return bunch.images, bunch.target


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split: (train indices, val indices), each ascending.

    Within each class, in the given order, every `VAL_EVERY`-th image goes to val.
    """
    labels = np.asarray(labels)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        is_val[members[VAL_EVERY - 1 :: VAL_EVERY]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def digit_image(pixels: np.ndarray, image_size: int = 32, resample: str = "bilinear") -> Image.Image:
    """One 8x8 scan as a greyscale image: levels 0-16 scaled to 0-255, upscaled to `image_size` pixels."""
    grey = np.rint(np.asarray(pixels, dtype=np.float64) * (255 / MAX_LEVEL)).astype(np.uint8)
    image = Image.fromarray(grey)  # (8, 8) uint8 -> mode "L"
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), pil_interpolation(resample))


def make_digits(
    root: str | os.PathLike,
    *,
    image_size: int = 32,
    resample: str = "bilinear",
    overwrite: bool = False,
) -> Path:
    """Write scikit-learn's digits to `root/train/<digit>/` and `root/val/<digit>/` with the fixed split.

    Args:
        root: output directory; must be empty, absent, or a digits tree this function made.
        image_size: side of the written images in pixels (>= 8; 8 keeps the scans as they are).
        resample: upscaling filter: "bilinear" (default), "bicubic" or "nearest" (4x4 blocks at 32 px).
        overwrite: replace a digits tree this function made earlier with other arguments.

    Returns:
        `root`. If `root` already holds a complete tree made with the same arguments, nothing is written.

    Raises:
        ValueError: bad arguments, or `root` holds other files.
        ImportError: scikit-learn is not installed.
    """
    root = Path(root)
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels (the scans are 8x8), got {image_size}")
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample filter {resample!r}; choose one of {', '.join(RESAMPLE)}")
    params = {
        "generator": "cvt.data.make_digits",
        "version": VERSION,
        "image_size": image_size,
        "resample": resample,
        "split": f"every {VAL_EVERY}th image of each class in load_digits order -> val",
    }
    manifest_path = root / MANIFEST
    if prepare_tree(root, params, overwrite=overwrite, what="a digits tree"):
        return root

    images, labels = load_digits_arrays()
    write_json({**params, "complete": False}, manifest_path)
    counts = {}
    for split, indices in zip(("train", "val"), digits_split(labels), strict=True):
        for index in indices:
            folder = root / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            digit_image(images[index], image_size, resample).save(folder / f"{index:05d}.png")
        counts[split] = len(indices)
    import sklearn  # noqa: PLC0415 (optional dependency, present: load_digits_arrays imported it)

    classes = [str(c) for c in np.unique(labels)]
    done = {"complete": True, "classes": classes, "images": counts, "sklearn": sklearn.__version__}
    write_json({**params, **done}, manifest_path)
    logger.info("wrote %d train and %d val digits to %s", counts["train"], counts["val"], root)
    return root
