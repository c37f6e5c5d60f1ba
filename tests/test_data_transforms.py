"""Training and evaluation transforms: shapes, value ranges, geometry against hand-computed positions, switches."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cvt.config import DataConfig
from cvt.data import RandomErasing, RandomResizedCrop, create_eval_transform, create_train_transform, rng_scope
from cvt.data.transforms import CenterCrop, ColorJitter, ResizeShorter

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ramp(w: int, h: int) -> Image.Image:
    """Red channel = x * 255 / (w - 1) (a horizontal ramp), green and blue 0."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.rint(np.arange(w) * 255 / (w - 1))[None, :]
    return Image.fromarray(arr)


def _normalised_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def test_train_transform_shape_and_range():
    t = create_train_transform(64, re_prob=0.0)
    lo, hi = _normalised_bounds()
    for seed in range(8):
        with rng_scope(seed):
            x = t(_noise(97, 71, seed))
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()


def test_train_transform_non_square_and_tiny_input():
    t = create_train_transform((48, 80))
    assert t(_noise(300, 200)).shape == (3, 48, 80)
    assert t(Image.new("RGB", (1, 1), (9, 9, 9))).shape == (3, 48, 80)  # a 1x1 image is upsampled
    assert t(Image.new("RGB", (3, 200))).shape == (3, 48, 80)  # extreme aspect: centre-crop fallback


def test_train_transform_is_deterministic_under_a_seed():
    t = create_train_transform(64)
    img = _noise(120, 90)
    with rng_scope(123):
        a = t(img)
    with rng_scope(123):
        b = t(img)
    with rng_scope(124):
        c = t(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_transform_parts_and_switches():
    names = [type(s).__name__ for s in create_train_transform(224).transforms]
    # colour jitter is configured (0.4) but not used while RandAugment is on, as in the authors' recipe
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToNormalizedTensor", "RandomErasing"]
    names = [type(s).__name__ for s in create_train_transform(224, auto_augment=None).transforms]
    assert "ColorJitter" in names and "RandAugment" not in names
    off = create_train_transform(32, scale=None, hflip=0, auto_augment=None, color_jitter=None, re_prob=0)
    assert [type(s).__name__ for s in off.transforms] == ["Resize", "ToNormalizedTensor"]
    img = _noise(32, 32)
    expected = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) / 255.0 - torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(off(img), expected / torch.tensor(STD).view(3, 1, 1), atol=1e-6)


def test_random_resized_crop_params_respect_scale_and_ratio():
    crop = RandomResizedCrop(64)
    img = _noise(200, 150)
    random.seed(0)
    areas, ratios = [], []
    for _ in range(500):
        top, left, h, w = crop.get_params(img)
        assert 0 <= top <= 150 - h and 0 <= left <= 200 - w
        areas.append(h * w / (200 * 150))
        ratios.append(w / h)
    # rounding of w and h to whole pixels widens the bounds slightly
    assert min(areas) >= 0.08 * 0.9 and max(areas) <= 1.0
    assert min(ratios) >= 0.75 * 0.93 and max(ratios) <= 4 / 3 / 0.93
    assert min(areas) < 0.15 and max(areas) > 0.8  # the whole range is used


