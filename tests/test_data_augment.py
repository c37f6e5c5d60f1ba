"""RandAugment: policy parsing, magnitude -> argument mapping by hand, m0 identity, noise, probability, op draws."""

import random

import numpy as np
import pytest
from PIL import Image

from cvt.data import RandAugmentConfig, rand_augment_transform
from cvt.data.auto_augment import OPS, RAND_INCREASING_TRANSFORMS, AugmentOp


def _noise(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_parse_the_papers_policy():
    cfg = RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")
    assert (cfg.magnitude, cfg.magnitude_std, cfg.increasing, cfg.num_ops, cfg.prob, cfg.magnitude_max) == (
        9.0, 0.5, True, 2, 0.5, 10.0,
    )  # fmt: skip
    assert len(cfg.op_names) == 15 and "PosterizeIncreasing" in cfg.op_names and "Posterize" not in cfg.op_names


def test_parse_other_keys():
    cfg = RandAugmentConfig.parse("rand-n3-m7-mmax12-p0.8-mstd101")
    assert (cfg.num_ops, cfg.magnitude, cfg.magnitude_max, cfg.prob, cfg.magnitude_std) == (3, 7, 12, 0.8, float("inf"))
    assert not cfg.increasing and "Posterize" in cfg.op_names
    assert not RandAugmentConfig.parse("rand-m9-inc0").increasing


@pytest.mark.parametrize(
    ("text", "match"),
    [("augmix-m3", "must start with 'rand'"), ("rand-m9-x5", "section 'x5'"), ("rand-mfoo", "'mfoo'")],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        RandAugmentConfig.parse(text)


def _ref_rotate(img, degrees):
    return img.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=(124, 116, 104))


def test_rotate_magnitude_nine_is_27_degrees():
    img = _noise()
    op = AugmentOp("Rotate", prob=1.0, magnitude=9, fill=(124, 116, 104))
    seen = set()
    for seed in range(20):
        random.seed(seed)
        out = np.asarray(op(img))
        matches = [d for d in (27.0, -27.0) if np.array_equal(out, np.asarray(_ref_rotate(img, d)))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {27.0, -27.0}  # the sign is random


def test_translate_magnitude_nine_moves_by_0405_of_the_width():
    arr = np.zeros((10, 200, 3), np.uint8)
    arr[:, 100] = 255  # one bright column at x = 100
    op = AugmentOp("TranslateXRel", prob=1.0, magnitude=9, fill=(0, 0, 0))
    moved = set()
    for seed in range(20):
        random.seed(seed)
        out = np.asarray(op(Image.fromarray(arr)))
        moved.add(int(np.argmax(out[5, :, 0])) - 100)
    assert moved == {81, -81}  # 9 / 10 * 0.45 * 200 = 81 pixels either way


@pytest.mark.parametrize(
    ("name", "m", "expected"),
    [
        ("Rotate", 9, {27.0, -27.0}),
        ("ShearX", 9, {0.27, -0.27}),
        ("TranslateXRel", 10, {0.45, -0.45}),
        ("PosterizeIncreasing", 9, {1}),  # keep 4 - int(3.6) = 1 bit
        ("PosterizeIncreasing", 0, {4}),
        ("Posterize", 9, {3}),  # the original set: keep int(3.6) = 3 bits, weaker as m grows
        ("SolarizeIncreasing", 9, {26}),  # threshold 256 - int(230.4)
        ("Solarize", 9, {230}),
        ("SolarizeAdd", 9, {99}),  # int(0.9 * 110)
        ("Color", 5, {1.0}),  # the original set: 5 / 10 * 1.8 + 0.1
        ("ContrastIncreasing", 9, {1.81, 0.19}),  # 1 +- 9 / 10 * 0.9
    ],
)
def test_magnitude_to_argument(name, m, expected):
    op = AugmentOp(name, magnitude=m)
    random.seed(0)
    args = {round(op.level_fn(m, 0.45)[0], 6) for _ in range(40)}
    assert args == expected


ZERO_MAGNITUDE_IDENTITY = (
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
)  # fmt: skip


@pytest.mark.parametrize("name", ZERO_MAGNITUDE_IDENTITY)
def test_magnitude_zero_is_identity(name):
    img = _noise()
    random.seed(0)
    assert np.array_equal(np.asarray(AugmentOp(name, prob=1.0, magnitude=0)(img)), np.asarray(img))


def test_full_policy_at_m0_changes_only_through_magnitude_free_ops():
    ra = rand_augment_transform("rand-m0-n1-p1.0-inc1")
    img = _noise()
    for seed in range(60):
        random.seed(seed)
        chosen = random.choices(ra.ops, k=1)[0].name
        random.seed(seed)
        changed = not np.array_equal(np.asarray(ra(img)), np.asarray(img))
        if chosen in ZERO_MAGNITUDE_IDENTITY:
            assert not changed, chosen
        elif chosen in ("Invert", "PosterizeIncreasing"):
            assert changed, chosen


def test_magnitude_noise_mean_std_and_clip():
    op = AugmentOp("Rotate", magnitude=9, magnitude_std=0.5)
    random.seed(0)
    samples = np.array([op.magnitude_sample() for _ in range(4000)])
    assert abs(samples.mean() - 9.0) < 0.03  # the clip at 10 removes 2.3% of the upper tail: mean 8.99
    assert 0.44 < samples.std() < 0.5 and samples.max() == 10.0 and samples.min() > 7
    wide = AugmentOp("Rotate", magnitude=9, magnitude_std=0.5, magnitude_max=12)
    assert max(wide.magnitude_sample() for _ in range(2000)) > 10.0  # mmax lifts the clip
    uniform = AugmentOp("Rotate", magnitude=9, magnitude_std=float("inf"))
    samples = np.array([uniform.magnitude_sample() for _ in range(4000)])
    assert abs(samples.mean() - 4.5) < 0.15 and samples.min() >= 0 and samples.max() <= 9


def test_each_op_applies_with_probability_half():
    op = AugmentOp("Invert", prob=0.5)
    img = _noise()
    random.seed(0)
    applied = sum(not np.array_equal(np.asarray(op(img)), np.asarray(img)) for _ in range(1000))
    assert abs(applied / 1000 - 0.5) < 0.05


def test_two_ops_drawn_uniformly_with_replacement():
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1")
    assert ra.num_ops == 2 and [op.name for op in ra.ops] == list(RAND_INCREASING_TRANSFORMS)
    calls = []
    ra.ops = [_Recorder(op.name, calls) for op in ra.ops]
    random.seed(0)
    pairs = []
    for _ in range(3000):
        calls.clear()
        ra(None)
        pairs.append(tuple(calls))
    assert all(len(p) == 2 for p in pairs)
    counts = np.bincount([RAND_INCREASING_TRANSFORMS.index(n) for p in pairs for n in p], minlength=15)
    assert counts.min() > 6000 / 15 * 0.8 and counts.max() < 6000 / 15 * 1.2
    repeats = sum(p[0] == p[1] for p in pairs) / len(pairs)
    assert abs(repeats - 1 / 15) < 0.02  # with replacement: the same op twice 1 time in 15


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, img):
        self.calls.append(self.name)
        return img


def test_fill_colour_and_bicubic_from_the_train_transform():
    from cvt.data import create_train_transform

    ra = next(t for t in create_train_transform(224).transforms if type(t).__name__ == "RandAugment")
    rotate = next(op for op in ra.ops if op.name == "Rotate")
    assert rotate.fill == (124, 116, 104)  # round(255 * mean)
    assert rotate.resample == Image.Resampling.BICUBIC and rotate.magnitude_std == 0.5 and rotate.prob == 0.5


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_runs_over_the_whole_magnitude_range(name):
    img = _noise()
    for magnitude in (0, 5, 9, 10, 12):
        random.seed(magnitude)
        out = AugmentOp(name, prob=1.0, magnitude=magnitude, magnitude_max=12)(img)
        assert out.size == img.size and out.mode == "RGB"


def test_posterize_bits_by_hand():
    img = Image.fromarray(np.array([[[0, 100, 200], [255, 127, 128]]], np.uint8))
    one_bit = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=9)  # 4 - int(3.6) = 1 bit: 0 or 128
    assert np.asarray(one_bit(img)).tolist() == [[[0, 0, 128], [128, 0, 128]]]
    zero_bits = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 4 - 4 = 0 bits: black
    assert not np.asarray(zero_bits(img)).any()
