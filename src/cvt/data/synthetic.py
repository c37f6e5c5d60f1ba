"""A generated classification dataset ("shapes"): real JPEG and PNG files in the class-per-folder layout.

Each image shows one large object on a cluttered background. The class is the object's outline (disk, ring,
square, frame, triangle, cross, star, crescent, L, T, arrow) and, for some classes, its surface texture (solid,
stripes, checker): "square" and "square-stripes" differ only in texture, "disk" and "ring" only in the hole.
Colours are drawn at random for every object, background and distractor, independently of the class, so colour
alone predicts nothing; position, size (radius 28%-42% of the side), rotation, clutter (a gentle colour gradient,
2-5 small discs, boxes and lines near the background colour, sometimes a line across the object), JPEG quality and
noise vary too. Stripes and checks are 5.5-7.5 pixels wide at 64x64, coarse enough for a stride-4 patch
embedding. The object differs from what lies under it in brightness as well as in colour (whenever 40 draws find
such a colour).

Everything is drawn from a seed per (seed, split, class, index), so a dataset is identical bit for bit whatever
the number of processes, and `make_dataset` can be called again on a finished directory at no cost.

    cvt make-dataset data/shapes            # 10 classes, 300 + 50 images per class, 64x64: a few seconds
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import write_json
from .manifest import MANIFEST, prepare_tree

logger = logging.getLogger(__name__)

VERSION = 3  # bumped whenever the drawing changes: older datasets are redrawn
SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down: smooth, anti-aliased edges

Point = tuple[float, float]


# ---- outlines: polygons in a unit frame (radius 1 around the origin), or mask painters --------------------------


def _regular(n: int, phase: float = 0.0) -> list[Point]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[Point]:
    return [
        (r * math.cos(math.pi * k / points - math.pi / 2), r * math.sin(math.pi * k / points - math.pi / 2))
        for k, r in ((k, 1.0 if k % 2 == 0 else inner) for k in range(2 * points))
    ]


_S = 1 / math.sqrt(2)  # shapes drawn in the square [-1, 1]^2 are scaled by this to fit the unit circle
_POLYGONS: dict[str, list[Point]] = {
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "star": _star(),
    "cross": [(x * 0.95, y * 0.95) for x, y in [
        (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
        (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
    ]],
    "ell": [(x * _S, y * _S) for x, y in [(-1, -1), (-0.25, -1), (-0.25, 0.3), (1, 0.3), (1, 1), (-1, 1)]],
    "tee": [(x * _S, y * _S) for x, y in [
        (-1, -1), (1, -1), (1, -0.3), (0.35, -0.3), (0.35, 1), (-0.35, 1), (-0.35, -0.3), (-1, -0.3),
    ]],
    "arrow": [(-1, -0.28), (0.15, -0.28), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.28), (-1, 0.28)],
}  # fmt: skip
_HOLLOW = {"ring": "disk", "frame": "square"}  # outline with a hole of 0.55 times its size
OUTLINES = ("disk", "ring", "square", "frame", "triangle", "cross", "star", "crescent", "ell", "tee", "arrow")
FILLS = ("solid", "stripes", "checker")

# The first ten are the demo's classes; the rest follow in a fixed order, up to every outline x fill.
_FIRST = (
    ("disk", "solid"), ("ring", "solid"), ("square", "solid"), ("frame", "solid"), ("triangle", "solid"),
    ("cross", "solid"), ("star", "solid"), ("crescent", "solid"), ("square", "stripes"), ("disk", "checker"),
)  # fmt: skip
CLASS_TABLE: tuple[tuple[str, str], ...] = _FIRST + tuple(
    (outline, fill) for fill in FILLS for outline in OUTLINES if (outline, fill) not in _FIRST
)
MAX_CLASSES = len(CLASS_TABLE)


def class_name(outline: str, fill: str) -> str:
    return outline if fill == "solid" else f"{outline}-{fill}"


def shape_classes(num_classes: int) -> list[tuple[str, str]]:
    """The (outline, fill) pairs of the first `num_classes` classes."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be between 2 and {MAX_CLASSES}, got {num_classes}")
    return list(CLASS_TABLE[:num_classes])


