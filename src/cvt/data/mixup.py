"""Batch-level Mixup / CutMix with label smoothing, and the soft-target cross-entropy they train with.

The authors' recipe (timm's `Mixup` in "batch" mode): every batch (prob 1.0) is mixed with itself reversed; with
probability 0.5 (switch_prob) by CutMix with lam ~ Beta(1.0, 1.0), otherwise by Mixup with lam ~ Beta(0.8, 0.8).
CutMix pastes one box of relative side sqrt(1 - lam) centred uniformly in the image (clipped at the borders) and
then corrects lam to the area actually kept. Targets become lam * smooth(y) + (1 - lam) * smooth(y reversed), with
smooth() the one-hot vector with on-value 1 - s + s/K and off-value s/K (s = 0.1: 0.91 and 0.01 for K = 10).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def one_hot_smooth(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Class indices (B,) -> smoothed one-hot float targets (B, num_classes) that sum to 1.

    Args:
        targets: integer class indices.
        num_classes: K.
        smoothing: s; the true class gets 1 - s + s/K, every other class s/K.
    """
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    out = torch.full((targets.shape[0], num_classes), off_value, device=targets.device)
    return out.scatter_(1, targets.long().view(-1, 1), on_value)


class Mixup:
    """Mix a batch with itself reversed (Mixup or CutMix) and return soft targets.

    Randomness: one 63-bit seed per call is drawn from `generator` (or torch's global generator), and all of the
    call's draws come from a numpy generator seeded with it. Checkpointing the torch generator state therefore
    checkpoints Mixup.

    Args:
        mixup_alpha: Beta(alpha, alpha) parameter of Mixup's lam; 0 turns Mixup off.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix's lam; 0 turns CutMix off.
        prob: probability that a batch is mixed at all.
        switch_prob: probability of CutMix rather than Mixup when both are on.
        label_smoothing: smoothing s of the one-hot targets.
        num_classes: K.
        correct_lam: recompute lam from the CutMix box after clipping it at the image border.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        correct_lam: bool = True,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"Mixup alphas must be >= 0, got mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.correct_lam = correct_lam

    def sample_params(self, rng: np.random.Generator) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam 1.0 means no mixing."""
        if rng.random() >= self.prob or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    @staticmethod
    def cutmix_box(
        rng: np.random.Generator, height: int, width: int, lam: float
    ) -> tuple[tuple[int, int, int, int], float]:
        """((y0, y1, x0, x1), kept fraction) of a box with relative side sqrt(1 - lam) centred uniformly at random."""
        cut = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        kept = 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)
        return (int(y0), int(y1), int(x0), int(x1)), kept

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch.

        Args:
            images: (B, C, H, W); not modified (a mixed copy is returned).
            targets: class indices (B,), or soft targets (B, K) that are mixed as they are.
            generator: torch generator to draw the call's seed from; default torch's global one.

        Returns:
            (mixed images, soft targets (B, K) summing to 1 per row).
        """
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        lam, use_cutmix = self.sample_params(rng)
        if lam < 1.0 and use_cutmix:
            (y0, y1, x0, x1), kept = self.cutmix_box(rng, images.shape[-2], images.shape[-1], lam)
            lam = kept if self.correct_lam else lam
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        elif lam < 1.0:
            images = images * lam + images.flip(0) * (1.0 - lam)
        soft = one_hot_smooth(targets, self.num_classes, self.label_smoothing) if targets.ndim == 1 else targets.float()
        return images, soft * lam + soft.flip(0) * (1.0 - lam)

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes})"
        )


class SoftTargetCrossEntropy(nn.Module):
    """Mean over the batch of sum_k -target_k * log_softmax(logits)_k (computed in float32)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