def test_random_resized_crop_fallback_is_central():
    # a 1000x10 strip: no crop with ratio <= 4/3 and area >= 8% fits, so the centre 13x10 is taken
    crop = RandomResizedCrop(8, scale=(0.5, 1.0))
    assert crop.get_params(Image.new("RGB", (1000, 10))) == (0, (1000 - 13) // 2, 10, 13)


def test_random_erasing_box_area_and_pixel_noise():
    erase = RandomErasing(1.0, mode="const")
    random.seed(0)
    fractions, aspects = [], []
    for _ in range(300):
        x = erase(torch.ones(3, 60, 80))
        rows, cols = torch.nonzero(x[0] == 0, as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == len(rows)  # one solid box
        fractions.append(h * w / (60 * 80))
        aspects.append(h / w)
    assert min(fractions) >= 0.02 * 0.85 and max(fractions) <= 1 / 3 * 1.1
    assert min(aspects) >= 0.3 * 0.8 and max(aspects) <= 1 / 0.3 * 1.2
    pixel = RandomErasing(1.0, mode="pixel")
    torch.manual_seed(0)
    random.seed(1)
    noise = pixel(torch.full((3, 200, 200), 100.0))
    erased = noise[noise != 100.0]
    assert erased.numel() > 0.02 * 3 * 200 * 200
    assert abs(erased.mean().item()) < 0.05 and abs(erased.std().item() - 1.0) < 0.05  # standard normal
    assert RandomErasing(0.0)(torch.ones(3, 8, 8)).eq(1).all()


def test_colour_jitter_changes_values_within_bounds():
    random.seed(0)
    torch.manual_seed(0)
    img = Image.new("RGB", (8, 8), (100, 100, 100))
    out = np.asarray(ColorJitter(0.4, 0.0, 0.0)(img))
    assert 60 <= out[0, 0, 0] <= 140 and out[0, 0, 0] != 100  # brightness factor in [0.6, 1.4]


def test_eval_center_geometry_by_hand():
    # 400x200 ramp -> shorter side 256 (224 / 0.875): 512x256, scale 1.28 -> centre crop 224: left offset 144.
    # Output column j samples source x = (144 + j + 0.5) / 1.28 - 0.5, whose ramp value is x * 255 / 399.
    cfg = DataConfig(input_size=(224, 224), crop_mode="center", crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1))
    x = create_eval_transform(cfg)(_ramp(400, 200))
    assert x.shape == (3, 224, 224)
    for j in (0, 60, 112, 223):
        source_x = (144 + j + 0.5) / 1.28 - 0.5
        assert abs(x[0, 100, j].item() - source_x / 399) < 1.5 / 255, j
    assert x[1:].abs().max() < 1e-6


def test_eval_squash_geometry_by_hand():
    cfg = DataConfig(input_size=(384, 384), crop_mode="squash", crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    x = create_eval_transform(cfg)(_ramp(400, 200))
    assert x.shape == (3, 384, 384)
    for j in (10, 192, 370):
        source_x = (j + 0.5) * 400 / 384 - 0.5
        assert abs(x[0, 50, j].item() - source_x / 399) < 1.5 / 255, j


def test_eval_transform_steps_and_normalisation():
    t = create_eval_transform(DataConfig())
    assert repr(t.transforms[0]) == "ResizeShorter(256, bicubic)" and repr(t.transforms[1]) == "CenterCrop((224, 224))"
    x = t(Image.new("RGB", (300, 300), (255, 0, 128)))
    expected = [(1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    assert torch.allclose(x[:, 112, 112], torch.tensor(expected), atol=1e-5)
    assert create_eval_transform(DataConfig())(Image.new("RGB", (1, 1))).shape == (3, 224, 224)  # tiny input
    assert create_eval_transform(DataConfig(input_size=(64, 96)))(_noise(50, 70)).shape == (3, 64, 96)


def test_resize_shorter_and_center_crop_sizes():
    assert ResizeShorter(256)(Image.new("RGB", (500, 375))).size == (341, 256)  # int(256 * 500 / 375) = 341
    assert ResizeShorter(256)(Image.new("RGB", (375, 500))).size == (256, 341)
    assert CenterCrop(224)(Image.new("RGB", (341, 256))).size == (224, 224)


def test_unknown_interpolation_is_rejected():
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        create_train_transform(32, interpolation="cubic")


def test_random_interpolation_is_accepted():
    assert create_train_transform(16, interpolation="random")(_noise(30, 30)).shape == (3, 16, 16)


def test_flip_probability():
    t = create_train_transform(8, scale=None, auto_augment=None, color_jitter=None, re_prob=0)
    img = _ramp(8, 8)  # the ramp's left end is 0, its right end 1: a flipped image starts at 1
    flips = 0
    for seed in range(400):
        with rng_scope(seed):
            x = t(img)
        flips += int(x[0, 0, 0] * STD[0] + MEAN[0] > 0.5)
    assert abs(flips / 400 - 0.5) < 0.08


def test_log_uniform_aspect_of_crop():
    crop = RandomResizedCrop(16, scale=(0.2, 0.2))
    random.seed(5)
    logs = [math.log(w / h) for _, _, h, w in (crop.get_params(Image.new("RGB", (500, 500))) for _ in range(2000))]
    # uniform in [log 3/4, log 4/3]: mean 0, std (2 * log 4/3) / sqrt(12) = 0.1661
    assert abs(np.mean(logs)) < 0.01 and abs(np.std(logs) - 0.1661) < 0.01


def test_output_is_contiguous_channels_first():
    x = create_eval_transform(DataConfig(input_size=(16, 16)))(_noise(20, 20))
    assert x.is_contiguous() and x.stride() == (256, 16, 1)
