"""Mixup / CutMix / label smoothing / soft-target cross-entropy against hand-computed numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from cvt.data import Mixup, SoftTargetCrossEntropy, one_hot_smooth


def _batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is constant i + 1 everywhere, so any pixel tells which images it came from."""
    images = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return images, torch.arange(n)


def test_one_hot_smooth_values():
    t = one_hot_smooth(torch.tensor([3, 0]), 10, 0.1)
    expected = torch.full((2, 10), 0.01)
    expected[0, 3] = expected[1, 0] = 0.91  # 1 - 0.1 + 0.1 / 10
    assert torch.allclose(t, expected) and torch.allclose(t.sum(1), torch.ones(2))
    assert torch.equal(one_hot_smooth(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))


def test_mixup_only_targets_match_lam_read_from_pixels():
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
    images, targets = _batch()
    torch.manual_seed(0)
    mixed, soft = mix(images, targets)
    lam = 1.0 - (mixed[0, 0, 0, 0].item() - 1.0) / 3.0  # pixel = lam * 1 + (1 - lam) * 4
    assert 0 < lam < 1 and torch.allclose(mixed[3], torch.full_like(mixed[3], lam * 4 + (1 - lam) * 1))
    assert torch.equal(images, _batch()[0])  # the input is not modified
    row = torch.full((10,), 0.01)
    row[0] = lam * 0.91 + (1 - lam) * 0.01
    row[3] = lam * 0.01 + (1 - lam) * 0.91
    assert torch.allclose(soft[0], row, atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(4))


def test_cutmix_only_targets_use_the_area_actually_pasted():
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    images, targets = _batch(4, 32)
    for seed in range(10):
        torch.manual_seed(seed)
        mixed, soft = mix(images, targets)
        assert set(mixed.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0}  # pasted, not blended
        pasted = (mixed[0, 0] == 4.0).float().mean().item()  # image 0 receives a box of image 3
        rows, cols = torch.nonzero(mixed[0, 0] == 4.0, as_tuple=True)
        if len(rows):
            assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == len(rows)  # one box
        lam = 1.0 - pasted
        assert soft[0, 0].item() == pytest.approx(lam * 0.91 + (1 - lam) * 0.01, abs=1e-6)
        assert soft[0, 3].item() == pytest.approx(lam * 0.01 + (1 - lam) * 0.91, abs=1e-6)
        assert torch.allclose(soft.sum(1), torch.ones(4))


def test_cutmix_box_by_hand():
    class FixedRng:  # centre at (10, 20) in a 40x40 image
        def __init__(self):
            self.values = iter([10, 20])

        def integers(self, lo, hi):
            return next(self.values)

    # lam 0.75: side sqrt(0.25) * 40 = 20, box rows 10-10..10+10 -> 0..20, cols 20-10..20+10 -> 10..30
    box, kept = Mixup.cutmix_box(FixedRng(), 40, 40, 0.75)
    assert box == (0, 20, 10, 30) and kept == pytest.approx(1 - 400 / 1600)
    # centre near the corner: the box is clipped and lam corrected to the kept area
    rng = FixedRng()
    rng.values = iter([2, 3])
    box, kept = Mixup.cutmix_box(rng, 40, 40, 0.75)
    assert box == (0, 12, 0, 13) and kept == pytest.approx(1 - 12 * 13 / 1600)


def test_switch_probability_half_and_every_batch_mixed():
    mix = Mixup(num_classes=10)  # the recipe: mixup 0.8, cutmix 1.0, prob 1.0, switch 0.5
    images, targets = _batch()
    torch.manual_seed(0)
    cutmix = unchanged = 0
    for _ in range(400):
        mixed, _ = mix(images, targets)
        cutmix += set(mixed.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0}  # pasted, not blended
        unchanged += torch.equal(mixed, images)
    assert abs(cutmix / 400 - 0.5) < 0.08
    # only a CutMix box thinner than 2 pixels leaves a batch as it was: P(1 - lam < 1/64) / 2 = 0.8%
    assert unchanged / 400 < 0.03


def test_mixup_lam_follows_beta():
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=10)
    images, targets = _batch()
    torch.manual_seed(0)
    lams = torch.tensor([1.0 - (mix(images, targets)[0][0, 0, 0, 0].item() - 1.0) / 3.0 for _ in range(2000)])
    # Beta(0.8, 0.8): mean 0.5, variance ab / ((a + b)^2 (a + b + 1)) = 0.64 / (2.56 * 2.6) = 0.09615
    assert abs(lams.mean().item() - 0.5) < 0.02 and abs(lams.var().item() - 0.09615) < 0.006


def test_off_gives_smoothed_one_hot_and_untouched_images():
    images, targets = _batch()
    for mix in (Mixup(prob=0.0, num_classes=10), Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=10)):
        mixed, soft = mix(images, targets)
        assert torch.equal(mixed, images)
        assert torch.allclose(soft, one_hot_smooth(targets, 10, 0.1))


def test_generator_makes_it_reproducible_and_leaves_global_rng_alone():
    images, targets = _batch()
    mix = Mixup(num_classes=10)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = mix(images, targets, generator=torch.Generator().manual_seed(1))
    b = mix(images, targets, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    c = mix(images, targets)
    torch.manual_seed(7)
    d = mix(images, targets)
    assert torch.equal(c[0], d[0])  # global generator: checkpointing its state checkpoints Mixup


def test_soft_targets_are_mixed_as_given():
    images, _ = _batch()
    soft_in = torch.eye(4)
    torch.manual_seed(0)
    mixed, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=4)(images, soft_in)
    lam = 1.0 - (mixed[0, 0, 0, 0].item() - 1.0) / 3.0
    assert soft[0].tolist() == pytest.approx([lam, 0, 0, 1 - lam], abs=1e-6)


def test_soft_target_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    target = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))  # 0.836988
    assert SoftTargetCrossEntropy()(logits, target).item() == pytest.approx(expected, abs=1e-6)
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, 2, 2])
    assert SoftTargetCrossEntropy()(logits, F.one_hot(labels, 7).float()).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), abs=1e-6
    )
    # with label smoothing 0.1 it equals torch's label-smoothed cross-entropy
    smoothed = SoftTargetCrossEntropy()(logits, one_hot_smooth(labels, 7, 0.1))
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), abs=1e-6)


def test_soft_target_cross_entropy_half_precision_logits():
    logits = torch.randn(3, 5).half()
    target = one_hot_smooth(torch.tensor([1, 2, 3]), 5, 0.1)
    loss = SoftTargetCrossEntropy()(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
