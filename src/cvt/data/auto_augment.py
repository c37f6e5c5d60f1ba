"""RandAugment with the semantics of timm's `rand-m9-mstd0.5-inc1`, the policy the CvT authors trained with.

Per image, `n` ops (default 2) are drawn uniformly with replacement from the op set; each is applied with
probability `p` (default 0.5). An applied op draws its magnitude from N(m, mstd) clipped to [0, mmax] (mmax 10 by
default, the level denominator), maps it to its argument linearly (rotate: m/10 * 30 degrees, shear: m/10 * 0.3,
translate: m/10 * 0.45 of the image side, enhance factors 1 +- m/10 * 0.9, ...) and negates signed arguments with
probability 0.5. The "increasing" set (`inc1`) makes posterize and solarize stronger as m grows, like the others.

Geometric ops fill uncovered pixels with the normalisation mean in 0-255 and resample with the training
interpolation (bicubic), as timm's `create_transform` configures them.

All randomness comes from Python's `random` module, so seeding it per sample makes the policy reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # magnitudes are out of 10

_IDENTITY_LUT = list(range(256))


# ---- the ops: (image, *args, fill, resample) -> image ------------------------------------------------------------


def _shear_x(img: Image.Image, factor: float, fill: tuple, resample: int) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, factor, 0, 0, 1, 0), resample, fillcolor=fill)


def _shear_y(img: Image.Image, factor: float, fill: tuple, resample: int) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, factor, 1, 0), resample, fillcolor=fill)


def _translate_x_rel(img: Image.Image, pct: float, fill: tuple, resample: int) -> Image.Image:
    pixels = pct * img.size[0]
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, pixels, 0, 1, 0), resample, fillcolor=fill)


def _translate_y_rel(img: Image.Image, pct: float, fill: tuple, resample: int) -> Image.Image:
    pixels = pct * img.size[1]
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, pixels), resample, fillcolor=fill)


def _rotate(img: Image.Image, degrees: float, fill: tuple, resample: int) -> Image.Image:
    return img.rotate(degrees, resample=resample, fillcolor=fill)  # counter-clockwise for positive degrees


def _auto_contrast(img: Image.Image, fill: tuple, resample: int) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, fill: tuple, resample: int) -> Image.Image:
    return ImageOps.equalize(img)


def _invert(img: Image.Image, fill: tuple, resample: int) -> Image.Image:
    return ImageOps.invert(img)


def _posterize(img: Image.Image, bits: int, fill: tuple, resample: int) -> Image.Image:
    # a LUT rather than ImageOps.posterize, which refuses 0 bits since Pillow 10; 0 bits (reached at magnitude 10
    # of the increasing op) keeps no bit: a black image, as in the PIL versions timm was written against
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in _IDENTITY_LUT] * len(img.getbands()))


def _solarize(img: Image.Image, threshold: int, fill: tuple, resample: int) -> Image.Image:
    return ImageOps.solarize(img, threshold)  # inverts pixels >= threshold; 256 leaves the image as it is


def _solarize_add(img: Image.Image, add: int, fill: tuple, resample: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in _IDENTITY_LUT]
    return img.point(lut * len(img.getbands()))


def _enhance(kind: type) -> Callable[..., Image.Image]:
    def op(img: Image.Image, factor: float, fill: tuple, resample: int) -> Image.Image:
        return kind(img).enhance(factor)

    return op


# ---- magnitude -> argument ---------------------------------------------------------------------------------------


def _negate_half(value: float) -> float:
    return -value if random.random() > 0.5 else value


def _rotate_arg(m: float, _: float) -> tuple:
    return (_negate_half(m / LEVEL_DENOM * 30.0),)


def _shear_arg(m: float, _: float) -> tuple:
    return (_negate_half(m / LEVEL_DENOM * 0.3),)


def _translate_rel_arg(m: float, translate_pct: float) -> tuple:
    return (_negate_half(m / LEVEL_DENOM * translate_pct),)


def _enhance_arg(m: float, _: float) -> tuple:
    return (m / LEVEL_DENOM * 1.8 + 0.1,)  # [0.1, 1.9]; 1.0 (identity) at m = 5


def _enhance_increasing_arg(m: float, _: float) -> tuple:
    return (max(0.1, 1.0 + _negate_half(m / LEVEL_DENOM * 0.9)),)  # 1.0 (identity) at m = 0


def _posterize_arg(m: float, _: float) -> tuple:
    return (int(m / LEVEL_DENOM * 4),)  # keep 0..4 bits: weaker as m grows


def _posterize_increasing_arg(m: float, _: float) -> tuple:
    return (4 - int(m / LEVEL_DENOM * 4),)  # keep 4..0 bits: stronger as m grows


def _solarize_arg(m: float, _: float) -> tuple:
    return (int(m / LEVEL_DENOM * 256),)  # threshold 0..256: weaker as m grows


def _solarize_increasing_arg(m: float, _: float) -> tuple:
    return (256 - int(m / LEVEL_DENOM * 256),)  # threshold 256..0: stronger as m grows


def _solarize_add_arg(m: float, _: float) -> tuple:
    return (int(m / LEVEL_DENOM * 110),)


def _no_arg(m: float, _: float) -> tuple:
    return ()


# name -> (op, magnitude-to-arguments); names as in timm
OPS: dict[str, tuple[Callable[..., Image.Image], Callable[[float, float], tuple]]] = {
    "AutoContrast": (_auto_contrast, _no_arg),
    "Equalize": (_equalize, _no_arg),
    "Invert": (_invert, _no_arg),
    "Rotate": (_rotate, _rotate_arg),
    "Posterize": (_posterize, _posterize_arg),
    "PosterizeIncreasing": (_posterize, _posterize_increasing_arg),
    "Solarize": (_solarize, _solarize_arg),
    "SolarizeIncreasing": (_solarize, _solarize_increasing_arg),
    "SolarizeAdd": (_solarize_add, _solarize_add_arg),
    "Color": (_enhance(ImageEnhance.Color), _enhance_arg),
    "ColorIncreasing": (_enhance(ImageEnhance.Color), _enhance_increasing_arg),
    "Contrast": (_enhance(ImageEnhance.Contrast), _enhance_arg),
    "ContrastIncreasing": (_enhance(ImageEnhance.Contrast), _enhance_increasing_arg),
    "Brightness": (_enhance(ImageEnhance.Brightness), _enhance_arg),
    "BrightnessIncreasing": (_enhance(ImageEnhance.Brightness), _enhance_increasing_arg),
    "Sharpness": (_enhance(ImageEnhance.Sharpness), _enhance_arg),
    "SharpnessIncreasing": (_enhance(ImageEnhance.Sharpness), _enhance_increasing_arg),
    "ShearX": (_shear_x, _shear_arg),
    "ShearY": (_shear_y, _shear_arg),
    "TranslateXRel": (_translate_x_rel, _translate_rel_arg),
    "TranslateYRel": (_translate_y_rel, _translate_rel_arg),
}

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed RandAugment policy string such as "rand-m9-mstd0.5-inc1".

    Attributes:
        magnitude: `m`, the mean magnitude out of 10.
        num_ops: `n`, ops applied per image.
        magnitude_std: `mstd`, std of the gaussian noise on the magnitude per op (0: none; above 100: uniform in
            [0, m], as timm).
        magnitude_max: `mmax`, upper clip of the noisy magnitude (default 10).
        increasing: `inc`, use the increasing-severity op set.
        prob: `p`, probability that each drawn op is applied.
    """

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5

    @classmethod
    def parse(cls, config_str: str) -> RandAugmentConfig:
        """Parse "rand-m9-mstd0.5-inc1" style strings; sections: m, n, mstd, mmax, inc, p (any order).

        Note: timm reads any `inc` value as on (`bool("0")` is True); here `inc0` selects the original op set.

        Raises:
            ValueError: the string does not start with "rand" or holds an unknown or malformed section.
        """
        parts = config_str.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment config {config_str!r} must start with 'rand' (e.g. 'rand-m9-mstd0.5-inc1')")
        keys = {"mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing", "m": "magnitude", "n": "num_ops",
                "p": "prob"}  # fmt: skip
        values: dict[str, float | int | bool] = {}
        for part in parts[1:]:
            key = next((k for k in keys if part.startswith(k) and _is_number(part[len(k) :])), None)
            if key is None:
                raise ValueError(
                    f"RandAugment config {config_str!r}: cannot read section {part!r}; "
                    f"expected one of {', '.join(k + '<number>' for k in keys)}"
                )
            value = float(part[len(key) :])
            if key == "mstd" and value > 100:
                value = math.inf
            values[keys[key]] = bool(value) if key == "inc" else int(value) if key == "n" else value
        return cls(**values)

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class AugmentOp:
    """One RandAugment op with its probability and (noisy) magnitude.

    Args:
        name: a key of `OPS`.
        prob: probability of applying the op.
        magnitude: mean magnitude out of 10.
        magnitude_std: gaussian noise on the magnitude (inf: uniform in [0, magnitude]).
        magnitude_max: upper clip of the magnitude.
        fill: RGB colour for pixels a geometric op uncovers.
        resample: PIL resampling filter for geometric ops.
        translate_pct: translation at magnitude 10, as a fraction of the image side.
    """

    def __init__(
        self,
        name: str,
        *,
        prob: float = 0.5,
        magnitude: float = 10.0,
        magnitude_std: float = 0.0,
        magnitude_max: float = LEVEL_DENOM,
        fill: tuple[int, int, int] = (128, 128, 128),
        resample: int = Image.Resampling.BICUBIC,
        translate_pct: float = 0.45,
    ) -> None:
        if name not in OPS:
            raise ValueError(f"unknown RandAugment op {name!r}; known ops: {', '.join(OPS)}")
        self.name = name
        self.op, self.level_fn = OPS[name]
        self.prob, self.magnitude, self.magnitude_std, self.magnitude_max = (
            prob,
            magnitude,
            magnitude_std,
            magnitude_max,
        )
        self.fill, self.resample, self.translate_pct = tuple(fill), resample, translate_pct

    def magnitude_sample(self) -> float:
        """A magnitude for one application: the mean plus noise, clipped to [0, magnitude_max]."""
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = random.uniform(0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = random.gauss(magnitude, self.magnitude_std)
        return max(0.0, min(magnitude, self.magnitude_max))

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        args = self.level_fn(self.magnitude_sample(), self.translate_pct)
        return self.op(img, *args, fill=self.fill, resample=self.resample)

    def __repr__(self) -> str:
        return f"AugmentOp({self.name}, p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std})"


class RandAugment:
    """Apply `num_ops` ops drawn uniformly with replacement from `ops`.

    Args:
        ops: the candidate ops.
        num_ops: how many to draw per image.
    """

    def __init__(self, ops: list[AugmentOp], num_ops: int = 2) -> None:
        self.ops = ops
        self.num_ops = num_ops

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in random.choices(self.ops, k=self.num_ops):
            img = op(img)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.num_ops}, ops=[{', '.join(op.name for op in self.ops)}])"


def rand_augment_transform(
    config: str | RandAugmentConfig,
    *,
    fill: tuple[int, int, int] = (128, 128, 128),
    resample: int = Image.Resampling.BICUBIC,
    translate_pct: float = 0.45,
) -> RandAugment:
    """Build RandAugment from a policy string ("rand-m9-mstd0.5-inc1") or a parsed config.

    Args:
        config: the policy.
        fill: RGB colour for uncovered pixels (timm: the normalisation mean * 255, rounded).
        resample: resampling filter of the geometric ops (timm: the training interpolation).
        translate_pct: translation at magnitude 10 as a fraction of the image side.
    """
    cfg = RandAugmentConfig.parse(config) if isinstance(config, str) else config
    ops = [
        AugmentOp(
            name,
            prob=cfg.prob,
            magnitude=cfg.magnitude,
            magnitude_std=cfg.magnitude_std,
            magnitude_max=cfg.magnitude_max,
            fill=fill,
            resample=resample,
            translate_pct=translate_pct,
        )
        for name in cfg.op_names
    ]
    return RandAugment(ops, cfg.num_ops)