def _draw_outline(draw: ImageDraw.ImageDraw, outline: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Paint the outline's mask (255 inside) centred at (cx, cy) with radius r, rotated by `angle` radians."""
    cos, sin = math.cos(angle), math.sin(angle)

    def place(points: list[Point], scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> list[Point]:
        return [
            (cx + r * scale * (x * cos - y * sin) + dx, cy + r * scale * (x * sin + y * cos) + dy) for x, y in points
        ]

    if outline in _HOLLOW:
        _draw_outline(draw, _HOLLOW[outline], cx, cy, r, angle)
        inner = 0.55 * r
        if outline == "ring":
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
        else:
            draw.polygon(place(_POLYGONS["square"], 0.55), fill=0)
    elif outline == "disk":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif outline == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        bx, by = cx + 0.55 * r * cos, cy + 0.55 * r * sin
        draw.ellipse((bx - 0.85 * r, by - 0.85 * r, bx + 0.85 * r, by + 0.85 * r), fill=0)
    else:
        draw.polygon(place(_POLYGONS[outline]), fill=255)


def _texture(fill: str, size: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """(size, size) weights in [0, 1] of the second colour: 0 everywhere for solid, else rotated stripes/checks."""
    if fill == "solid":
        return np.zeros((size, size), np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phi = rng.uniform(0, math.pi)
    u = x * math.cos(phi) + y * math.sin(phi)
    # width of one stripe or check: 5.5-7.5 pixels at 64, two to three tokens of the model's stride-4 embedding
    period = rng.uniform(5.5, 7.5) * scale
    wave = np.sin(math.pi * u / period + rng.uniform(0, 2 * math.pi))
    if fill == "checker":
        v = -x * math.sin(phi) + y * math.cos(phi)
        wave = wave * np.sin(math.pi * v / period + rng.uniform(0, 2 * math.pi))
    return (0.5 + 0.5 * np.tanh(4.0 * wave)).astype(np.float32)  # a square wave with soft edges


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _colour(rng: np.random.Generator, avoid: list[np.ndarray], min_distance: float = 110.0, min_luma: float = 80.0):
    """A random RGB colour that differs from each colour in `avoid` by at least `min_distance` (RGB) and
    `min_luma` (luminance), so edges show in brightness, not only in hue; the best of 40 tries otherwise."""
    best, best_score = None, -math.inf
    for _ in range(40):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        score = min(
            (
                min(float(np.linalg.norm(colour - a)) / min_distance, abs(float((colour - a) @ _LUMA)) / min_luma)
                for a in avoid
            ),
            default=math.inf,
        )
        if score >= 1.0:
            return colour
        if score > best_score:
            best, best_score = colour, score
    return best


def _clutter(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    size: int,
    count: int,
    near: np.ndarray | None = None,
    kinds: int = 3,
) -> None:
    """`count` small distractors: discs, boxes and thin lines (only lines with kinds=1), in random colours or,
    with `near`, in colours within +-70 of it per channel (visible but less salient than the object)."""
    scale = size / 64
    for _ in range(count):
        if near is None:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        else:
            colour = tuple(int(c) for c in np.clip(near + rng.uniform(-70, 70, 3), 0, 255))
        kind = 2 - int(rng.integers(0, kinds))
        x, y = rng.uniform(0, size, 2)
        if kind == 0:  # a small disc
            radius = rng.uniform(1.5, 4.0) * scale
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        elif kind == 1:  # a small box
            w, h = rng.uniform(2.0, 7.0, 2) * scale
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:  # a thin line
            length, angle = rng.uniform(8, 22) * scale, rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line((x, y, *end), fill=colour, width=max(1, round(scale)))


def render(outline: str, fill: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of class (outline, fill) at `size` x `size` with randomness from `rng`."""
    return render_with_mask(outline, fill, size, rng)[0]


def render_with_mask(outline: str, fill: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """`render`'s image and the object's mask, (size, size) bool: the pixels more than half covered by it (a line
    drawn across the object afterwards is not taken out). The same draws as `render`."""
    scale = size / 64
    # background: a random colour with a gentle linear gradient (up to +-50 per channel across the image)
    base = rng.integers(0, 256, 3).astype(np.float32)
    other = np.clip(base + rng.uniform(-50, 50, 3), 0, 255)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    phi = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (x - 0.5) * math.cos(phi) + (y - 0.5) * math.sin(phi), 0, 1)[..., None]
    background = Image.fromarray(np.uint8(base * (1 - t) + other * t))
    _clutter(ImageDraw.Draw(background), rng, size, int(rng.integers(2, 6)), near=base)
    canvas = np.asarray(background, dtype=np.float32)

    # the object: radius 28%-42% of the side, centre kept so at least ~85% of it is inside the frame
    radius = rng.uniform(0.28, 0.42) * size
    cx, cy = rng.uniform(0.85 * radius, size - 0.85 * radius, 2)
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    angle = rng.uniform(0, 2 * math.pi)
    _draw_outline(ImageDraw.Draw(big), outline, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE, angle)
    alpha = np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0

    under = canvas[alpha[..., 0] > 0.5].mean(axis=0) if (alpha > 0.5).any() else canvas.mean(axis=(0, 1))
    first = _colour(rng, [under])
    second = _colour(rng, [under, first])
    weight = _texture(fill, size, rng, scale)[..., None]
    surface = first * (1 - weight) + second * weight
    image = canvas * (1 - alpha) + surface * alpha
    image += rng.normal(0, rng.uniform(0, 4), image.shape)
    out = Image.fromarray(np.uint8(np.clip(np.rint(image), 0, 255)))
    if rng.random() < 0.15:  # sometimes a thin line crosses the object
        _clutter(ImageDraw.Draw(out), rng, size, 1, kinds=1)
    return out, alpha[..., 0] > 0.5


def _image_rng(seed: int, split: int, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, label, index]))


def _write_class(job: tuple[Path, int, int, str, str, int, int, int]) -> int:
    """Render and write the images of one (split, class); returns how many were written."""
    folder, split_id, label, outline, fill, count, size, seed = job
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = _image_rng(seed, split_id, label, index)
        image = render(outline, fill, size, rng)
        if rng.random() < 0.25:
            image.save(folder / f"{index:05d}.png", optimize=False)
        else:
            image.save(folder / f"{index:05d}.jpg", quality=int(rng.integers(80, 96)))
    return count


def make_dataset(
    root: str | os.PathLike,
    *,
    num_classes: int = 10,
    train_per_class: int = 300,
    val_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the generated dataset to `root/train/<class>/` and `root/val/<class>/`, with a manifest.

    Args:
        root: output directory; must be empty, absent, or a dataset this function made.
        num_classes: classes, 2 to `MAX_CLASSES` (the first ten are the demo's).
        train_per_class: training images per class.
        val_per_class: validation images per class.
        image_size: side of the square images in pixels (>= 16).
        seed: the dataset's seed; the same arguments give identical files.
        num_workers: processes to draw with (0 or 1: this process).
        overwrite: replace a dataset this function made earlier with different arguments.

    Returns:
        `root`. If `root` already holds a complete dataset made with the same arguments, nothing is written.

    Raises:
        ValueError: bad arguments, or `root` holds other files.
    """
    root = Path(root)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError(f"need train_per_class >= 1 and val_per_class >= 0, got {train_per_class}, {val_per_class}")
    pairs = shape_classes(num_classes)
    classes = [class_name(*pair) for pair in pairs]
    params = {
        "generator": "cvt.data.make_dataset",
        "version": VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    manifest_path = root / MANIFEST
    if prepare_tree(root, params, overwrite=overwrite, what="a generated dataset"):
        return root

    write_json({**params, "complete": False}, manifest_path)
    jobs = [
        (root / split / name, split_id, label, outline, fill, count, image_size, seed)
        for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class)))
        if count > 0
        for label, (name, (outline, fill)) in enumerate(zip(classes, pairs, strict=True))
    ]
    run: Callable = map
    if num_workers > 1:
        pool = ProcessPoolExecutor(num_workers)
        run = pool.map
    try:
        written = sum(run(_write_class, jobs))
    finally:
        if num_workers > 1:
            pool.shutdown()
    write_json({**params, "complete": True, "classes": sorted(classes), "images": written}, manifest_path)
    logger.info("wrote %d images of %d classes to %s", written, num_classes, root)
    return root
