"""The dense-prediction examples run end to end on a few steps, and their generated data is what it says: the
objects of `cvt.data.synthetic` (the same draws as its dataset) with their masks and boxes."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cvt.data.synthetic import render, render_with_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_masks_come_with_the_same_images_as_the_dataset():
    for seed, outline in enumerate(("disk", "cross", "ring")):
        image, mask = render_with_mask(outline, "solid", 64, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(image), np.asarray(render(outline, "solid", 64, np.random.default_rng(seed))))
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert 0.08 < mask.mean() < 0.6  # radius 28-42% of the side, mostly inside the frame
        pixels = np.asarray(image, dtype=np.float32)
        inside, outside = pixels[mask].mean(axis=0), pixels[~mask].mean(axis=0)
        assert np.abs(inside - outside).max() > 10  # the object's colour differs from what lies around it


def test_segmentation_example_trains_every_backbone(capsys):
    seg = load_example("segmentation")
    images, masks = seg.make_batch(3, 32, np.random.default_rng(0))
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)
    assert all(len(m.unique()) == 2 and m.unique()[0] == 0 for m in masks)  # background and one shape
    rows = seg.main(["--steps", "2", "--size", "32", "--batch-size", "2"])
    assert [r["backbone"] for r in rows] == ["cvt", "convnext", "swin", "resnet"]
    assert all(math.isfinite(r["loss_last10"]) and 0 <= r["miou"] <= 1 for r in rows)
    assert all(1.0 < r["params_m"] < 1.6 for r in rows)  # of about the same size
    assert "| cvt | 1.17 |" in capsys.readouterr().out


def test_detection_example_trains():
    det = load_example("detection")
    images, labels = det.make_batch(4, 48, np.random.default_rng(1))
    assert images.shape == (4, 3, 48, 48)
    rng = np.random.default_rng(1)  # the same draws, by hand: the box spans the rows and columns the mask covers
    for target in labels:
        label = int(rng.integers(len(det.CLASSES)))
        _, mask = render_with_mask(det.CLASSES[label], "solid", 48, rng)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        want = torch.tensor([[(x0 + x1) / 96, (y0 + y1) / 96, (x1 - x0) / 48, (y1 - y0) / 48]], dtype=torch.float32)
        assert target["class_labels"].tolist() == [label]
        torch.testing.assert_close(target["boxes"], want)
    result = det.main(["--steps", "2", "--size", "48", "--batch-size", "2"])
    assert math.isfinite(result["loss_last10"]) and 0 <= result["mean_iou"] <= 1


def test_box_iou_by_hand():
    det = load_example("detection")
    a = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.5, 0.5]])
    b = torch.tensor([[0.6, 0.5, 0.4, 0.4], [0.75, 0.75, 0.5, 0.5]])
    # 0.3 x 0.4 overlap over 0.16 + 0.16 - 0.12; the second pair only touches at a corner
    torch.testing.assert_close(det.box_iou(a, b), torch.tensor([0.12 / 0.20, 0.0]))
