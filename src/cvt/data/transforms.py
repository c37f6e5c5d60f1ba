"""Training and evaluation transforms: PIL image in, normalised float tensor (C, H, W) out.

The training transform is the recipe the CvT authors ran through timm's `create_transform`:
RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip -> RandAugment "rand-m9-mstd0.5-inc1"
(colour jitter 0.4 is configured but unused while RandAugment is on) -> to tensor and normalise -> random erasing
(p 0.25, per-pixel normal noise, one box of 2%-33% of the area, log-uniform aspect 0.3-3.3).

The evaluation transform follows a model's `DataConfig`: "center" resizes the shorter side to
floor(size / crop_pct) (224 / 0.875 = 256) and crops the centre; "squash" resizes the whole image to the input size.

Randomness comes from Python's `random` (crop, flip, RandAugment, erasing boxes) and torch's global generator
(erasing noise, jitter order), so seeding both per sample reproduces a sample exactly (see `seeding.rng_scope`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..config import DataConfig
from .auto_augment import rand_augment_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL's filters by name; their values are the codes transformers' image processors record ("resample": 3)
INTERPOLATIONS = {name: Image.Resampling[name.upper()] for name in ("nearest", "bilinear", "bicubic", "lanczos", "box",
                                                                    "hamming")}  # fmt: skip


def pil_interpolation(name: str) -> int:
    """PIL resampling filter for a name such as "bicubic"; unknown names list the valid ones."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: object) -> object:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"    {t!r},\n" for t in self.transforms) + ")"


class RandomResizedCrop:
    """Crop a random area fraction in `scale` with a log-uniform aspect ratio in `ratio`, resize to `size`.

    Ten attempts at a crop that fits, then a centre crop with the aspect ratio clamped into `ratio`
    (the torchvision / timm rule). Works for images smaller than `size` (they are upsampled).

    Args:
        size: output (height, width) or one int for a square.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
        interpolation: resampling filter name, or "random" for bilinear or bicubic at random (timm).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
    ) -> None:
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop needs 0 < min <= max for scale {scale} and ratio {ratio}")
        self.size = _pair(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        if interpolation != "random":
            pil_interpolation(interpolation)

    def get_params(self, img: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        width, height = img.size
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = random.uniform(*self.scale) * area
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(img)
        name = random.choice(("bilinear", "bicubic")) if self.interpolation == "random" else self.interpolation
        out_h, out_w = self.size
        return img.crop((left, top, left + w, top + h)).resize((out_w, out_h), pil_interpolation(name))

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, {self.interpolation})"


class RandomHorizontalFlip:
    """Mirror left-right with probability `p`."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s], applied in random order.

    Only used when RandAugment is off, as in the authors' recipe.

    Args:
        brightness: strength s of the brightness change.
        contrast: strength of the contrast change.
        saturation: strength of the saturation change.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4) -> None:
        self.strengths = (
            (ImageEnhance.Brightness, brightness),
            (ImageEnhance.Contrast, contrast),
            (ImageEnhance.Color, saturation),
        )

    def __call__(self, img: Image.Image) -> Image.Image:
        for i in torch.randperm(len(self.strengths)).tolist():
            kind, strength = self.strengths[i]
            if strength > 0:
                img = kind(img).enhance(random.uniform(max(0.0, 1 - strength), 1 + strength))
        return img

    def __repr__(self) -> str:
        return f"ColorJitter({', '.join(str(s) for _, s in self.strengths)})"


class ToNormalizedTensor:
    """PIL RGB image -> float tensor (3, H, W): scaled to [0, 1], then (x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        array = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)  # (H, W, 3) -> (3, H, W)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomErasing:
    """Erase random boxes of a normalised tensor (C, H, W), timm's RandomErasing.

    With probability `probability`, `count` boxes (1 by default) are placed; each tries 10 times for an area
    fraction uniform in [min_area, max_area] / count and a log-uniform aspect in [min_aspect, max_aspect] that fits.

    Args:
        probability: chance that an image is erased at all.
        min_area: smallest box area as a fraction of the image.
        max_area: largest box area as a fraction of the image.
        min_aspect: smallest height / width of a box; the largest is 1 / min_aspect unless given.
        max_aspect: largest height / width.
        mode: "pixel" (a standard normal per pixel and channel), "rand" (one normal colour per box) or
            "const" (zeros, the normalised mean).
        min_count: fewest boxes.
        max_count: most boxes (a uniform count in [min_count, max_count]).
    """

    def __init__(
        self,
        probability: float = 0.25,
        *,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        mode: str = "pixel",
        min_count: int = 1,
        max_count: int | None = None,
    ) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"RandomErasing mode {mode!r} is not 'pixel', 'rand' or 'const'")
        self.probability = probability
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.mode = mode
        self.min_count, self.max_count = min_count, max_count or min_count

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if random.random() > self.probability:
            return x
        chans, height, width = x.shape
        area = height * width
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count, self.max_count)
        for _ in range(count):
            for _ in range(10):
                target_area = random.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < width and h < height:
                    top, left = random.randint(0, height - h), random.randint(0, width - w)
                    x[:, top : top + h, left : left + w] = self._pixels((chans, h, w), x.dtype)
                    break
        return x

    def _pixels(self, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.empty(shape, dtype=dtype).normal_()
        if self.mode == "rand":
            return torch.empty((shape[0], 1, 1), dtype=dtype).normal_()
        return torch.zeros((shape[0], 1, 1), dtype=dtype)

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.probability}, mode={self.mode}, count={self.min_count}-{self.max_count})"


class ResizeShorter:
    """Resize so the shorter side is `size`, keeping the aspect ratio (the longer side is truncated to int)."""

    def __init__(self, size: int, interpolation: str = "bicubic") -> None:
        self.size, self.interpolation = int(size), interpolation
        self.resample = pil_interpolation(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        if width <= height:
            new = (self.size, int(self.size * height / width))
        else:
            new = (int(self.size * width / height), self.size)
        return img if new == img.size else img.resize(new, self.resample)

    def __repr__(self) -> str:
        return f"ResizeShorter({self.size}, {self.interpolation})"


class Resize:
    """Resize to exactly (height, width), ignoring the aspect ratio."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bicubic") -> None:
        self.size, self.interpolation = _pair(size), interpolation
        self.resample = pil_interpolation(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        new = (self.size[1], self.size[0])
        return img if new == img.size else img.resize(new, self.resample)

    def __repr__(self) -> str:
        return f"Resize({self.size}, {self.interpolation})"


class CenterCrop:
    """Crop the centre (height, width); offsets round half to even like torchvision."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        height, width = self.size
        top = int(round((img.size[1] - height) / 2.0))
        left = int(round((img.size[0] - width) / 2.0))
        return img.crop((left, top, left + width, top + height))  # PIL pads with black outside the image

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def create_train_transform(
    input_size: int | Sequence[int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = 0.4,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The authors' training transform; every part can be switched off.

    Args:
        input_size: output size, int or (height, width).
        scale: RandomResizedCrop area range; None skips the crop and resizes to `input_size`.
        ratio: RandomResizedCrop aspect range.
        hflip: horizontal flip probability (0: off).
        auto_augment: RandAugment policy string; None or "" for none.
        color_jitter: brightness/contrast/saturation strength, used only when `auto_augment` is off (None or 0: off).
        re_prob: random-erasing probability (0: off).
        re_mode: random-erasing fill, "pixel", "rand" or "const".
        re_count: boxes per erased image.
        interpolation: resampling filter for the crop and RandAugment's geometric ops.
        mean: normalisation mean.
        std: normalisation std.

    Returns:
        A callable PIL image -> float tensor (3, H, W).
    """
    size = _pair(input_size)
    steps: list[Callable] = [
        RandomResizedCrop(size, scale, ratio, interpolation) if scale is not None else Resize(size, interpolation)
    ]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if auto_augment:
        resample = pil_interpolation("bicubic" if interpolation == "random" else interpolation)
        fill = tuple(min(255, round(255 * m)) for m in mean)
        steps.append(rand_augment_transform(auto_augment, fill=fill, resample=resample))
    elif color_jitter:
        steps.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    steps.append(ToNormalizedTensor(mean, std))
    if re_prob > 0:
        steps.append(RandomErasing(re_prob, mode=re_mode, max_count=re_count))
    return Compose(steps)


def create_eval_transform(data_config: DataConfig) -> Compose:
    """The evaluation transform of a model's `DataConfig`.

    "center": resize the shorter side to floor(size / crop_pct), centre crop `input_size` (for a non-square
    input size both sides are resized to floor(side / crop_pct), as timm does). "squash": resize to `input_size`.

    Returns:
        A callable PIL image -> float tensor (3, H, W).
    """
    height, width = data_config.input_size
    interp = data_config.interpolation
    if data_config.crop_mode == "squash":
        steps: list[Callable] = [Resize((height, width), interp)]
    else:
        if height == width:
            resize: Callable = ResizeShorter(math.floor(height / data_config.crop_pct), interp)
        else:
            resize = Resize(
                (math.floor(height / data_config.crop_pct), math.floor(width / data_config.crop_pct)), interp
            )
        steps = [resize, CenterCrop((height, width))]
    return Compose([*steps, ToNormalizedTensor(data_config.mean, data_config.std)])
